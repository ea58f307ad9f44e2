"""Budgets and initial masks: each sparse tensor's active count, and masks of given counts at the highest scores.

Counts are exact integers (:func:`~timm_dst.core.distributions.layer_counts`), rounded to whole units of each
tensor's selector where a structure applies (docs/structured.md). The controller's ``layer_budgets``, ``topk_masks``
and ``global_topk_masks`` (the methods' surface) call these. This module imports the distributions, the structure's
rounding, the selectors and the FSDP2 helpers; never the controller.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..distributed import fsdp as _fsdp
from .distributions import layer_counts
from .select import ElementSelector, topk_indices
from .structure import Structure, quantize_counts

__all__ = ['layer_budgets', 'topk_masks', 'global_topk_masks', 'initial_masks', 'warn_empty']


def layer_budgets(targets: Sequence[Any], selectors: Sequence[ElementSelector], structure: Structure | None,
                  distribution: str, sparsity: float) -> list[int]:
    """Active count of each sparse tensor at ``sparsity`` (see :meth:`Sparsifier.layer_budgets`)."""
    shapes = [t.shape for t in targets]
    if structure is None:
        return layer_counts(shapes, sparsity, distribution)
    nm = structure.kind == 'n:m'
    desired = layer_counts(shapes, sparsity, 'uniform' if nm else distribution)
    quanta = [sel.quantum for sel in selectors]
    low = [q if d > 0 else 0 for q, d in zip(quanta, desired)]
    high = [t.numel for t in targets]
    if nm and abs(sparsity - (1 - structure.density)) < 1e-9:  # fitting tensors: exactly N per group
        for i, sel in enumerate(selectors):
            if sel.layout is not None:
                desired[i] = low[i] = high[i] = sel.cap
    counts, _ = quantize_counts(desired, quanta, low, high, sum(desired))
    return counts


def topk_masks(targets: Sequence[Any], selectors: Sequence[ElementSelector], scores: list[torch.Tensor],
               counts: list[int]) -> list[torch.Tensor]:
    """Per tensor, a mask of ``counts[i]`` active weights at the highest ``scores[i]``, in whole units."""
    return [sel.topk_mask(score, count, t.shape) for t, sel, score, count in zip(targets, selectors, scores, counts)]


def global_topk_masks(targets: Sequence[Any], selectors: Sequence[ElementSelector], structure: Structure | None,
                      scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Masks keeping the global top-``k`` of per-tensor scores (see :meth:`Sparsifier.global_topk_masks`)."""
    flat = torch.cat([_fsdp.full(s.detach()).flatten().float() for s in scores])
    if not bool(torch.isfinite(flat).all()):
        raise ValueError('scores of the initial mask are not finite (NaN / inf in the weights or in the gradients '
                         'of the scoring batches): check the weights given (lth_trained_state) or the batches '
                         '(snip_batches)')
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    out, offset = [], 0
    for s in scores:
        out.append(keep[offset:offset + s.numel()].view(s.shape))
        offset += s.numel()
    if structure is None:
        return out
    # structured: the global ranking sets each tensor's count (rounded to whole units), the units are then
    # chosen inside each tensor by their pooled score
    desired = [int(c) for c in torch.stack([torch.count_nonzero(m) for m in out]).tolist()]
    quanta = [sel.quantum for sel in selectors]
    total_cap = sum(sel.cap for sel in selectors)
    high = [sel.cap if k <= total_cap else t.numel for sel, t in zip(selectors, targets)]
    low = [min(q, h) if d > 0 else 0 for q, d, h in zip(quanta, desired, high)]
    counts, _ = quantize_counts(desired, quanta, low, high, k)
    return topk_masks(targets, selectors, [s.detach().float() for s in scores], counts)


def initial_masks(targets: Sequence[Any], selectors: Sequence[ElementSelector], counts: list[int], mask_init: str,
                  cpu_gen: torch.Generator, sharded: bool,
                  global_topk: Callable[[list[torch.Tensor], int], list[torch.Tensor]]) -> list[torch.Tensor]:
    """The initial topology when the method has none of its own (``mask_init``): random or magnitude scores per
    tensor at its count, or one global top-k of |w| (``global_topk``)."""
    if mask_init == 'global-magnitude':
        scores = [_fsdp.full(t.param.detach()).abs() for t in targets]
        return global_topk(scores, sum(counts))
    masks = []
    for t, count, sel in zip(targets, counts, selectors):
        p = t.param
        if mask_init == 'magnitude':
            score = _fsdp.full(p.detach()).abs().flatten()
        else:
            score = torch.rand(p.numel(), generator=cpu_gen).to(p.device)
        if sel.layout is not None:  # whole units: blocks by summed score, the same count in every group
            masks.append(sel.topk_mask(score.view(t.shape), count, t.shape))
            continue
        mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        mask[topk_indices(score, count)] = True
        # sharded: each rank keeps its rows at once (one tensor's whole mask at a time)
        masks.append(_fsdp.shard_like(mask, p) if sharded else mask.view(t.shape))
    return masks


def warn_empty(targets: Sequence[Any], counts: list[int], sparsity: float) -> None:
    """One warning naming the sparse tensors whose budget is zero (the network is disconnected there)."""
    empty = [t.name for t, c in zip(targets, counts) if c == 0]
    if empty:
        warnings.warn(f'timm_dst: {len(empty)} sparse tensor(s) get no active weight at sparsity={sparsity} '
                      f'({", ".join(empty[:5])}{" ..." if len(empty) > 5 else ""}): the network is disconnected '
                      "there; lower sparsity, use distribution='erk', or exclude them", stacklevel=5)
