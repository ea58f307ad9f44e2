"""RigL (Evci et al. 2020): magnitude drop, grow the inactive positions with the largest dense |dL/dW|.

The dense gradient is that of the effective weight on the step before the update (summed over accumulation
micro-steps, averaged over ranks). ``rigl`` stops updating at 75% of training like the official code; ``rigl-itop``
explores to the end with the ITOP paper's settings (Table 4: ΔT 4000, P 0.5 cosine).
"""
from __future__ import annotations

import torch

from ..core.controller import Sparsifier
from ..core.method import SparseMethod
from ._registry import register_method

__all__ = ['RigL']


class RigL(SparseMethod):
    """Gradient-guided growth: the dense gradient is captured on the backward of each update step only."""

    uses_dense_grads = True

    def __init__(self):
        self._grads: list[torch.Tensor] | None = None

    def before_update(self, sp: Sparsifier) -> None:
        self._grads = sp.dense_grads()

    def grow_score(self, sp: Sparsifier, i: int) -> torch.Tensor:
        return self._grads[i].abs()

    def after_update(self, sp: Sparsifier) -> None:
        self._grads = None


register_method('rigl', RigL, description='RigL: magnitude drop, growth by the largest dense gradient; stops at 75%',
                update_interval=100, prune_rate=0.3, prune_rate_schedule='cosine', update_end=0.75)
register_method('rigl-itop', RigL, description='RigL exploring to the end with the ITOP settings (ΔT 4000, P 0.5)',
                update_interval=4000, prune_rate=0.5, prune_rate_schedule='cosine')
