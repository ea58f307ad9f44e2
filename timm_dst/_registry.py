"""Method registry: ``register_method``, ``list_methods``, ``create_sparsifier`` (timm-style factory)."""
from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

__all__ = ['register_method', 'list_methods', 'is_method', 'method_defaults', 'create_method', 'create_sparsifier']


@dataclass
class _MethodEntry:
    cls: type
    defaults: dict[str, Any] = field(default_factory=dict)


_method_entries: dict[str, _MethodEntry] = {}


def register_method(name: str, cls: type, **defaults: Any) -> type:
    """Register ``cls`` under ``name`` with controller / method keyword defaults (one entry per name).

    Args:
        name: Public method name (``'rigl-itop'``).
        cls: A :class:`~timm_dst.methods.SparseMethod` subclass.
        **defaults: Defaults for :class:`~timm_dst.sparsifier.Sparsifier` keywords (``update_interval``, ...) and for
            the method's own constructor keywords; the user's arguments override them.
    """
    if name in _method_entries:
        raise ValueError(f'method name {name!r} is already registered')
    _method_entries[name] = _MethodEntry(cls=cls, defaults=dict(defaults))
    return cls


def list_methods(filter: str = '') -> list[str]:
    """Registered method names, sorted; ``filter`` is a glob pattern."""
    names = sorted(_method_entries)
    return [n for n in names if fnmatch.fnmatchcase(n, filter)] if filter else names


def is_method(name: str) -> bool:
    return name in _method_entries


def method_defaults(name: str) -> dict[str, Any]:
    """The defaults a method name brings (copy)."""
    return dict(_get_entry(name).defaults)


def _get_entry(name: str) -> _MethodEntry:
    if name not in _method_entries:
        raise ValueError(f'method={name!r} is not known; accepted: {", ".join(list_methods())}')
    return _method_entries[name]


def _split_kwargs(cls: type, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from .sparsifier import Sparsifier
    ctrl_params = set(inspect.signature(Sparsifier.__init__).parameters) - {'self', 'model', 'optimizer', 'method'}
    method_params = set(inspect.signature(cls.__init__).parameters) - {'self', 'args', 'kwargs'}
    ctrl = {k: v for k, v in kwargs.items() if k in ctrl_params}
    meth = {k: v for k, v in kwargs.items() if k in method_params}
    unknown = sorted(set(kwargs) - set(ctrl) - set(meth))
    if unknown:
        accepted = ', '.join(sorted(ctrl_params | method_params))
        raise ValueError(f'unknown argument(s) {", ".join(unknown)} for method {cls.__name__}; accepted: {accepted}')
    return ctrl, meth


def create_method(name: str, **kwargs: Any):
    """Build the method object for ``name`` (its own keywords only)."""
    entry = _get_entry(name)
    return entry.cls(**kwargs)


def create_sparsifier(model: nn.Module, optimizer: Any, method: str = 'rigl-itop', **kwargs: Any):
    """Make ``model`` sparse and keep it so while ``optimizer`` steps.

    Args:
        model: Any model (timm or not). Call before ``accelerator.prepare`` / ``torch.compile`` / EMA creation.
        optimizer: Its optimizer (plain torch or wrapped, e.g. by Accelerate).
        method: A registered name, see :func:`list_methods`.
        **kwargs: :class:`~timm_dst.sparsifier.Sparsifier` keywords (``sparsity``, ``distribution``,
            ``update_interval``, ``total_steps``, ``prune_rate``, ``prune_rate_schedule``, ``update_end``,
            ``grow_unexplored_first``, ``include``, ``exclude``, ``seed``, ...) and the method's own
            (``dsr_np``, ``snfs_momentum``, ...). Values left out take the method's registered defaults.

    Returns:
        The :class:`~timm_dst.sparsifier.Sparsifier`, already attached.
    """
    from .sparsifier import Sparsifier
    if not isinstance(method, str):
        raise ValueError(f'method={method!r} must be a name; accepted: {", ".join(list_methods())}')
    entry = _get_entry(method)
    merged = {**entry.defaults, **{k: v for k, v in kwargs.items()}}
    ctrl, meth = _split_kwargs(entry.cls, merged)
    return Sparsifier(model, optimizer, entry.cls(**meth), method_name=method, **ctrl)
