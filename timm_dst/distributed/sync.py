"""Rank sync of the controller: agreed checks, counts over shards, rank 0's topology on every rank, averaged gradients.

Every function here is a collective under ``torch.distributed`` (call it on every rank, in the same order) and a
plain local computation on one process. ``DTensor`` shards (FSDP2) are counted over all their shards. Layer 0: this
module imports only :mod:`torch` and :mod:`timm_dst.distributed.fsdp`, never the controller (docs/design.md).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .fsdp import full, is_dtensor

__all__ = ['world_size', 'all_finite', 'count_nonzero', 'count_nonfinite', 'broadcast_indices', 'broadcast_masks',
           'average_over_ranks', 'sum_over_ranks_']


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_finite(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether every entry of ``tensors`` is finite (one fused norm per tensor, one device sync). Under
    ``torch.distributed`` the answer is agreed by all ranks (a collective: call it on every rank), so that all ranks
    skip or run the same updates."""
    tensors = [t.to_local() if is_dtensor(t) else t for t in tensors]  # FSDP2 shards: agreed below
    ok = torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all() if tensors else None
    if world_size() > 1:
        flag = torch.ones(1, device=device) if ok is None else ok.to(device=device, dtype=torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)
    return True if ok is None else bool(ok)


def count_nonzero(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Non-zero (True) entries of each tensor; a ``DTensor``'s over all its shards (a collective: call it on every
    rank). Meta tensors count 0."""
    out = [0] * len(tensors)
    for sharded in (False, True):
        idx = [i for i, x in enumerate(tensors) if is_dtensor(x) == sharded and not x.is_meta]
        if idx:
            stats = torch.stack([torch.count_nonzero(tensors[i]).to(tensors[idx[0]].device) for i in idx])
            for i, c in zip(idx, full(stats).tolist()):
                out[i] = int(c)
    return out


def count_nonfinite(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Non-finite (NaN / inf) entries of each tensor (integer tensors count 0; a collective for ``DTensor`` s)."""
    return count_nonzero([~torch.isfinite(x) for x in tensors])


def broadcast_indices(indices: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Rank 0's index sets on every rank (sizes first, then one concatenated tensor on ``device``)."""
    if world_size() <= 1:
        return indices
    sizes = torch.tensor([x.numel() for x in indices], dtype=torch.long, device=device)
    dist.broadcast(sizes, src=0)
    if dist.get_rank() == 0:
        flat = torch.cat([x.to(device) for x in indices])
    else:
        flat = torch.empty(int(sizes.sum()), dtype=torch.long, device=device)
    dist.broadcast(flat, src=0)
    return list(torch.split(flat, sizes.tolist()))


def broadcast_masks(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Make masks bit-identical on all ranks (rank 0's win)."""
    if world_size() <= 1:
        return masks
    flat = torch.cat([m.flatten() for m in masks]).to(torch.uint8)
    dist.broadcast(flat, src=0)
    flat = flat.bool()
    return [c.view_as(m) for c, m in zip(torch.split(flat, [m.numel() for m in masks]), masks)]


def average_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean of each tensor over the ranks (one all-reduce of their concatenation); the tensors themselves on one
    process."""
    if world_size() <= 1:
        return tensors
    flat = torch.cat([g.flatten() for g in tensors])
    dist.all_reduce(flat)
    flat.div_(world_size())
    return [c.view(g.shape) for c, g in zip(torch.split(flat, [g.numel() for g in tensors]), tensors)]


def sum_over_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (nothing on one process)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor
