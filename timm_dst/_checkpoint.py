"""Checkpoint files of the training CLI: reading them with a one-line error for anything that is not one, the
``--initial-checkpoint`` load, and the resume-compatibility checks. The layout itself is :mod:`timm_dst.plugin`'s
(``state_dict`` / ``state_dict_ema`` plain timm weights, the DST state under ``timm_dst``)."""
from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ['LAST', 'BEST', 'CheckpointError', 'link_atomic', 'save_safetensors_atomic', 'read_checkpoint_file',
           'load_initial_checkpoint', 'load_dense_weights', 'resolve_resume', 'check_resume_source',
           'check_resume_compatible']

LAST = 'last.pth.tar'
BEST = 'model_best.pth.tar'


class CheckpointError(ValueError):
    """A checkpoint given by the user cannot be used (unreadable, foreign, or from an incompatible run)."""


def _tmp_path(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.{name}.tmp{os.getpid()}')


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
    """A checkpoint file from ``--resume``: a file, or a run folder (its newest of ``last.pth.tar`` and the
    ``recovery-*.pth.tar`` files)."""
    if os.path.isdir(path):
        import glob
        cands = [c for c in [os.path.join(path, LAST), *glob.glob(os.path.join(path, 'recovery-*.pth.tar'))]
                 if os.path.isfile(c)]
        if not cands:
            raise FileNotFoundError(f'{path!r} holds no {LAST} (nor recovery-*.pth.tar)')
        return max(cands, key=os.path.getmtime)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path!r}: no such checkpoint file or run folder')
    return path


def read_checkpoint_file(path: str, flag: str) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``.

    Raises:
        CheckpointError: The file is empty, truncated, not a torch file, holds objects other than tensors and plain
            data, or is not a dict; the message names ``flag`` and the file.
    """
    from .plugin import read_checkpoint
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise CheckpointError(f'{flag} {path}: the file is empty')
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
            return {'state_dict': load_file(path)}
        except Exception as e:
            raise CheckpointError(f'{flag} {path}: not a readable safetensors file ({_short(e)})') from None
    try:
        ckpt = read_checkpoint(path, mmap=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError, zipfile.BadZipFile,
            AttributeError, ImportError, IndexError, KeyError, TypeError) as e:
        raise CheckpointError(f'{flag} {path}: not a readable checkpoint (truncated, corrupt, or holding objects '
                              f'other than tensors and plain data: {_short(e)})') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{flag} {path}: expected a checkpoint dict or a state_dict, got {type(ckpt).__name__}')
    return ckpt


def _short(e: BaseException) -> str:
    text = ' '.join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + '...'


class OutputWriteError(RuntimeError):
    """A file of the run could not be written (a full disk, a read-only or vanished folder); the message names it."""


def short_error(e: BaseException) -> str:
    """An exception as a short one-line text (OSErrors: the reason and the file)."""
    if isinstance(e, OSError) and e.strerror:
        text = f'{e.strerror}: {e.filename}' if e.filename else e.strerror
    else:
        text = ' '.join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + '...'


_ENFORCE = re.compile(r'\[enforce fail at [^]]*\]\s*\.?\s*')  # the C++ location in torch's writer errors


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failed file write (an OSError, or the RuntimeError of torch's zip writer on a full disk)."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ('PytorchStreamWriter', 'inline_container',
                                                                   'file write failed'))


def write_failure_cause(e: BaseException) -> str:
    """Why a write failed, in a few words (torch's writer errors lose their C++ location and get a hint)."""
    if isinstance(e, OSError):
        return short_error(e)
    return f'torch.save: {_ENFORCE.sub("", short_error(e))}; is the disk full?'


def model_state(ckpt: Mapping[str, Any], use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint dict: ``state_dict_ema`` (with ``use_ema``), ``state_dict``, ``model``, or the dict
    itself when it is a state_dict; DDP / compile prefixes stripped."""
    for key in (('state_dict_ema', 'model_ema') if use_ema else ()) + ('state_dict', 'model'):
        if isinstance(ckpt.get(key), Mapping):
            sd = ckpt[key]
            break
    else:
        sd = ckpt
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        for prefix in ('module.', '_orig_mod.'):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_initial_checkpoint(model: nn.Module, path: str) -> None:
    """``--initial-checkpoint``: the weights of a timm checkpoint, a timm-dst checkpoint (its plain ``state_dict``),
    a state_dict or a safetensors file, loaded strictly into the model before it is sparsified.

    Raises:
        CheckpointError: Unreadable file, or weights that do not fit the model (names the missing / unexpected keys).
    """
    load_dense_weights(model, read_checkpoint_file(path, '--initial-checkpoint'), path, '--initial-checkpoint')


def load_dense_weights(model: nn.Module, ckpt: Mapping[str, Any], path: str, flag: str) -> None:
    """Load a checkpoint's plain weights (:func:`model_state`) strictly into a model without masks.

    Raises:
        CheckpointError: No weights, or weights that do not fit the model (names the missing / unexpected keys).
    """
    sd = model_state(ckpt)
    if not sd:
        raise CheckpointError(f'{flag} {path}: holds no weights (no state_dict)')
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (('missing', missing), ('unexpected', unexpected), ('shape differs', wrong)):
            if keys:
                parts.append(f'{label}: {", ".join(keys[:3])}{" ..." if len(keys) > 3 else ""} ({len(keys)})')
        raise CheckpointError(f'{flag} {path}: the weights do not fit --model ({"; ".join(parts)})')
    model.load_state_dict(sd, strict=True)


def check_resume_source(path: str, ckpt: Mapping[str, Any], args: argparse.Namespace) -> bool:
    """Check a ``--resume`` checkpoint came from a run that can be continued with these flags (a training checkpoint
    of the same model and, unless ``--no-resume-opt``, the same optimizer); returns whether it is dense (a timm
    checkpoint without DST state: sparse training starts from its weights).

    Raises:
        CheckpointError: What differs, in one line.
    """
    from .plugin import DST_KEY
    if 'state_dict' not in ckpt:
        raise CheckpointError(f'--resume {path}: not a training checkpoint (no state_dict)')
    if ckpt.get('arch') is not None and ckpt['arch'] != args.model:
        raise CheckpointError(f'--resume {path}: the checkpoint is of model {ckpt["arch"]!r}, not --model '
                              f'{args.model!r}')
    old = ckpt.get('args')
    old_opt = getattr(old, 'opt', None) if old is not None else None
    if not args.no_resume_opt and old_opt is not None and str(old_opt).lower() != str(args.opt).lower():
        raise CheckpointError(f'--resume {path}: the run was trained with --opt {old_opt}; resume with the same '
                              '--opt, or add --no-resume-opt to start a fresh optimizer state')
    return ckpt.get(DST_KEY) is None


def check_resume_compatible(path: str, ckpt: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The timm-dst-train run state of a ``--resume`` checkpoint holding a DST state, after
    :func:`check_resume_source`; its sparse weights must be finite and zero where the masks are off
    (:func:`timm_dst.plugin.check_checkpoint_weights`).

    Raises:
        CheckpointError: What differs or is damaged, in one line.
    """
    from .plugin import DST_KEY, check_checkpoint_weights
    check_resume_source(path, ckpt, args)
    state = ckpt.get(DST_KEY)
    if not isinstance(state, Mapping) or 'run' not in state:
        raise CheckpointError(f'--resume {path}: its DST state holds no timm-dst-train run state (a checkpoint of '
                              'another tool, e.g. timm\'s train.py under timm_dst.run): continue it with that tool, '
                              'or start from its weights with --initial-checkpoint')
    try:
        check_checkpoint_weights(ckpt, state)
    except ValueError as e:
        raise CheckpointError(f'--resume {path}: {e}') from None
    return dict(state)
