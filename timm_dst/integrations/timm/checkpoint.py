"""The checkpoint layout and its files: timm's own keys, with ``state_dict`` / ``state_dict_ema`` as plain timm
weights (``x = x_orig * x_mask``, masks dropped: loadable by ``timm.models.load_checkpoint`` and ``validate.py`` without
timm_dst), and the DST state beside them under :data:`DST_KEY`, readable with ``torch.load(weights_only=True)``
(:func:`pack_checkpoint`, :func:`restore_dst_state`); reading checkpoint files with a one-line error for anything that
is not one, the ``--initial-checkpoint`` load, and the resume-compatibility checks. The saver that writes the layout is
:class:`~timm_dst.integrations.timm.saver.DstCheckpointSaver`."""
from __future__ import annotations

import argparse
import glob
import os
import pickle
import random
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ...core.masks import _strip_prefix, export_state_dict, unwrap_model
from .outputs import BEST, LAST, RECOVERY_GLOB, _short

__all__ = ['LAST', 'BEST', 'DST_KEY', 'CheckpointError', 'read_checkpoint_file', 'load_initial_checkpoint',
           'load_dense_weights', 'resolve_resume', 'check_resume_source', 'check_same_model_and_opt',
           'check_resume_compatible', 'model_state',
           'rng_state', 'set_rng_state', 'dst_state', 'outside_mask',
           'fill_outside_mask', 'pack_checkpoint', 'read_checkpoint', 'read_dst_state', 'check_checkpoint_weights',
           'restore_dst_state', 'load_plain_state_dict']



class CheckpointError(ValueError):
    """A checkpoint given by the user cannot be used (unreadable, foreign, or from an incompatible run)."""


def resolve_resume(path: str) -> str:
    """A checkpoint file from ``--resume``: a file, or a run folder (its newest of ``last.pth.tar`` and the
    ``recovery-*.pth.tar`` files)."""
    if os.path.isdir(path):
        cands = [c for c in [os.path.join(path, LAST), *glob.glob(os.path.join(path, RECOVERY_GLOB))]
                 if os.path.isfile(c)]
        if not cands:
            raise FileNotFoundError(f'{path!r} holds no {LAST} (nor {RECOVERY_GLOB})')
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
    if 'state_dict' not in ckpt:
        raise CheckpointError(f'--resume {path}: not a training checkpoint (no state_dict)')
    check_same_model_and_opt(path, ckpt, args)
    return ckpt.get(DST_KEY) is None


def check_same_model_and_opt(path: str, ckpt: Mapping[str, Any], args: argparse.Namespace) -> None:
    """A ``--resume`` checkpoint of the same ``--model`` and (unless ``--no-resume-opt``) the same ``--opt``.

    Raises:
        CheckpointError: What differs, in one line.
    """
    if ckpt.get('arch') is not None and ckpt['arch'] != args.model:
        raise CheckpointError(f'--resume {path}: the checkpoint is of model {ckpt["arch"]!r}, not --model '
                              f'{args.model!r}')
    old = ckpt.get('args')
    old_opt = getattr(old, 'opt', None) if old is not None else None
    if not args.no_resume_opt and old_opt is not None and str(old_opt).lower() != str(args.opt).lower():
        raise CheckpointError(f'--resume {path}: the run was trained with --opt {old_opt}; resume with the same '
                              '--opt, or add --no-resume-opt to start a fresh optimizer state')


def check_resume_compatible(path: str, ckpt: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The timm-dst-train run state of a ``--resume`` checkpoint holding a DST state, after
    :func:`check_resume_source`; its sparse weights must be finite and zero where the masks are off
    (:func:`timm_dst.integrations.timm.check_checkpoint_weights`).

    Raises:
        CheckpointError: What differs or is damaged, in one line.
    """
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


DST_KEY = 'timm_dst'  # the checkpoint key of the DST state


_FORMAT = 1


# --------------------------------------------------------------------------------------------------------------------
# checkpoint layout
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (and CUDA) generator states of this process, as tensors and plain types only (loadable
    with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state(legacy=True)
    state = {
        'python': [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        'numpy': {'keys': torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def dst_state(sparsifier: Any, flops: Any | None = None, rng: bool = True,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The value stored under :data:`DST_KEY`: the sparsifier's state (masks, explored masks, step, generators, method
    state), a summary (method, density, R_s), the training-FLOPs count and this process's random states.

    Args:
        sparsifier: The run's :class:`~timm_dst.Sparsifier`.
        flops: Its :class:`~timm_dst.core.flops.TrainingFlops`, if counted.
        rng: Store the Python / NumPy / torch random states (an exact continuation also restores them).
        extra: Further plain entries (tensors, numbers, strings, lists, dicts).
    """
    out = {
        'format': _FORMAT,
        'method': sparsifier.method_name, 'sparsity': sparsifier.sparsity, 'density': sparsifier.density,
        'itop_rate': sparsifier.itop_rate, 'step': sparsifier.step, 'total_steps': sparsifier.total_steps,
        'sparsifier': sparsifier.state_dict(),
        'flops': flops.state_dict() if flops is not None else None,
        'rng': rng_state() if rng else None,
    }
    out.update(extra or {})
    return out


def _plain(state: Any) -> Any:
    if isinstance(state, Mapping) and any(str(k).endswith('_orig') for k in state):
        return export_state_dict(state)
    return state


def outside_mask(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The non-zero ``x_orig`` values where ``x_mask`` is off, per plain key: ``{'index': flat indices, 'value': ...}``.

    The controlled model is zero there, but a copy that averages it (timm's EMA) is not: its values at dropped
    positions decay towards zero and count again when the position grows back. The plain weights hold
    ``x_orig * x_mask``; these entries complete the EMA for an exact continuation (:func:`fill_outside_mask`).
    """
    out = {}
    for key, value in state.items():
        base = key[:-5]
        if key.endswith('_orig') and base + '_mask' in state:
            flat = value.detach().reshape(-1)
            index = ((flat != 0) & ~state[base + '_mask'].reshape(-1).bool()).nonzero().squeeze(1)
            out[_strip_prefix(base)] = {'index': index.cpu(), 'value': flat[index].cpu().clone()}
    return out


def fill_outside_mask(value: torch.Tensor, entry: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A plain weight with the :func:`outside_mask` entries written back (a new tensor)."""
    out = value.detach().clone()
    out.view(-1)[entry['index'].to(out.device)] = entry['value'].to(out.device, out.dtype)
    return out


def pack_checkpoint(checkpoint: dict[str, Any], sparsifier: Any, flops: Any | None = None, rng: bool = True,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Turn a timm training checkpoint dict into the timm-dst layout, in place (and return it).

    ``state_dict``, ``state_dict_ema`` (and the older ``model`` / ``model_ema``) become plain timm weights: masked
    tensors folded (``x = x_orig * x_mask``, zeros included), masks dropped, DDP / compile prefixes stripped. The DST
    state (:func:`dst_state`) goes under :data:`DST_KEY`, with the EMA's values outside the masks
    (``ema_outside_mask``, see :func:`outside_mask`). Every other key is left as it is.

    Args:
        checkpoint: The dict about to be saved (``epoch``, ``state_dict``, ``optimizer``, ...).
        sparsifier: The run's sparsifier.
        flops: The run's :class:`~timm_dst.core.flops.TrainingFlops`, if any.
        rng: Store this process's random states.
        extra: Further entries of the DST state.
    """
    extra = dict(extra or {})
    for key in ('state_dict_ema', 'model_ema'):
        if isinstance(checkpoint.get(key), Mapping) and any(str(k).endswith('_orig') for k in checkpoint[key]):
            extra.setdefault('ema_outside_mask', outside_mask(checkpoint[key]))
    for key in ('state_dict', 'state_dict_ema', 'model', 'model_ema'):
        if key in checkpoint and checkpoint[key] is not None:
            checkpoint[key] = _plain(checkpoint[key])
    checkpoint[DST_KEY] = dst_state(sparsifier, flops=flops, rng=rng, extra=extra)
    return checkpoint


def read_checkpoint(path: str, mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (timm's ``args`` Namespace allowed), memory-mapped where
    the file format allows."""
    kw: dict[str, Any] = {'map_location': 'cpu', 'weights_only': True}
    with torch.serialization.safe_globals([argparse.Namespace]):
        if mmap:
            try:
                return torch.load(path, mmap=True, **kw)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                pass
        return torch.load(path, **kw)


def read_dst_state(checkpoint: str | Mapping[str, Any]) -> dict[str, Any] | None:
    """The DST state of a checkpoint (a path or a loaded dict), or None for a plain (dense) timm checkpoint.

    Raises:
        ValueError: The DST entry is not a timm_dst state, or the checkpoint's sparse weights are damaged
            (:func:`check_checkpoint_weights`).
    """
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    if not isinstance(ckpt, Mapping):
        return None
    state = ckpt.get(DST_KEY)
    if state is None:
        return None
    if not isinstance(state, Mapping) or 'sparsifier' not in state:
        raise ValueError(f'checkpoint: the {DST_KEY!r} entry is not a timm_dst state (no "sparsifier")')
    check_checkpoint_weights(ckpt, state)
    return dict(state)


def check_checkpoint_weights(ckpt: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose sparse weights are damaged, before anything is loaded from it: a sparse tensor of
    ``state_dict`` / ``model`` or of the EMA (``state_dict_ema`` / ``model_ema``, ``ema_outside_mask``, ``ema_orig``)
    holding NaN / inf, or a plain sparse weight that is not zero where the DST state's mask is off (the layout stores
    ``x_orig * x_mask``). NaN at a masked position would stay NaN (NaN * 0 is NaN) and train on as NaN.

    Args:
        ckpt: The checkpoint dict.
        state: Its DST state (:func:`read_dst_state`).

    Raises:
        ValueError: Naming the entry, the tensor and how many values are wrong.
    """
    masks = state.get('sparsifier', {}).get('masks') if isinstance(state.get('sparsifier'), Mapping) else None
    if not isinstance(masks, Mapping):
        return  # no masks: the sparsifier's own check refuses the state
    for key in ('state_dict', 'model', 'state_dict_ema', 'model_ema'):
        if not isinstance(ckpt.get(key), Mapping):
            continue
        weights = model_state({'state_dict': ckpt[key]})
        for name, mask in masks.items():
            w = weights.get(name)
            if not torch.is_tensor(w) or not w.is_floating_point():
                continue  # absent or of another kind: loading the weights says so
            bad = int((~torch.isfinite(w)).sum())
            if bad:
                raise ValueError(f'checkpoint: {key} {name} holds {bad} non-finite value(s) (NaN / inf): the weights '
                                 'are damaged; resume from an earlier checkpoint')
            if key in ('state_dict', 'model') and torch.is_tensor(mask) and tuple(mask.shape) == tuple(w.shape):
                outside = int(((w != 0) & ~mask.to(torch.bool)).sum())
                if outside:
                    raise ValueError(f'checkpoint: {key} {name} holds {outside} non-zero value(s) where its mask is '
                                     'off (the checkpoint stores zeros there): the weights or the masks are damaged; '
                                     'resume from an earlier checkpoint')
    run = state.get('run') if isinstance(state.get('run'), Mapping) else {}
    ema_values = [('ema_outside_mask', name, entry.get('value') if isinstance(entry, Mapping) else None)
                  for name, entry in (state.get('ema_outside_mask') or {}).items()]
    for source in (state.get('ema_orig'), run.get('ema_orig')):  # timm-dst-train: the EMA's values under its masks
        ema_values += [('ema_orig', name, value) for name, value in (source or {}).items()]
    for key, name, value in ema_values:
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f'checkpoint: {key} {name} holds non-finite values (NaN / inf): the EMA is damaged; '
                             'resume from an earlier checkpoint')


def restore_dst_state(sparsifier: Any, state: Mapping[str, Any], flops: Any | None = None, rng: bool = True) -> None:
    """Restore a :func:`dst_state` into a sparsifier of the same configuration (and its FLOPs count and, with
    ``rng``, the random states).

    Raises:
        ValueError: When the state comes from another method, sparsity, distribution or set of sparse tensors.
    """
    sparsifier.load_state_dict(state['sparsifier'])
    if flops is not None and state.get('flops') is not None:
        flops.load_state_dict(state['flops'])
    if rng and state.get('rng') is not None:
        set_rng_state(state['rng'])


@torch.no_grad()
def load_plain_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a plain timm state_dict (``x``, not ``x_orig`` / ``x_mask``) into a model with masks attached: each
    masked tensor's value goes into ``x_orig``; the masks are kept as they are, so restore the DST state (the masks)
    first: the sparsifier zeroes the weights outside its current masks after a load.

    Returns:
        ``model.load_state_dict``'s incompatible keys.
    """
    model = unwrap_model(model)
    own = model.state_dict()
    mapped = dict(state_dict)
    for key in own:
        if key.endswith('_orig') and key[:-5] + '_mask' in own:
            base = key[:-5]
            if base in mapped and key not in mapped:
                mapped[key] = mapped.pop(base)
                mapped.setdefault(base + '_mask', own[base + '_mask'])
    return model.load_state_dict(mapped, strict=strict)
