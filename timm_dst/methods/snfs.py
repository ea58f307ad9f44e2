"""SNFS, sparse momentum (Dettmers & Zettlemoyer 2019).

Drop the smallest-magnitude active weights per tensor; regrow the same total, shared across tensors in proportion to
the mean |momentum| of their active weights; inside a tensor, grow where |momentum| is largest. The momentum is an
exponential average of the *dense* gradient (inactive positions included), kept by the method, since the optimizer's
own momentum only sees masked gradients.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core._validate import check_float
from ..core.controller import Sparsifier
from ..core.distributions import round_exact
from ..core.method import SparseMethod
from ..distributed.fsdp import full
from ._registry import register_method

__all__ = ['SNFS']


class SNFS(SparseMethod):
    """Momentum-guided growth and redistribution.

    Args:
        snfs_momentum: Decay of the dense-gradient momentum (``m = beta * m + g``).
    """

    def __init__(self, snfs_momentum: float = 0.9):
        self.beta = check_float('snfs_momentum', snfs_momentum, 0.0, 1.0, high_open=True)
        self.momentum: list[torch.Tensor] | None = None

    moves_budget = True
    uses_dense_grads = True

    def needs_dense_grad(self, sp: Sparsifier, step: int) -> bool:
        end = sp.schedule.end
        return end is None or step <= end

    def prepare(self, sp: Sparsifier) -> None:
        # zeros from the start (the first step gives m = g exactly): a checkpoint has the same structure at every
        # step, which torch.distributed.checkpoint needs (it loads into the structure it is given); under FSDP2 the
        # momentum is sharded like the weights
        self.momentum = [torch.zeros_like(t.param, dtype=torch.float32) for t in sp.targets]

    def on_step(self, sp: Sparsifier) -> None:
        if not sp.has_dense_grads:
            return
        grads = sp.dense_grads()
        if self.momentum is None:
            self.momentum = [torch.zeros_like(g) for g in grads]
        torch._foreach_mul_(self.momentum, self.beta)
        torch._foreach_add_(self.momentum, grads)
        sp.clear_dense_grads()

    def _momentum(self, sp: Sparsifier, i: int) -> torch.Tensor:
        if self.momentum is None:
            return torch.zeros_like(sp.targets[i].param, dtype=torch.float32)
        return self.momentum[i]

    def grow_counts(self, sp: Sparsifier, dropped: list[int], kept: list[torch.Tensor]) -> list[int]:
        means = full(torch.stack([  # full: FSDP2 shards give partial sums, summed over the ranks here
            (self._momentum(sp, i).abs() * k).sum() / k.sum().clamp_min(1) for i, k in enumerate(kept)])).tolist()
        kept_counts = [c - d for c, d in zip(sp.counts, dropped)]
        room = [t.numel - k for t, k in zip(sp.targets, kept_counts)]
        return round_exact(means, sum(dropped), room)

    def grow_score(self, sp: Sparsifier, i: int) -> torch.Tensor:
        return self._momentum(sp, i).abs()

    def state_dict(self) -> dict[str, Any]:
        return {'momentum': [m.cpu() for m in self.momentum] if self.momentum is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        m = state.get('momentum')
        if m is not None:
            like = self.momentum
            if (not isinstance(m, list | tuple) or not all(torch.is_tensor(x) and x.is_floating_point() for x in m)
                    or (like is not None and [tuple(x.shape) for x in m] != [tuple(x.shape) for x in like])):
                raise ValueError('snfs: momentum is not one float tensor per sparse tensor, shaped like its weight')
        self.momentum = [x.clone() for x in m] if m is not None else None

    def extra_repr(self) -> str:
        return f'snfs_momentum={self.beta}'


register_method('snfs', SNFS, description='SNFS: magnitude drop, growth and redistribution by dense-gradient '
                'momentum', update_interval=100, prune_rate=0.5, prune_rate_schedule='cosine')
