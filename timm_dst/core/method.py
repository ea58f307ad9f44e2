"""The method interface: a DST method says only which weights to drop, which to grow, and how many per tensor.

The contract between a method and the controller (:class:`~timm_dst.core.controller.Sparsifier`) is closed: a method
reads and calls only the controller's public surface (``targets``, ``counts``, ``step``, ``schedule``, ``sparsity``,
``distribution``, ``structure``, ``model``, ``optimizer``, ``generator()``, ``global_topk_masks()``,
``layer_budgets()``, ``topk_masks()``, ``has_dense_grads``,
``dense_grads()``, ``clear_dense_grads()``) and is called only through the hooks below, in this order:

* once, when the controller is built: :meth:`SparseMethod.init_masks` (the dense weights are still plain parameters),
  then :meth:`SparseMethod.prepare` (after the initial masks are chosen, before they are attached);
* after every optimizer step: :meth:`SparseMethod.on_step`; then, on an update step of the schedule,
  :meth:`SparseMethod.before_update`, :meth:`SparseMethod.drop_counts`, :meth:`SparseMethod.drop_score` (per tensor),
  :meth:`SparseMethod.grow_counts`, :meth:`SparseMethod.grow_score` (per tensor) and :meth:`SparseMethod.after_update`;
  finally :meth:`SparseMethod.needs_dense_grad` for the next step;
* :meth:`SparseMethod.state_dict` / :meth:`SparseMethod.load_state_dict` with the controller's own state; before a
  state is loaded, :meth:`SparseMethod.check_counts` says whether its counts can be the method's.

See ``docs/design.md`` for the whole contract and the invariants the controller keeps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn

__all__ = ['SparseMethod', 'DensePhase', 'SparsifierView', 'ShardedMethodError']


class ShardedMethodError(ValueError):
    """A method that cannot run on a model sharded with ``fully_shard`` (FSDP2); :func:`timm_dst.create_sparsifier`
    adds the methods that can."""


class SparsifierView(Protocol):
    """What a method may read and call on the controller, and nothing else (docs/design.md, "The method contract").

    :class:`~timm_dst.core.controller.Sparsifier` implements it; the hooks of :class:`SparseMethod` receive it.
    """

    model: nn.Module
    optimizer: Any
    targets: list  # SparseTarget per sparse tensor: name, module, param, mask, shape, numel
    counts: list[int]
    step: int
    schedule: Any  # UpdateSchedule
    sparsity: float
    distribution: str
    structure: Any  # Structure or None

    @property
    def prune_rate(self) -> float: ...

    @property
    def has_dense_grads(self) -> bool: ...

    def generator(self, device: torch.device | str) -> torch.Generator: ...

    def layer_budgets(self, sparsity: float) -> list[int]: ...

    def topk_masks(self, scores: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]: ...

    def global_topk_masks(self, scores: list[torch.Tensor], k: int) -> list[torch.Tensor]: ...

    def dense_grads(self) -> list[torch.Tensor]: ...

    def clear_dense_grads(self) -> None: ...

    def _bounds(self, i: int) -> tuple[int, int]: ...


Sparsifier = SparsifierView  # the hooks' annotation: the controller as a method sees it


def _count_slack(sp: Sparsifier) -> int:
    """How far a structured run's total may be from its budget: one unit of the largest quantum (0 unstructured)."""
    if sp.structure is None:
        return 0
    return max(sp._bounds(i)[0] for i in range(len(sp.targets)))


@dataclass(frozen=True)
class DensePhase:
    """A method whose sparse run starts from a dense run (the lottery ticket): the CLI trains dense first.

    The CLI runs ``dense_method`` in ``<output>/dense``, saves the weights at optimizer step
    ``args.<rewind_step_arg>`` (0 = the initialisation) as the rewind point, then builds this method with
    ``<trained_state_arg>=`` the dense run's last weights and ``<rewind_state_arg>=`` the rewind point.

    Attributes:
        trained_state_arg: The method's constructor keyword taking the trained dense weights.
        rewind_state_arg: The method's constructor keyword taking the weights to rewind to.
        rewind_step_arg: The CLI-only argument (a flag of its own) naming the optimizer step of the rewind point.
        dense_method: The registered method name the dense phase trains with.
    """

    trained_state_arg: str
    rewind_state_arg: str
    rewind_step_arg: str
    dense_method: str


class SparseMethod:
    """Base method: magnitude drop, uniform-random growth, the same count per tensor (this is SET).

    Subclasses override the scores and budgets; the controller (:class:`~timm_dst.core.controller.Sparsifier`) owns the
    masks, the exact counts, optimizer-state surgery, the schedule, R_s, rank sync and checkpointing.

    The class attributes are the method's capabilities; the registry copies them into its
    :class:`~timm_dst.MethodInfo` entries, and the controller and the CLI act on them.

    Attributes:
        attaches: Whether masks are attached at all (False only for a dense baseline).
        explores: Whether the topology changes after initialisation (False: :meth:`update` does nothing).
        moves_budget: Whether the per-tensor active counts may change during training (the global total is kept).
        uses_dense_grads: Whether the method reads the dense gradient of the sparse weights (``sp.dense_grads()``);
            the default :meth:`needs_dense_grad` then captures it on the backward before each update.
        update_at_end: Also update at the schedule's ``update_end`` when it is not a multiple of ΔT after the start
            (a pruning schedule that must end exactly at its final sparsity).
        grow_excludes_dropped: Whether positions dropped in the same update are barred from regrowth.
        init_data_arg: The constructor keyword taking data batches to score the initial topology with (None: the
            method needs no data). The CLI passes its training loader there unless the user gave that argument.
        dense_phase: A :class:`DensePhase` when the method starts from a trained dense model (the CLI then runs both
            phases), else None.
    """

    attaches: bool = True
    explores: bool = True
    moves_budget: bool = False
    uses_dense_grads: bool = False
    update_at_end: bool = False
    grow_excludes_dropped: bool = False
    init_data_arg: str | None = None
    dense_phase: DensePhase | None = None

    # --- initial topology ------------------------------------------------------------------------------------------
    def init_masks(self, sp: Sparsifier) -> list[torch.Tensor] | None:
        """Initial masks, or None to let the controller use its ``mask_init`` policy (random / magnitude).

        Called before the masks are attached: ``sp.targets[i].param`` is still the plain dense weight.
        """
        return None

    def prepare(self, sp: Sparsifier) -> None:
        """Called once after the initial masks are chosen and before they are attached: change the model or the
        optimizer for the sparse run (the lottery ticket rewinds the weights and clears the optimizer state here)."""

    # --- per-step -----------------------------------------------------------------------------------------------
    def needs_dense_grad(self, sp: Sparsifier, step: int) -> bool:
        """Whether the backward of optimizer step ``step`` must capture the dense gradient of the sparse weights.

        Default: on the steps followed by a topology update when :attr:`uses_dense_grads` is set, else never.
        """
        return self.uses_dense_grads and sp.schedule.is_update_step(step)

    def on_step(self, sp: Sparsifier) -> None:
        """Called after every optimizer step, before a topology update if one is due (keep it cheap)."""

    # --- topology update ---------------------------------------------------------------------------------------
    def before_update(self, sp: Sparsifier) -> None:
        """Called at the start of every topology update, before :meth:`drop_counts` (fetch gradient-based scores
        here, e.g. ``sp.dense_grads()``, which also averages them over ranks)."""

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

    def check_counts(self, sp: Sparsifier, counts: list[int], state: dict[str, Any]) -> str | None:
        """Why the active ``counts`` of a checkpoint (one per sparse tensor) cannot be this method's under ``sp``'s
        configuration, or None when they can; ``state`` is the method's own part of the checkpoint (what
        :meth:`state_dict` returned). :meth:`Sparsifier.load_state_dict` refuses the checkpoint with the reason.

        The default: the total is the run's budget (``sp.layer_budgets(sp.sparsity)``, within one unit of a
        structure), and every tensor holds exactly its own budget unless the method moves budget between tensors
        (``moves_budget``) or the initial topology was not drawn per tensor (a method's own ``init_masks``, or
        ``mask_init='global-magnitude'``). A method whose counts follow another rule (GMP's pruning schedule)
        overrides it.
        """
        budgets = sp.layer_budgets(sp.sparsity)
        if (not self.moves_budget and type(self).init_masks is SparseMethod.init_masks
                and sp.mask_init != 'global-magnitude'):
            for t, c, b in zip(sp.targets, counts, budgets):
                if c != b:
                    return f'{t.name} holds {c} active weights, its budget is {b}'
        total, budget = sum(counts), sum(budgets)
        if abs(total - budget) > _count_slack(sp):
            return f'the sparse tensors hold {total} active weights in all, the budget is {budget}'
        return None

    def extra_repr(self) -> str:
        return ''

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.extra_repr()})'
