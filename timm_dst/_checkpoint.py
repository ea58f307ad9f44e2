"""Checkpoints of the training CLI: one file per checkpoint, written atomically (temp file + ``os.replace``)."""
from __future__ import annotations

import os
import random
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ['LAST', 'BEST', 'save_atomic', 'link_atomic', 'save_safetensors_atomic', 'load_checkpoint',
           'resolve_resume', 'rng_state', 'set_rng_state']

LAST = 'last.pth.tar'
BEST = 'model_best.pth.tar'


def _tmp_path(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.{name}.tmp{os.getpid()}')


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: never a half-written file."""
    tmp = _tmp_path(path)
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def link_atomic(src: str, dst: str) -> None:
    """Make ``dst`` a copy of ``src`` atomically (hard link when possible)."""
    tmp = _tmp_path(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors_atomic(state: Mapping[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None):
    """Write a state_dict as safetensors, atomically."""
    from safetensors.torch import save_file
    tmp = _tmp_path(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def resolve_resume(path: str) -> str:
    """A checkpoint file from ``--resume`` (a file, or a run folder holding ``last.pth.tar``)."""
    if os.path.isdir(path):
        cand = os.path.join(path, LAST)
        if not os.path.isfile(cand):
            raise FileNotFoundError(f'{path!r} holds no {LAST}')
        return cand
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path!r}: no such checkpoint file or run folder')
    return path


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a CLI checkpoint (a dict written by :func:`save_atomic`) on the CPU."""
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    if not isinstance(ckpt, dict) or 'sparsifier' not in ckpt or 'model' not in ckpt:
        raise ValueError(f'--resume {path!r}: not a timm-dst-train checkpoint')
    return ckpt


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states of this process."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
