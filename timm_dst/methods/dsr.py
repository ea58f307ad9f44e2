"""DSR, Dynamic Sparse Reparameterization (Mostafa & Wang 2019, Algorithm 1).

One global adaptive threshold H: every active weight with |w| < H, in all sparse tensors, is dropped (K in total).
H is then adjusted by a set-point feedback loop: halved when K > (1 + delta) * Np, doubled when K < (1 - delta) * Np.
K zero-initialised weights regrow at random inactive positions (never where a weight was just dropped), shared
across tensors in proportion to their surviving active counts and capped by each tensor's room. The global count
stays exact while per-tensor budgets move.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..core._validate import check_float, check_int
from ..core.controller import Sparsifier
from ..core.distributions import round_exact
from ..core.method import SparseMethod
from ..distributed.fsdp import full
from ._registry import register_method

__all__ = ['DSR']


class DSR(SparseMethod):
    """Adaptive global threshold with reallocation across tensors.

    Args:
        dsr_np: Np, the target number of weights reallocated per update (official: 20000 for WRN-28-2 / CIFAR-10,
            400000 for ResNet-50 / ImageNet). None = 10% of the active weights.
        dsr_threshold: H0, the initial threshold (official 1e-3).
        dsr_tolerance: delta, the tolerance of the feedback loop (official 0.1).
    """

    moves_budget = True
    grow_excludes_dropped = True

    def __init__(self, dsr_np: int | None = None, dsr_threshold: float = 1e-3, dsr_tolerance: float = 0.1):
        self.np_target = check_int('dsr_np', dsr_np, minimum=1) if dsr_np is not None else None
        self.threshold = check_float('dsr_threshold', dsr_threshold, 0.0, low_open=True)
        self.tolerance = check_float('dsr_tolerance', dsr_tolerance, 0.0, 1.0, high_open=True)

    def drop_counts(self, sp: Sparsifier, rate: float) -> list[int]:
        below = torch.stack([
            torch.count_nonzero((t.param.detach().abs() < self.threshold) & t.mask) for t in sp.targets])
        below = full(below).tolist()  # FSDP2 shards: per-rank counts, summed
        dropped = [int(b) for b in below]
        k, np_target = sum(dropped), self.np_target or max(1, int(round(0.1 * sum(sp.counts))))
        if k > (1.0 + self.tolerance) * np_target:
            self.threshold /= 2.0
        elif k < (1.0 - self.tolerance) * np_target:
            self.threshold *= 2.0
        return dropped

    def grow_counts(self, sp: Sparsifier, dropped: list[int], kept: list[torch.Tensor]) -> list[int]:
        survivors = [c - d for c, d in zip(sp.counts, dropped)]
        room = [t.numel - c for t, c in zip(sp.targets, sp.counts)]  # just-dropped positions are barred
        return round_exact([float(s) for s in survivors], sum(dropped), room)

    def state_dict(self) -> dict[str, Any]:
        return {'threshold': self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        threshold = state.get('threshold', self.threshold)
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold < math.inf:
            raise ValueError(f'dsr: threshold {threshold!r} is not accepted: expected a finite number >= 0')
        self.threshold = float(threshold)

    def extra_repr(self) -> str:
        return f'dsr_np={self.np_target}, dsr_threshold={self.threshold}, dsr_tolerance={self.tolerance}'


register_method('dsr', DSR, description='DSR: adaptive global magnitude threshold, random regrowth shared by surviving '
                'counts', update_interval=100, prune_rate_schedule='constant')
