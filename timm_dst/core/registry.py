"""A small named registry with third-party entries from an entry-point group, shared by the distributions, the
prune-rate schedules and the structures (the methods have their own, typed registry in :mod:`timm_dst.methods`).

Each registry maps a name to an entry and loads, once, on its first look-up, the entry points of its group: each
entry point names a callable that is called with no argument and registers one or more names with the registry's
``register_*`` function. A plugin that fails to import, raises or registers a taken name is skipped with one
``RuntimeWarning`` naming it; the built-in entries and the other plugins keep working.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

__all__ = ['Registry', 'RegistryNames']

T = TypeVar('T')

_NAME = re.compile(r'[a-z0-9][a-z0-9_.:\-]*')


class Registry(Generic[T]):
    """Names to entries, in registration order (built-in entries first).

    Args:
        kind: What a name names, as the keyword that takes it (``'distribution'``): used in messages.
        group: The entry-point group of third-party entries (``'timm_dst.distributions'``).
    """

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._entries: dict[str, T] = {}
        self._plugins_loaded = False

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; returns ``entry``.

        Raises:
            ValueError: When ``name`` is malformed or taken.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f'{self.kind} name {name!r}: use lower-case letters, digits, "-", "_", "." or ":"')
        if name in self._entries:
            raise ValueError(f'{self.kind} name {name!r} is already registered')
        self._entries[name] = entry
        return entry

    def load_plugins(self) -> None:
        """Call the entry points of :attr:`group` (once); a failing one is skipped with a warning."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # before loading: a plugin may look names up itself
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            dist = getattr(getattr(ep, 'dist', None), 'name', None) or '?'
            try:
                obj = ep.load()
                if not callable(obj):
                    raise TypeError(f'{ep.value} is not a callable')
                obj()
            except Exception as e:  # noqa: BLE001  (a broken plugin must not break the others)
                warnings.warn(f'timm_dst: {self.kind} plugin {ep.name!r} ({ep.value}, distribution {dist}) was '
                              f'skipped: {type(e).__name__}: {e}', RuntimeWarning, stacklevel=4)

    def names(self) -> tuple[str, ...]:
        """The registered names (built-in and plugins), in registration order."""
        self.load_plugins()
        return tuple(self._entries)

    def entries(self) -> tuple[T, ...]:
        """The registered entries, in registration order."""
        self.load_plugins()
        return tuple(self._entries.values())

    def get(self, name: Any) -> T:
        """The entry of ``name``.

        Raises:
            ValueError: ``<kind>=<name> is not known; accepted: <names>``.
        """
        self.load_plugins()
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f'{self.kind}={name!r} is not known; accepted: {", ".join(self._entries)}')
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._entries

    def view(self) -> RegistryNames:
        """A live, read-only sequence of the names (for ``x in NAMES`` checks and argparse ``choices``)."""
        return RegistryNames(self)


class RegistryNames(Sequence[str]):
    """The names of a :class:`Registry` as a read-only sequence that follows later registrations (compares equal to
    the tuple of the names)."""

    def __init__(self, registry: Registry):
        self._registry = registry

    def __getitem__(self, index):
        return self._registry.names()[index]

    def __len__(self) -> int:
        return len(self._registry.names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.names())

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RegistryNames | tuple | list):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (the names change)

    def __repr__(self) -> str:
        return repr(self._registry.names())
