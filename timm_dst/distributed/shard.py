"""Sharding a model for training with FSDP2: which modules to ``fully_shard``, and a model built on the meta device
and materialised shard by shard, so that no rank ever holds the whole model.

The order that works (docs/distributed.md): :func:`shard_model` (the units, then the root), the optimizer, then
``create_sparsifier``. :func:`build_meta_sharded` builds the model on the meta device, shards it, gives every rank its
own rows (``to_empty``) and initialises them with the model's own initialisation (timm's ``init_weights``), the random
draws made on the shards (``DTensor`` random ops: each rank draws its own rows).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ['UNIT_CONTAINERS', 'shard_units', 'shard_model', 'materialize_sharded', 'build_meta_sharded',
           'MetaInitError', 'UnitsError']

#: The attributes whose children timm's models repeat (transformer blocks, CNN stages, Swin / MLP-mixer layers), in
#: the order they are looked for: the children of the first one found are the units sharded by default.
UNIT_CONTAINERS = ('blocks', 'stages', 'layers')

_INT_SENTINEL = -(2 ** 31) + 7  # written into integer tensors before initialisation; never a valid index or count


class UnitsError(ValueError):
    """Module patterns (``--fsdp-modules``) that match no module of the model."""


class MetaInitError(RuntimeError):
    """The model cannot be built on the meta device and initialised shard by shard (it has no ``init_weights``, its
    constructor computes values from tensors, or its initialisation left tensors unset)."""


def _pattern(text: str) -> re.Pattern:
    """A module-name pattern: ``*`` matches one name component (``blocks.*``), ``**`` any number of them."""
    parts = [re.escape(p) for p in text.split('**')]
    return re.compile('.*'.join(p.replace(r'\*', r'[^.]+') for p in parts))


def shard_units(model: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """The names of the modules to ``fully_shard`` before the root.

    Args:
        model: The model.
        patterns: Module names or patterns (``*`` matches one name component: ``blocks.*``, ``stages.*.blocks.*``).
            Without them: the children of the first of :data:`UNIT_CONTAINERS` the model has (``blocks.0``,
            ``blocks.1``, ...), else its ``layer1``, ``layer2``, ... (timm's ResNets), else none (the root alone is
            sharded).

    Raises:
        UnitsError: A pattern matches no module (the message names it and shows module names).
    """
    names = [n for n, _ in model.named_modules() if n]
    if patterns:
        chosen: list[str] = []
        for text in patterns:
            rx = _pattern(text)
            hits = [n for n in names if rx.fullmatch(n)]
            if not hits:
                tops = ', '.join(n for n, _ in model.named_children())
                raise UnitsError(f'--fsdp-modules {text!r} matches no module of the model (its top-level modules: '
                                 f'{tops}; use dotted names, * for one component, e.g. blocks.*)')
            chosen += [n for n in hits if n not in chosen]
        return chosen
    for attr in UNIT_CONTAINERS:
        container = getattr(model, attr, None)
        if isinstance(container, nn.Module) and any(True for _ in container.children()):
            return [f'{attr}.{n}' for n, _ in container.named_children()]
    return [n for n, _ in model.named_children() if re.fullmatch(r'layer\d+', n)]  # ResNet's layer1 .. layer4


def shard_model(model: nn.Module, units: Sequence[str], **fully_shard_kwargs: Any) -> None:
    """``fully_shard`` each unit (the innermost first), then the root, in place.

    Args:
        model: The model (whole, or on the meta device).
        units: Module names (:func:`shard_units`).
        fully_shard_kwargs: Passed to every ``fully_shard`` call (``mesh``, ``mp_policy``, ``reshard_after_forward``).
    """
    from torch.distributed.fsdp import fully_shard
    modules = dict(model.named_modules())
    for name in sorted(units, key=lambda n: -n.count('.')):
        fully_shard(modules[name], **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, 'to_local') else t


@torch.no_grad()
def materialize_sharded(model: nn.Module, device: torch.device | str) -> list[str]:
    """Give a sharded model built on the meta device its memory (each rank its own rows) and initialise it.

    Every tensor is first filled with a marker (NaN, or an impossible integer); then every module's
    ``reset_parameters`` runs (torch's default initialisations, BatchNorm's statistics), the model's ``init_weights``
    (timm's own initialisation), and every module's ``init_non_persistent_buffers`` (timm's computed buffers). Random
    draws on sharded parameters are ``DTensor`` random ops: each rank draws its own rows. A collective: call it on
    every rank.

    Returns:
        The names of the parameters and buffers that the initialisation left unset on some rank (empty when the model
        is whole and initialised).
    """
    model.to_empty(device=device)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for _, t in tensors:
        local = _local(t)
        if local.is_floating_point() or local.is_complex():
            local.fill_(float('nan'))
        elif local.dtype != torch.bool:
            local.fill_(_INT_SENTINEL)
    for m in model.modules():
        if m is not model and callable(getattr(m, 'reset_parameters', None)):
            m.reset_parameters()
    init: Callable[[], Any] | None = getattr(model, 'init_weights', None)
    if callable(init):
        init()
    for m in model.modules():
        if callable(getattr(m, 'init_non_persistent_buffers', None)):
            m.init_non_persistent_buffers()
    unset = torch.zeros(len(tensors), dtype=torch.int32)
    for i, (_, t) in enumerate(tensors):
        local = _local(t)
        if local.is_floating_point() or local.is_complex():
            unset[i] = int(torch.isnan(local).any())
        elif local.dtype != torch.bool:
            unset[i] = int((local == _INT_SENTINEL).any())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(unset, op=dist.ReduceOp.MAX)
    return [name for (name, _), u in zip(tensors, unset.tolist()) if u]


def build_meta_sharded(create: Callable[..., nn.Module], device: torch.device | str,
                       units: Callable[[nn.Module], Sequence[str]], **fully_shard_kwargs: Any) -> nn.Module:
    """Build a model on the meta device, shard it and materialise it shard by shard (:func:`materialize_sharded`).

    Args:
        create: Builds the model when called with ``device='meta'`` (``functools.partial(timm.create_model, name,
            ...)``; timm 1.0.20 and later pass ``device`` to the layers).
        device: This rank's device.
        units: The units to shard, given the model (:func:`shard_units`).
        fully_shard_kwargs: Passed to ``fully_shard``.

    Raises:
        MetaInitError: The model cannot be built or initialised this way (build it whole, then :func:`shard_model`).
    """
    try:
        model = create(device='meta')
    except (TypeError, NotImplementedError, RuntimeError, ValueError) as e:
        raise MetaInitError(f'it cannot be built on the meta device ({type(e).__name__}: {str(e)[:120]})') from None
    if not callable(getattr(model, 'init_weights', None)):
        raise MetaInitError(f'{type(model).__name__} has no init_weights() to initialise it after materialising')
    if any(p.device.type != 'meta' for p in model.parameters()):
        raise MetaInitError('its constructor did not build every parameter on the meta device')
    shard_model(model, units(model), **fully_shard_kwargs)
    try:
        unset = materialize_sharded(model, device)
    except (TypeError, NotImplementedError, RuntimeError) as e:
        raise MetaInitError(f'its initialisation does not run on shards ({type(e).__name__}: {str(e)[:120]})') \
            from None
    if unset:
        more = f' and {len(unset) - 3} more' if len(unset) > 3 else ''
        raise MetaInitError(f'its init_weights() left {", ".join(unset[:3])}{more} unset')
    return model
