"""SNIP (Lee et al. 2019): prune at initialisation by connection sensitivity, then train the fixed sparse network.

The score of a weight is ``|dL/dw * w|``, computed from one (or a few) minibatches on the dense weights at
initialisation; the global top ``round((1 - sparsity) * N)`` over all sparse tensors are kept (one-shot and global, as
in the ITOP paper's Section 5 / Appendix C), so per-tensor densities are whatever the scores give: ``distribution``
does not apply. ``snip`` is static afterwards; ``snip-set-itop`` starts from the SNIP mask and explores with SET-ITOP's
settings (ΔT 1500, P 0.5 cosine), each tensor keeping its SNIP count exactly.

The scores leave no trace on the model: gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is written),
buffers (BatchNorm running statistics) are restored and the global RNG state is forked, so SNIP neither changes a
weight nor shifts the run's random stream. With several processes the gradients are averaged over ranks (each rank
scores its own batches) and rank 0's mask is broadcast by the controller.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..core._validate import check_int, load_file
from ..core.controller import Sparsifier
from ..core.method import SparseMethod
from ._registry import register_method

__all__ = ['SNIP', 'SNIPSetITOP', 'snip_scores']

Batch = Sequence[torch.Tensor]
BatchesSource = Batch | Iterable[Batch] | str | os.PathLike


def _resolve_loss(loss_fn: Callable[..., torch.Tensor] | str | None) -> Callable[..., torch.Tensor]:
    if loss_fn is None:
        return F.cross_entropy
    if isinstance(loss_fn, str):
        fn = getattr(F, loss_fn, None)
        if fn is None or not callable(fn):
            raise ValueError(f'snip_loss_fn={loss_fn!r} is not a torch.nn.functional loss; accepted: a callable '
                             "(output, target) -> loss, or a name such as 'cross_entropy' or 'nll_loss'")
        return fn
    if not callable(loss_fn):
        raise ValueError(f'snip_loss_fn={loss_fn!r} must be a callable (output, target) -> loss, a name or None')
    return loss_fn


def _batches(batches: Any, num_batches: int | None) -> Iterable[Batch]:
    """The minibatches to score: a path to saved batches, one ``(x, y)`` pair, a list of pairs or any iterable."""
    if batches is None:
        raise ValueError('snip_batches is required: give one (input, target) batch, a list of them, or an iterable '
                         'such as the training DataLoader (with snip_num_batches), or a path to batches saved with '
                         'torch.save')
    if isinstance(batches, str | os.PathLike):
        batches = load_file(batches, 'snip_batches')
    if isinstance(batches, Sequence) and len(batches) >= 2 and torch.is_tensor(batches[0]):
        batches = [batches]  # a single (input, target) pair
    if num_batches is None:
        num_batches = len(batches) if isinstance(batches, Sequence) else 1
    if int(num_batches) < 1:
        raise ValueError(f'snip_num_batches={num_batches!r} must be >= 1')
    n = 0
    for batch in batches:
        if n >= num_batches:
            break
        if isinstance(batch, dict) or not isinstance(batch, Sequence) or len(batch) < 2:
            raise ValueError(f'snip_batches: expected (input, target) pairs, got {type(batch).__name__}')
        yield batch
        n += 1
    if n == 0:
        raise ValueError('snip_batches: no batch to score (empty iterable)')


def snip_scores(
        model: nn.Module,
        params: Sequence[torch.Tensor],
        batches: Any,
        loss_fn: Callable[..., torch.Tensor] | str | None = None,
        num_batches: int | None = None,
) -> list[torch.Tensor]:
    """Connection sensitivity ``|g * w|`` of ``params``, ``g`` the gradient of the loss averaged over the batches.

    The model runs in its current mode (train mode for a fresh model, as in the SNIP reference code). Nothing of the
    model changes: no ``.grad`` is written, buffers are restored, the global RNG state is forked.

    Args:
        model: The dense model at initialisation.
        params: The (dense) weights to score; each must be used by the forward.
        batches: One ``(input, target)`` pair, a list of pairs, an iterable (a DataLoader) or a path to batches
            saved with ``torch.save``. Inputs and targets are moved to the device of ``params[0]``.
        loss_fn: ``loss_fn(output, target)``; None = cross-entropy; a string names a ``torch.nn.functional`` loss.
        num_batches: How many batches to use; None = all of a list, one from any other iterable.

    Returns:
        One float32 score tensor per parameter.
    """
    loss = _resolve_loss(loss_fn)
    params = list(params)
    device = params[0].device
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    n = 0
    rng_devices = [device] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
        for batch in _batches(batches, num_batches):
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            value = loss(model(x), y)
            gs = torch.autograd.grad(value, [params[i] for i in wanted], allow_unused=True)
            for i, g in zip(wanted, gs):
                if g is not None:
                    grads[i].add_(g.detach().float())
            n += 1
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in saved:
                b.copy_(saved[name])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        n *= dist.get_world_size()
        grads = [c.view_as(g) for c, g in zip(torch.split(flat, [g.numel() for g in grads]), grads)]
    return [(g / n * p.detach().float()).abs() for g, p in zip(grads, params)]


class SNIP(SparseMethod):
    """Global top-k connection sensitivity at initialisation, static afterwards.

    Args:
        snip_batches: The data to score with: one ``(input, target)`` pair, a list of pairs, an iterable such as the
            training DataLoader, or a path to batches saved with ``torch.save``. Used once, at creation; the reference
            is dropped afterwards.
        snip_num_batches: How many batches to use; None = all of a list, one from any other iterable (SNIP's
            "a mini-batch of data").
        snip_loss_fn: ``loss_fn(output, target)``; None = cross-entropy (soft targets work too); a string names a
            ``torch.nn.functional`` loss.
    """

    explores = False
    init_data_arg = 'snip_batches'

    def __init__(
            self,
            snip_batches: BatchesSource | None = None,
            snip_num_batches: int | None = None,
            snip_loss_fn: Callable[..., torch.Tensor] | str | None = None,
    ):
        if snip_num_batches is not None:
            snip_num_batches = check_int('snip_num_batches', snip_num_batches, minimum=1)
        _resolve_loss(snip_loss_fn)
        self.batches = snip_batches
        self.num_batches = snip_num_batches
        self.loss_fn = snip_loss_fn

    def init_masks(self, sp: Sparsifier) -> list[torch.Tensor]:
        # called before the masks are attached: t.param is still the dense weight at initialisation
        scores = snip_scores(sp.model, [t.param for t in sp.targets], self.batches, self.loss_fn, self.num_batches)
        self.batches = None  # do not keep a DataLoader (or tensors) alive
        return sp.global_topk_masks(scores, sum(sp.counts))

    def extra_repr(self) -> str:
        return f'snip_num_batches={self.num_batches}'


class SNIPSetITOP(SNIP):
    """SNIP's mask as the starting topology, then SET exploration (magnitude drop, random growth) all run long."""

    explores = True


register_method('snip', SNIP, description='SNIP: global top-k connection sensitivity on data at init, then static',
                prune_rate_schedule='constant')
register_method('snip-set-itop', SNIPSetITOP, description='the SNIP mask, then SET-ITOP exploration',
                update_interval=1500, prune_rate=0.5, prune_rate_schedule='cosine')
