"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support: masks sharded like their weights, exact updates.

On a model sharded with ``fully_shard`` every parameter is a ``DTensor`` whose rows (dim 0) are split over the ranks.
The sparsifier then keeps each mask and each explored-positions mask as a ``DTensor`` with the weight's placements,
so the DST state per rank falls with the number of ranks. What is gathered when (docs/distributed.md):

* **forward / backward**: nothing extra. Masked weights are exactly zero (invariant 2), so the forward needs no
  mask; FSDP2 all-gathers ``<name>_orig`` as it does any parameter and the prune hook aliases ``<name>`` to the
  unsharded parameter. The gradient is masked on the shard, right after FSDP2's reduce-scatter (FSDP2 runs the
  sharded parameter's post-accumulate-grad hooks there), before gradient clipping and the optimizer see it.
* **dense gradients** (RigL, SNFS): the reduce-scattered shard is captured before it is masked: already averaged
  over the ranks, so no further collective.
* **topology update**: one tensor at a time, the shards of its mask, scores and explored mask are gathered
  (``full_tensor``), the unsharded update logic runs on every rank identically (same generator state, same
  inputs, so the same result; rank 0's index sets are still broadcast), and each rank writes its own rows.
  Transient memory: one tensor's full mask, score and explored mask.

Only 1-D meshes with ``Shard(0)`` placements (FSDP2's default) are supported; HSDP (2-D meshes) and tensor
parallel placements are refused by :func:`check_sharded_targets`.
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ['is_dtensor', 'full', 'shard_like', 'check_sharded_targets', 'adopt_renamed_params', 'rename_fsdp_params',
           'flat_fill_sharded_',
           'local_values_at', 'copy_into_', 'ShardedCapture', 'fsdp_modules']


@functools.cache
def _dtensor_cls() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (a parameter or buffer of a ``fully_shard`` model)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(x, cls)


def full(x: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``x.full_tensor()`` for a ``DTensor`` (a collective: call it on every rank), else ``x``."""
    return x.full_tensor() if is_dtensor(x) else x


def _row_range(like: torch.Tensor) -> tuple[int, int]:
    """First row and row count of this rank's shard of the ``Shard(0)`` DTensor ``like``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    local_shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return int(offset[0]), int(local_shape[0])


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the whole, the same on every rank) as a DTensor placed like the DTensor ``like``: this rank keeps
    a copy of its own rows only."""
    from torch.distributed.tensor import DTensor
    start, rows = _row_range(like)
    local = tensor.reshape(like.shape)[start:start + rows].clone()
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=local.new_empty(like.shape, device='meta').stride())


def _local_index(like: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The entries of the global flat ``index`` (row-major over ``like.shape``) that fall in this rank's rows, as
    flat indices into the local shard."""
    start, rows = _row_range(like)
    row = math.prod(like.shape[1:])
    lo, hi = start * row, (start + rows) * row
    inside = index[(index >= lo) & (index < hi)]
    return inside - lo


def flat_fill_sharded_(tensor: torch.Tensor, index: torch.Tensor, value: float | bool) -> torch.Tensor:
    """``flat_fill_`` for a ``Shard(0)`` DTensor: the positions of the global flat ``index`` held by this rank."""
    flat_fill_(tensor.to_local(), _local_index(tensor, index), value)
    return tensor


def local_values_at(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The values of this rank's shard of ``tensor`` at those entries of the global flat ``index`` it holds."""
    return tensor.to_local().reshape(-1)[_local_index(tensor, index)]


def copy_into_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` where either may be a DTensor: a whole ``src`` fills this rank's rows of a sharded ``dst``;
    a sharded ``src`` is gathered into a whole ``dst`` (a collective)."""
    if is_dtensor(dst) and not is_dtensor(src):
        start, rows = _row_range(dst)
        dst.to_local().copy_(src.reshape(dst.shape)[start:start + rows].to(dst.device))
    elif is_dtensor(src) and not is_dtensor(dst):
        dst.copy_(src.full_tensor().to(dst.device))
    else:
        dst.copy_(src.to(dst.device) if not is_dtensor(src) else src)
    return dst


def check_sharded_targets(targets: list[Any]) -> bool:
    """Whether the sparse tensors are FSDP2 shards (all or none), refusing placements this module cannot update.

    Raises:
        ValueError: Some sparse tensors are DTensors and some are not, or a DTensor is not sharded on dim 0 over a
            1-D mesh (HSDP's 2-D mesh, tensor parallel), or a tied weight is shared by several modules.
    """
    sharded = [t for t in targets if is_dtensor(t.param)]
    if not sharded:
        return False
    if len(sharded) != len(targets):
        plain = [t.name for t in targets if not is_dtensor(t.param)]
        raise ValueError(f'model: {", ".join(plain[:5])} {"is" if len(plain) == 1 else "are"} not sharded while '
                         f'{sharded[0].name} is: fully_shard the whole model (its blocks, then the model) before '
                         'create_sparsifier, or exclude= the unsharded tensors')
    from torch.distributed.tensor import Shard
    for t in sharded:
        p = t.param
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f'model: {t.name} is a DTensor placed {tuple(p.placements)} over a {p.device_mesh.ndim}-D mesh; '
                'timm_dst supports FSDP2 shards (fully_shard over a 1-D mesh, Shard(0)) only, not HSDP or tensor '
                'parallel placements')
    return True


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def adopt_renamed_params(model: nn.Module, targets: list[Any], check_only: bool = False) -> None:
    """Tell FSDP2 that each sparse parameter ``<name>`` now lives on its module as ``<name>_orig``.

    ``torch.nn.utils.prune`` renames the parameter; FSDP2 sets the unsharded parameter on the module by its name
    before each forward and the sharded one after, so without this it would bring back a ``<name>`` parameter next
    to ``<name>_orig``. This edits FSDP2's per-parameter module record (``FSDPParam._module_info``, private API of
    torch's ``fully_shard``: checked, with a clear error if it is not there).
    """
    rename_fsdp_params(model, [(t.module, t.param_name) for t in targets], suffix='_orig',
                       names=[t.name for t in targets], check_only=check_only)


def rename_fsdp_params(model: nn.Module, items: list[tuple[nn.Module, str]], suffix: str,
                       names: list[str] | None = None, check_only: bool = False) -> None:
    """Set FSDP2's name of each ``module.<name>`` parameter to ``<name><suffix>`` (see :func:`adopt_renamed_params`;
    ``suffix=''`` after :func:`~timm_dst.fold_masks` gives the parameter its own name back)."""
    by_param = {}
    for module in fsdp_modules(model):
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in (group.fsdp_params if group is not None else []):
            by_param[id(fsdp_param.sharded_param)] = fsdp_param
    for n, (module, name) in enumerate(items):
        label = names[n] if names is not None else f'{type(module).__name__}.{name}'
        param = module._parameters.get(name + '_orig', module._parameters.get(name))
        fsdp_param = by_param.get(id(param))
        info = getattr(fsdp_param, '_module_info', None)
        if info is None or info.module is not module or info.param_name not in (name, name + '_orig'):
            raise ValueError(f'model: {label} is a DTensor but no fully_shard module of this model manages it '
                             '(pass the model fully_shard was applied to, after sharding it)')
        if info.shared_modules:
            raise ValueError(f'model: {label} is a weight tied to other modules; tied sparse weights are not '
                             'supported under FSDP2: exclude= it')
        if not check_only:
            info.param_name = name + suffix


class ShardedCapture:
    """The dense-gradient capture of sharded weights (FSDP2), an implementation of
    :class:`~timm_dst.core.capture.GradCapture`: it owns one buffer per sparse tensor (``grads``, ``DTensor`` shards
    placed like the gradients) and, while capturing, gives each tensor's :class:`~timm_dst.core.masks.DSTMask` a
    :class:`_ShardHook` that the mask calls around the masking of the reduce-scattered gradient shard (already averaged
    over the ranks, so no further collective).

    The capture window is the lifetime of the ``.grad`` object: when FSDP2 added this backward's shard to the
    ``.grad`` the capture saw last (gradient accumulation with a reduce-scatter per micro-step: FSDP2 adds in place
    into the existing gradient), the capture adds it too: at inactive positions the masked ``.grad`` held zero, so its
    value is the new contribution; at active ones ``.grad`` holds the same sum as the capture. ``zero_grad()`` (set to
    None, torch's default) starts a new window. Unlike the unsharded capture, gradients zeroed in place
    (``set_to_none=False``) are not told apart from an accumulation: FSDP2's gradient shards are views of one buffer
    per group whose version counter every parameter of the group bumps.
    """

    def __init__(self, n: int):
        self.grads: list[torch.Tensor | None] = [None] * n
        self.handles: list[Any] = []

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def start(self, targets: list[Any], dst_masks: list[Any]) -> None:
        self.stop()
        for i, (t, dst_mask) in enumerate(zip(targets, dst_masks)):
            dst_mask.capture = _ShardHook(self, t, i)
            self.handles.append(CaptureHandle(dst_mask))

    def stop(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def clear(self) -> None:
        self.grads = [None] * len(self.grads)

    def load(self, grads: list[torch.Tensor | None]) -> None:
        self.grads = list(grads)


class _ShardHook:
    """One sharded tensor's part of a :class:`ShardedCapture`, called by its mask before and after masking."""

    def __init__(self, capture: ShardedCapture, target: Any, i: int):
        self.capture, self.target, self.i = weakref.ref(capture), target, i
        self.mark: weakref.ref | None = None

    @torch.no_grad()
    def before(self, param: torch.Tensor) -> None:
        capture = self.capture()
        if capture is None or param.grad is None:
            return
        from torch.distributed.tensor import DTensor
        grad = param.grad.to_local()
        held, mark = capture.grads[self.i], self.mark
        if held is not None and mark is not None and mark() is grad:
            local = held.to_local()
            mask = self.target.mask.to_local()
            local.copy_(torch.where(mask, grad.float(), local + grad.float()))
        else:
            g = param.grad
            capture.grads[self.i] = DTensor.from_local(grad.detach().float().clone(), g.device_mesh, g.placements,
                                                       run_check=False, shape=g.shape, stride=g.stride())

    @torch.no_grad()  # to_local() with grad mode on returns a new view each call; without, the local tensor itself
    def after(self, param: torch.Tensor) -> None:
        self.mark = weakref.ref(param.grad.to_local()) if param.grad is not None else None


class CaptureHandle:
    """Removable handle of a :class:`_ShardHook` installed on a mask."""

    def __init__(self, dst_mask: Any):
        self.dst_mask = dst_mask

    def remove(self) -> None:
        self.dst_mask.capture = None


def flat_fill_(tensor: torch.Tensor, index: torch.Tensor, value: float | bool) -> torch.Tensor:
    """``tensor.view(-1)[index] = value`` for any memory layout (``channels_last`` included), in place, O(k).

    Flat indices are in the logical (row-major) order of ``tensor.shape``; for an FSDP2 shard (a ``DTensor``) the
    positions this rank holds are written.
    """
    if is_dtensor(tensor):
        return flat_fill_sharded_(tensor, index, value)
    if tensor.is_contiguous():
        tensor.view(-1).index_fill_(0, index, value)
    elif index.numel():
        tensor.index_put_(torch.unravel_index(index, tensor.shape),
                          torch.tensor(value, dtype=tensor.dtype, device=tensor.device))
    return tensor
