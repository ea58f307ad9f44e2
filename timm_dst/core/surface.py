"""The method surface: what a method may call on the controller (docs/design.md, section 3.3), as one named type.

:class:`MethodSurface` is the base class of :class:`~timm_dst.core.controller.Sparsifier` that holds the calls of the
method contract besides plain attributes: ``generator(device)``, ``layer_budgets``, ``topk_masks``,
``global_topk_masks``, ``check_structure``, ``has_dense_grads``, ``dense_grads()`` and ``clear_dense_grads()``. Each
is a thin call into the controller's parts (budgets, selectors, capture, rank sync); the state it reads (targets,
selectors, capture, generators) is set by the controller. This module imports those parts; never the controller.
"""
from __future__ import annotations

from typing import Any

import torch

from ..distributed import sync as _sync
from . import budgets as _budgets
from ._seeding import derived_generator

__all__ = ['MethodSurface']


class MethodSurface:
    """The calls a method may make on the controller (the attributes it may read are the controller's own)."""

    targets: list[Any]
    seed: int
    distribution: str
    structure: Any
    _selectors: list[Any]
    _generators: dict[str, torch.Generator]
    _capture: Any
    _sharded: bool

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The sparsifier's generator on ``device``, seeded identically on every rank.

        Its seed is mixed from :attr:`seed` (:func:`~timm_dst.core._seeding.derive_seed`), never :attr:`seed` itself:
        the user seeds torch's global generator with the same integer before building the model, and a replay of that
        stream would select the masks from the initial weights.
        """
        device = torch.device(device)
        key = str(device)
        if key not in self._generators:
            self._generators[key] = derived_generator(self.seed, 'sparsifier', len(self._generators), device=device)
        return self._generators[key]

    def layer_budgets(self, sparsity: float) -> list[int]:
        """Active count of each sparse tensor at ``sparsity`` under this sparsifier's distribution and structure.

        Unstructured, these are :func:`~timm_dst.core.distributions.layer_counts` (exact total). With a structure, each
        tensor's count is rounded to whole units of its layout (blocks, or one weight per group), at least one unit
        where the distribution gives any, with the total as close to ``(1 - sparsity) * N`` as the units allow; an N:M
        structure gives every tensor the same density (the distribution does not apply) and its fitting tensors
        exactly N per group at ``sparsity = 1 - N/M``.
        """
        return _budgets.layer_budgets(self.targets, self._selectors, self.structure, self.distribution, sparsity)

    def topk_masks(self, scores: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
        """Per tensor, a mask of ``counts[i]`` active weights at the highest ``scores[i]``, in whole units of the
        structure (blocks by summed score, grouped structures the same number in every group)."""
        return _budgets.topk_masks(self.targets, self._selectors, scores, counts)

    def global_topk_masks(self, scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        """Masks keeping the global top-``k`` of per-tensor scores (used by global magnitude, SNIP and LTH)."""
        return _budgets.global_topk_masks(self.targets, self._selectors, self.structure, scores, k)

    def check_structure(self, masks: list[torch.Tensor] | None = None) -> None:
        """Raise ValueError when a mask (default: the attached ones) breaks its tensor's structure."""
        masks = masks if masks is not None else [t.mask for t in self.targets]
        for t, sel, mask in zip(self.targets, self._selectors, masks):
            why = sel.check(mask)
            if why is not None:
                raise ValueError(f'masks: {t.name} breaks structure={sel.spec!r}: {why}')

    @property
    def has_dense_grads(self) -> bool:
        """Whether a dense gradient was captured since the last :meth:`clear_dense_grads` (on this rank)."""
        return any(g is not None for g in self._capture.grads)

    def dense_grads(self) -> list[torch.Tensor]:
        """The captured dense gradients of the sparse weights (summed over micro-steps, averaged over ranks).

        The methods' read-only view (zeros where nothing was captured): read the tensors, never modify them in place
        (on one process they are the controller's accumulators, not copies). Collective with several processes: call
        it on every rank.
        """
        grads = [g if g is not None else torch.zeros_like(t.param, dtype=torch.float32)
                 for g, t in zip(self._capture.grads, self.targets)]
        # FSDP2's reduce-scatter averaged the shards already
        return grads if self._sharded else _sync.average_over_ranks(grads)

    def clear_dense_grads(self) -> None:
        """Forget the captured dense gradients (a method that consumes them every step, like SNFS, calls this)."""
        self._capture.clear()
