"""The writer: the one place that writes masks, weights and optimizer state (invariants 2 and 3).

An update arrives as flat index sets (drops and grows per tensor) and is written with O(k) index writes; whole new
masks (initial topology, baselines, a restored state) are written as masks. Every write zeroes the weights and the
optimizer-state tensors shaped like them where a position left or joined the mask (a position dropped and regrown in
the same update did neither: its weight and state stay, as in the reference implementations), extends the explored
masks (R_s) and keeps the active counts exact. Kernel placement (CSR / block kernels for very sparse linear layers)
follows every count change. This module imports the FSDP2 helpers, rank sync and the mask glue; never the controller.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..distributed import fsdp as _fsdp
from ..distributed.fsdp import flat_fill_
from ..distributed.sync import sum_over_ranks_
from .masks import refresh_weight

__all__ = ['Writer']


class Writer:
    """Writes masks, weights and optimizer state of the sparse tensors.

    Attributes:
        warned_state: The warning about optimizer state that cannot be reset at single positions was given.
    """

    def __init__(self) -> None:
        self.warned_state = False

    def state_tensors(self, optimizer: torch.optim.Optimizer, t: Any) -> list[torch.Tensor]:
        """Optimizer-state tensors shaped like a sparse weight (momentum, Adam moments, ...).

        State of another shape (Adafactor's factored row / column statistics) cannot be reset at single positions: a
        warning says so once.
        """
        state = optimizer.state.get(t.param) or {}
        out = []
        for key, v in state.items():
            if not torch.is_tensor(v) or not v.is_floating_point():
                continue
            if v.shape == t.param.shape:
                out.append(v)
            elif v.dim() >= 1 and not self.warned_state:
                self.warned_state = True
                warnings.warn(
                    f'timm_dst: optimizer state {key!r} of {t.name} (shape {tuple(v.shape)}, weight '
                    f'{tuple(t.param.shape)}) cannot be reset at grown positions ({type(optimizer).__name__}): '
                    'grown weights still start at zero and masked weights stay zero, but their second-moment '
                    'statistics carry history', stacklevel=4)
        return out

    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer, targets: Sequence[Any],
                             keep: list[torch.Tensor]) -> None:
        """Zero every optimizer-state tensor shaped like a sparse weight outside ``keep`` (momentum, Adam moments);
        a fill, not a multiply, so NaN there becomes zero too."""
        for t, k in zip(targets, keep):
            for value in self.state_tensors(optimizer, t):
                value.masked_fill_(~k, 0.0)

    def zero_masked(self, optimizer: torch.optim.Optimizer, targets: Sequence[Any]) -> None:
        """Masked weights and their optimizer state back to zero (a fill: NaN there becomes zero too)."""
        for t in targets:
            t.param.masked_fill_(~t.mask, 0.0)
        self.zero_optimizer_state(optimizer, targets, [t.mask for t in targets])

    def apply_update(self, optimizer: torch.optim.Optimizer, targets: Sequence[Any], explored: list[torch.Tensor],
                     counts: list[int], explored_counts: list[int], drops: list[torch.Tensor],
                     grows: list[torch.Tensor], sharded: bool) -> None:
        """Install an update given as flat index sets: O(k) writes to masks, weights and optimizer state; ``counts``
        and ``explored_counts`` are updated in place."""
        newly = []
        for i, (t, drop, grow) in enumerate(zip(targets, drops, grows)):
            flat_fill_(t.mask, drop, False)  # flat_fill_: masks and weights may be channels_last
            flat_fill_(t.mask, grow, True)
            # dropped weights go to zero and grown ones start at zero, except a position dropped and regrown in the
            # same update: it never left the mask, so its weight and optimizer state stay (as in the references)
            reset = torch.cat([drop[~torch.isin(drop, grow)], grow[~torch.isin(grow, drop)]])
            flat_fill_(t.param.detach(), reset, 0.0)
            for value in self.state_tensors(optimizer, t):
                flat_fill_(value, reset, 0.0)
            if sharded:  # this rank's part; summed over the ranks below
                newly.append((~_fsdp.local_values_at(explored[i], grow)).sum())
            else:
                newly.append((~explored[i].reshape(-1)[grow]).sum())
            flat_fill_(explored[i], grow, True)
            counts[i] += grow.numel() - drop.numel()
            refresh_weight(t.module, t.param_name)
        if newly:
            newly = torch.stack(newly)
            if sharded:
                sum_over_ranks_(newly)
            for i, c in enumerate(newly.tolist()):
                explored_counts[i] += int(c)

    def apply_masks(self, optimizer: torch.optim.Optimizer, targets: Sequence[Any], explored: list[torch.Tensor],
                    new: list[torch.Tensor], sharded: bool) -> None:
        """Install whole new masks (initial topology, baselines): zero what changed and its optimizer state (the
        caller recounts)."""
        if sharded:
            new = [m if _fsdp.is_dtensor(m) else _fsdp.shard_like(m, t.mask) for m, t in zip(new, targets)]
        survivors = []
        for i, (t, m) in enumerate(zip(targets, new)):
            survivors.append(t.mask & m)
            t.mask.copy_(m)
            t.param.mul_(survivors[-1])
            refresh_weight(t.module, t.param_name)
            explored[i] |= m
        self.zero_optimizer_state(optimizer, targets, survivors)

    def take_over(self, optimizer: torch.optim.Optimizer, targets: Sequence[Any], explored: list[torch.Tensor]) -> None:
        """Make weights, explored masks and optimizer state agree with masks written from outside (the caller
        recounts)."""
        for i, t in enumerate(targets):
            t.param.masked_fill_(~t.mask, 0.0)  # a fill, not a multiply: NaN * 0 is NaN
            if explored[i].device != t.mask.device:
                explored[i] = explored[i].to(t.mask.device)
            explored[i] |= t.mask
            refresh_weight(t.module, t.param_name)
        self.zero_optimizer_state(optimizer, targets, [t.mask for t in targets])

    def restore(self, optimizer: torch.optim.Optimizer, targets: Sequence[Any], explored: list[torch.Tensor],
                masks: list[torch.Tensor], new_explored: list[torch.Tensor]) -> None:
        """Write checked masks and explored masks of a restored state (whole tensors or shards, into either)."""
        for i, (t, mask, e) in enumerate(zip(targets, masks, new_explored)):
            _fsdp.copy_into_(t.mask, mask)  # a whole tensor or a shard, into either
            t.param.masked_fill_(~t.mask, 0.0)
            refresh_weight(t.module, t.param_name)
            _fsdp.copy_into_(explored[i], e)
        self.zero_optimizer_state(optimizer, targets, [t.mask for t in targets])

    @staticmethod
    def recount(targets: Sequence[Any], explored: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """Active and explored positions of each tensor (one device sync; shards summed over the ranks)."""
        stats = torch.stack([torch.count_nonzero(x) for x in [t.mask for t in targets] + explored])
        stats = _fsdp.full(stats).tolist()  # sharded: partial counts, summed over the ranks here
        n = len(targets)
        return [int(c) for c in stats[:n]], [int(c) for c in stats[n:]]

    @staticmethod
    def place_kernels(targets: Sequence[Any], dst_masks: Sequence[Any], counts: list[int], max_density: float) -> None:
        """Sparse kernels on the linear layers whose budget is at most ``max_density``, none elsewhere."""
        for t, dst_mask, count in zip(targets, dst_masks, counts):
            dst_mask.install_sparse_kernels(t.module, max_density, count)
