"""A third-party timm-dst method: MEST's drop score with random regrowth (Yuan et al. 2021, "MEST: Accurate and Fast
Memory-Economic Sparse Training Framework on the Edge", the EM&S criterion).

An active weight is kept by ``|w| + lambda * |dL/dw|``: small weights that the loss still pulls on survive. Growth is
uniformly random (the controller's default), zero-initialised, the same count per tensor.

The method uses only the controller's public surface: ``uses_dense_grads`` asks for the dense gradient on the backward
before each update, :meth:`before_update` reads it once (``sp.dense_grads()``, averaged over ranks) and
:meth:`after_update` drops it.
"""
from __future__ import annotations

import torch

from timm_dst import register_method
from timm_dst.methods import SparseMethod

__all__ = ['MEST', 'register']


class MEST(SparseMethod):
    """Drop by |w| + lambda |g|, grow at random.

    Args:
        mest_lambda: Weight of the gradient magnitude in the keep score (0 = SET).
    """

    uses_dense_grads = True

    def __init__(self, mest_lambda: float = 1.0):
        if mest_lambda < 0:
            raise ValueError(f'mest_lambda={mest_lambda!r} must be >= 0')
        self.lam = float(mest_lambda)
        self._grads: list[torch.Tensor] | None = None

    def before_update(self, sp) -> None:
        self._grads = sp.dense_grads()

    def drop_score(self, sp, i: int) -> torch.Tensor:
        return sp.targets[i].param.detach().abs().float() + self.lam * self._grads[i].abs()

    def after_update(self, sp) -> None:
        self._grads = None

    def extra_repr(self) -> str:
        return f'mest_lambda={self.lam}'


def register() -> None:
    """Entry point of the group ``timm_dst.methods``: registers ``mest`` with its defaults."""
    register_method('mest', MEST, description='MEST (plugin): drop by |w| + lambda |g|, random regrowth',
                    update_interval=100, prune_rate=0.5, prune_rate_schedule='cosine')
