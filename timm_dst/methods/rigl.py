"""RigL (Evci et al. 2020): magnitude drop, grow the inactive positions with the largest dense |dL/dW|.

The dense gradient is that of the effective weight on the step before the update (summed over accumulation
micro-steps, averaged over ranks). ``rigl`` stops updating at 75% of training like the official code; ``rigl-itop``
explores to the end with the ITOP paper's settings (Table 4: ΔT 4000, P 0.5 cosine).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .._registry import register_method
from ._base import SparseMethod

if TYPE_CHECKING:
    from ..sparsifier import Sparsifier

__all__ = ['RigL']


class RigL(SparseMethod):
    """Gradient-guided growth."""

    def needs_dense_grad(self, sp: Sparsifier, step: int) -> bool:
        return sp.schedule.is_update_step(step)

    def drop_counts(self, sp: Sparsifier, rate: float) -> list[int]:
        self._grads = sp.dense_grads()
        return super().drop_counts(sp, rate)

    def grow_score(self, sp: Sparsifier, i: int) -> torch.Tensor:
        return self._grads[i].abs()

    def after_update(self, sp: Sparsifier) -> None:
        self._grads = None


register_method('rigl', RigL, update_interval=100, prune_rate=0.3, prune_rate_schedule='cosine', update_end=0.75)
register_method('rigl-itop', RigL, update_interval=4000, prune_rate=0.5, prune_rate_schedule='cosine')
