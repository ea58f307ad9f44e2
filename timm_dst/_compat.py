"""Old module paths (before the layered layout) as deprecated aliases, for one release.

``import timm_dst.plugin`` (and every other path in :data:`MOVED`) still works: it warns once with a
``DeprecationWarning`` that names the new path, and gives the new module itself, so that reading, patching and
pickling through the old name reach the real code. An old module whose names went to several new modules is a
read-through view of them (:class:`_Merged`); setting a name on it sets it on the module that defines it.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util  # noqa: F401
import sys
import types
import warnings
from typing import Any

__all__ = ['MOVED', 'install']

# old module -> its new modules, the first the primary one (where names not found elsewhere are looked up)
MOVED: dict[str, tuple[str, ...]] = {
    'timm_dst.sparsifier': ('timm_dst.core.controller',),
    'timm_dst.reparam': ('timm_dst.core.masks',),
    'timm_dst.targets': ('timm_dst.core.targets',),
    'timm_dst.distributions': ('timm_dst.core.distributions',),
    'timm_dst.schedules': ('timm_dst.core.schedules',),
    'timm_dst.structure': ('timm_dst.core.structure',),
    'timm_dst.flops': ('timm_dst.core.flops',),
    'timm_dst.compression': ('timm_dst.core.compression',),
    'timm_dst._validate': ('timm_dst.core._validate',),
    'timm_dst._seeding': ('timm_dst.core._seeding',),
    'timm_dst.methods._base': ('timm_dst.core.method',),
    'timm_dst._registry': ('timm_dst.methods._registry',),
    'timm_dst._sparse_linear': ('timm_dst.kernels.sparse_linear',),
    'timm_dst._fsdp': ('timm_dst.distributed.fsdp',),
    'timm_dst.plugin': ('timm_dst.integrations.timm',),
    'timm_dst._checkpoint': ('timm_dst.integrations.timm.checkpoint', 'timm_dst.integrations.timm.outputs'),
    'timm_dst._config': ('timm_dst.cli.config', 'timm_dst.integrations.timm.config'),
    'timm_dst._data': ('timm_dst.cli.data',),
    'timm_dst._train_build': ('timm_dst.cli.build',),
    'timm_dst._train_resume': ('timm_dst.cli.resume',),
    'timm_dst._train_lth': ('timm_dst.cli.lth',),
    'timm_dst._train_eval': ('timm_dst.cli.evaluate', 'timm_dst.integrations.timm.outputs'),
    'timm_dst._train_outputs': ('timm_dst.cli.outputs', 'timm_dst.integrations.timm.outputs'),
    'timm_dst._cli_doc': ('timm_dst.cli.doc',),
    'timm_dst.sweep': ('timm_dst.tools.sweep',),
}


def warn_moved(old: str, new: str, stacklevel: int = 2) -> None:
    """The one deprecation message of a moved module."""
    warnings.warn(f'{old} is deprecated: it moved to {new} (the old path stays for one release)', DeprecationWarning,
                  stacklevel=stacklevel + 1)


class _Merged(types.ModuleType):
    """An old module whose names now live in several modules: reads search them in order, writes go to the module
    that defines the name (else the primary one)."""

    def __init__(self, name: str, targets: list[types.ModuleType]):
        super().__init__(name, targets[0].__doc__)
        object.__setattr__(self, '_targets', targets)

    def _owner(self, name: str) -> types.ModuleType:
        for m in object.__getattribute__(self, '_targets'):
            if name in vars(m):
                return m
        return object.__getattribute__(self, '_targets')[0]

    def __getattr__(self, name: str) -> Any:
        if not (name.startswith('__') and name.endswith('__')):
            for m in object.__getattribute__(self, '_targets'):
                if name in vars(m):
                    return vars(m)[name]
        raise AttributeError(f'module {self.__name__!r} has no attribute {name!r}')

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith('__') and name.endswith('__'):  # the module's own attributes (__spec__, ...)
            object.__setattr__(self, name, value)
        else:
            setattr(self._owner(name), name, value)

    def __delattr__(self, name: str) -> None:
        if name.startswith('__') and name.endswith('__'):
            object.__delattr__(self, name)
        else:
            delattr(self._owner(name), name)

    def __dir__(self) -> list[str]:
        return sorted({n for m in object.__getattribute__(self, '_targets') for n in vars(m)})


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module names (only those: it sits after the path finders) and loads them as aliases."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = [importlib.import_module(t) for t in MOVED[spec.name]]
        warn_moved(spec.name, MOVED[spec.name][0], stacklevel=_importer_level())
        if len(targets) > 1:
            return _Merged(spec.name, targets)
        self._specs[spec.name] = targets[0].__spec__
        return targets[0]

    def exec_module(self, module: types.ModuleType) -> None:
        # the import system has just set ``__spec__`` of the module it got to the alias's spec: give the real
        # module its own back (relative imports and reloads read it)
        real = self._specs.pop(module.__spec__.name, None) if module.__spec__ is not None else None
        if real is not None:
            module.__spec__ = real


def _importer_level() -> int:
    """The ``stacklevel`` (as seen from this function's caller) of the first frame outside the import machinery and
    this module: the code that imported the old path. ``warnings`` does not count ``importlib._bootstrap`` frames."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not ('importlib' in name or name == __file__):
            return level
        frame = frame.f_back
        if frame is not None and not ('importlib' in frame.f_code.co_filename
                                      and '_bootstrap' in frame.f_code.co_filename):
            level += 1
    return level


_FINDER = _AliasFinder()


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (after the path finders: it answers only the old names)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
