"""YAML configs (``-c/--config``) read as the CLI and the launcher read them: duplicate keys refused, values
converted to each flag's type, one-line errors; and the check that an output folder can be written."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import yaml

from .flags import milestone, step_or_fraction

__all__ = ['DuplicateKeyError', 'read_yaml_config', 'writable_folder_problem']


# --------------------------------------------------------------------------------------------------------------------
# YAML configs
def _yaml_error(e: yaml.YAMLError) -> str:
    mark = getattr(e, 'problem_mark', None)
    where = f'line {mark.line + 1}, column {mark.column + 1}: ' if mark is not None else ''
    return where + ' '.join(str(getattr(e, 'problem', None) or e).split())


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping (``yaml.safe_load`` would keep the last value without a word)."""

    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f'key {key} is given twice (lines {first_line} and {line})')
        self.key, self.first_line, self.line = key, first_line, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing a key given twice in one mapping (merge keys ``<<`` may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == 'tag:yaml.org,2002:merge':
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: construct_mapping refuses it
                continue
        return super().construct_mapping(node, deep=deep)


def read_yaml_config(path: str, error: Callable[[str], Any], flag: str = '-c/--config') -> Any:
    """A YAML config file, loaded like ``yaml.safe_load`` but refusing a key given twice.

    Args:
        path: The file.
        error: Called with one line naming ``flag``, the file and the problem (expected not to return): no such file,
            unreadable, not valid YAML, a duplicate key.
        flag: The option that named the file.

    Returns:
        The loaded value (None for an empty file).
    """
    if not os.path.isfile(path):
        return error(f'{flag} {path!r}: ' + ('a folder, not a YAML file' if os.path.isdir(path) else 'no such file'))
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except DuplicateKeyError as e:
        return error(f'{flag} {path}: {e}; keep one')
    except yaml.YAMLError as e:
        return error(f'{flag} {path}: not valid YAML ({_yaml_error(e)})')
    except (OSError, UnicodeDecodeError) as e:
        return error(f'{flag} {path}: cannot be read ({e})')


def _type_name(t: Any) -> str:
    return {int: 'an integer', float: 'a number', str: 'a string', step_or_fraction: 'an integer step or a fraction',
            milestone: 'FROM_STEP:INTERVAL'}.get(t, getattr(t, '__name__', str(t)))


def _convert(t: Any, value: Any) -> Any:
    """One YAML value to a flag's type, strictly (``2.5`` is not an integer; ``true`` is not a number)."""
    if t is None:
        return value
    if isinstance(value, bool) and t in (int, float, step_or_fraction):
        raise ValueError
    if t is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value) if isinstance(value, int | float) else int(str(value))
    if t is float:
        return float(value) if isinstance(value, int | float) else float(str(value))
    if t is step_or_fraction:
        return value if isinstance(value, int | float) else step_or_fraction(str(value))
    if t is milestone:
        if isinstance(value, list | tuple) and len(value) == 2:
            return int(value[0]), int(value[1])
        return milestone(str(value))
    if isinstance(value, dict | list):
        raise ValueError
    return t(str(value))


def _coerce(action: argparse.Action, value: Any) -> Any:
    """A config value for ``action``, converted and checked like the command line would (ValueError if not)."""
    if value is None:
        return None
    if isinstance(action.default, dict):  # key=value flags (--model-kwargs, --dst-kwargs ...)
        if not isinstance(value, dict):
            raise ValueError('a mapping of keyword arguments')
        return value
    if action.nargs == 0:  # store_true / store_false / BooleanOptional
        if not isinstance(value, bool):
            raise ValueError('true or false')
        return value
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        items = value if isinstance(value, list | tuple) else [value]
        try:
            out = [_convert(action.type, v) for v in items]
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise ValueError(f'a list of {_type_name(action.type)} values') from None
        if isinstance(action.nargs, int) and len(out) != action.nargs:
            raise ValueError(f'{action.nargs} values')
    else:
        try:
            out = _convert(action.type, value)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise ValueError(_type_name(action.type)) from None
    if action.choices is not None:
        for v in out if isinstance(out, list) else [out]:
            if v not in action.choices:
                raise ValueError(f'one of {", ".join(map(str, action.choices))}')
    return out


def writable_folder_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be created or written to (a file in its path, a read-only file system, no permission), or
    None. Tried, not inferred from permission bits (which do not bind root): a file is created in the folder, or in
    its nearest existing parent, and removed."""
    import tempfile
    folder = os.path.abspath(folder)
    probe = folder
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f'{probe} is a file, not a folder'
    try:
        fd, path = tempfile.mkstemp(prefix='.timm_dst_probe', dir=probe)
        os.close(fd)
        os.remove(path)
    except OSError as e:
        return f'{probe} is not writable ({e.strerror or e})'
    return None
