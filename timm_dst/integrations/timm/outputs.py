"""The files of a run folder, named once, and the atomic writes that produce them (a file is either the old one or
the new one, never a half-written one), with the one-line reading of write failures (full disk, read-only folder)."""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ['LAST', 'BEST', 'SUMMARY_CSV', 'SUMMARY_PNG', 'DST_SUMMARY', 'RESULTS', 'EXPORT_BEST', 'EXPORT_LAST',
           'CONFIG_YAML', 'DENSE_PHASE_DIR', 'REWIND_FILE', 'OutputWriteError', 'link_atomic',
           'save_safetensors_atomic', 'write_json_atomic', 'short_error', 'is_write_failure', 'write_failure_cause',
           'dst_summary', 'fmt_flops', 'flops_line']

LAST = 'last.pth.tar'
BEST = 'model_best.pth.tar'


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


CONFIG_YAML = 'args.yaml'


DENSE_PHASE_DIR = 'dense'


REWIND_FILE = 'rewind.pth'


DST_SUMMARY = 'dst_summary.json'


RESULTS = 'results.json'


EXPORT_BEST = 'model_best.safetensors'


EXPORT_LAST = 'model_last.safetensors'


SUMMARY_CSV = 'summary.csv'


SUMMARY_PNG = 'summary.png'


# --------------------------------------------------------------------------------------------------------------------
# JSON summaries and log lines
def write_json_atomic(obj: Any, path: str) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def dst_summary(sparsifier: Any, flops: Any | None = None) -> dict[str, Any]:
    """The ``dst_summary.json`` content: per-tensor density and explored fraction, final R_s, update history, and
    with ``flops`` (a :class:`timm_dst.core.flops.TrainingFlops`) inference and training FLOPs (docs/flops.md)."""
    out = {
        'method': sparsifier.method_name, 'sparsity': sparsifier.sparsity, 'distribution': sparsifier.distribution,
        'density': sparsifier.density, 'itop_rate': sparsifier.itop_rate, 'step': sparsifier.step,
        'total_steps': sparsifier.total_steps, 'updates': max(len(sparsifier.history) - 1, 0),
    }
    if flops is not None:
        out.update(flops.summary())
    out.update({'tensors': sparsifier.summary(), 'history': sparsifier.history})
    return out


def fmt_flops(x: float) -> str:
    for unit, scale in (('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(x) >= scale:
            return f'{x / scale:.3g}{unit}'
    return f'{x:.3g}'


def flops_line(summary: dict[str, Any]) -> str:
    """``inference FLOPs ... | training FLOPs ...`` of a :meth:`TrainingFlops.summary`."""
    return (f'inference FLOPs/sample {fmt_flops(summary["inference_flops"])} '
            f'(dense {fmt_flops(summary["inference_flops_dense"])}, {summary["inference_flops_ratio"]:.4f}x) | '
            f'training FLOPs {fmt_flops(summary["train_flops"])} ({summary["train_flops_ratio"]:.4f}x dense)')
