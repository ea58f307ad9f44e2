"""Argument checks shared by the controller and the methods: each error names the argument and what is accepted."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ['check_int', 'check_float', 'check_bool', 'check_choice', 'check_patterns']


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int: an int, or a float with an integral value (``100.0``); never a bool, string or NaN."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and _is_number(value) and math.isfinite(float(value)) and float(value).is_integer():
        ok = True
    if not ok:
        raise ValueError(f'{name}={value!r} is not accepted: give an integer'
                         + (f' >= {minimum}' if minimum is not None else ''))
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f'{name}={value!r} is not accepted: give an integer >= {minimum}')
    return value


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                high_open: bool = False, low_open: bool = False) -> float:
    """``value`` as a finite float in the given range (bounds closed unless ``*_open``); never a bool or string."""
    lo = '(' if low_open else '['
    hi = ')' if high_open else ']'
    if low is not None and high is not None:
        accepted = f'a number in {lo}{low}, {high}{hi}'
    elif low is not None:
        accepted = f'a finite number {">" if low_open else ">="} {low}'
    else:
        accepted = 'a finite number'
    if not _is_number(value) or not math.isfinite(float(value)):
        raise ValueError(f'{name}={value!r} is not accepted: give {accepted}')
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f'{name}={value!r} is not accepted: give {accepted}')
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f'{name}={value!r} is not accepted: give {accepted}')
    return v


def check_bool(name: str, value: Any, allow_none: bool = False) -> bool | None:
    """``value`` if it is a bool (or None when allowed): strings such as ``'false'`` are refused, not read as True."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise ValueError(f'{name}={value!r} is not accepted: give True or False' + (' (or None)' if allow_none else ''))
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of the names ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f'{name}={value!r} is not known; accepted: {", ".join(choices)}')
    return value


def check_patterns(name: str, value: Any) -> None:
    """None, a string (comma-separated globs) or a sequence of strings."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, Sequence) and all(isinstance(p, str) for p in value):
        return
    raise ValueError(f'{name}={value!r} is not accepted: give a glob pattern string, a comma-separated string of '
                     'them, or a list of strings')


def load_file(path: Any, arg: str) -> Any:
    """``torch.load`` a file given as argument ``arg`` (tensors only first, then any object), or ``.safetensors``;
    a missing, empty, truncated or foreign file raises ``ValueError`` naming ``arg`` and the path."""
    import os

    import torch
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f'{arg}={path!r}: no such file')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file as load_safetensors
            return load_safetensors(path, device='cpu')
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except Exception:  # noqa: BLE001  (checkpoints with non-tensor objects, e.g. an argparse Namespace)
            return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # noqa: BLE001  (any reader error means: not a file we can use)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f'{arg}={path!r}: not a readable torch / safetensors file ({type(e).__name__}: '
                         f'{detail[:200]})') from e
