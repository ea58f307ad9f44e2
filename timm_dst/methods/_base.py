"""The method interface: a DST method says only which weights to drop, which to grow, and how many per tensor."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..sparsifier import Sparsifier

__all__ = ['SparseMethod']


class SparseMethod:
    """Base method: magnitude drop, uniform-random growth, the same count per tensor (this is SET).

    Subclasses override the scores and budgets; the controller (:class:`~timm_dst.sparsifier.Sparsifier`) owns the
    masks, the exact counts, optimizer-state surgery, the schedule, R_s, rank sync and checkpointing.

    Attributes:
        attaches: Whether masks are attached at all (False only for ``dense``).
        explores: Whether the topology changes after initialisation.
        grow_excludes_dropped: Whether positions dropped in the same update are barred from regrowth.
    """

    attaches: bool = True
    explores: bool = True
    grow_excludes_dropped: bool = False

    # --- initial topology ------------------------------------------------------------------------------------------
    def init_masks(self, sp: Sparsifier) -> list[torch.Tensor] | None:
        """Initial masks, or None to let the controller use its ``sparse_init`` policy (random / magnitude)."""
        return None

    # --- per-step -----------------------------------------------------------------------------------------------
    def needs_dense_grad(self, sp: Sparsifier, step: int) -> bool:
        """Whether the backward of optimizer step ``step`` must capture the dense gradient of the sparse weights."""
        return False

    def on_step(self, sp: Sparsifier) -> None:
        """Called after every optimizer step, before a topology update if one is due (keep it cheap)."""

    # --- topology update ---------------------------------------------------------------------------------------
    def drop_counts(self, sp: Sparsifier, rate: float) -> list[int]:
        """How many active weights each tensor drops."""
        return [int(round(rate * c)) for c in sp.counts]

    def drop_score(self, sp: Sparsifier, i: int) -> torch.Tensor:
        """Keep score of tensor ``i``'s weights (the lowest-scoring active ones are dropped)."""
        return sp.targets[i].param.detach().abs()

    def grow_counts(self, sp: Sparsifier, dropped: list[int], kept: list[torch.Tensor]) -> list[int]:
        """How many inactive positions each tensor grows (default: what it dropped)."""
        return list(dropped)

    def grow_score(self, sp: Sparsifier, i: int) -> torch.Tensor | None:
        """Grow score of tensor ``i``'s positions (the highest-scoring inactive ones are grown).

        None (the default) means uniformly at random among the inactive positions, which the controller samples
        directly instead of scoring every position.
        """
        return None

    def after_update(self, sp: Sparsifier) -> None:
        """Called once the new masks are in place (per-method bookkeeping)."""

    # --- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def extra_repr(self) -> str:
        return ''

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.extra_repr()})'
