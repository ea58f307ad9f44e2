"""The files of a run folder, named once, and the one atomic write that produces them (a file is either the old one
or the new one, never a half-written one), with the one-line reading of write failures (full disk, read-only folder)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import torch

__all__ = ['LAST', 'BEST', 'CHECKPOINT_EXT', 'RECOVERY_GLOB', 'SUMMARY_CSV', 'SUMMARY_PNG', 'CONFIG_YAML',
           'DST_SUMMARY', 'DST_SUMMARY_CSV', 'RESULTS', 'EXPORT_BEST', 'EXPORT_LAST', 'DENSE_PHASE_DIR', 'REWIND_FILE',
           'rank_masks_file', 'OutputWriteError', 'atomic_path', 'atomic_write', 'link_atomic',
           'save_safetensors_atomic', 'write_json_atomic', 'short_error', 'is_write_failure', 'write_failure_cause',
           'dst_summary', 'fmt_flops', 'flops_line']

# --------------------------------------------------------------------------------------------------------------------
# the names of a run folder's files (timm's, where timm writes them: its CheckpointSaver and update_summary)
CHECKPOINT_EXT = '.pth.tar'  # timm's CheckpointSaver.extension
LAST = 'last' + CHECKPOINT_EXT
BEST = 'model_best' + CHECKPOINT_EXT
RECOVERY_GLOB = 'recovery-*' + CHECKPOINT_EXT  # timm's recovery checkpoints, recovery-<epoch>-<batch>
SUMMARY_CSV = 'summary.csv'  # timm's update_summary
SUMMARY_PNG = 'summary.png'
CONFIG_YAML = 'args.yaml'
DST_SUMMARY = 'dst_summary.json'  # the final DST report: per-tensor densities, update history, FLOPs
DST_SUMMARY_CSV = 'dst_summary.csv'  # the launcher's DST row per epoch, beside timm's summary.csv
RESULTS = 'results.json'
EXPORT_BEST = 'model_best.safetensors'
EXPORT_LAST = 'model_last.safetensors'
DENSE_PHASE_DIR = 'dense'  # timm-dst-train's dense phase (the lottery ticket), a run folder inside the run's
REWIND_FILE = 'rewind.pth'


def rank_masks_file(rank: int) -> str:
    """The file of one process's final masks (the launcher's ``--dst-rank-masks DIR``)."""
    return f'masks_rank{rank}.pt'


# --------------------------------------------------------------------------------------------------------------------
# the atomic write
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """The atomic write of a file by name: the block writes the path it is given, a temporary file in the same folder
    (``<path>.part``), which is synced to disk and renamed over ``path`` (``os.replace``) when the block ends. When the
    block raises, the temporary file is removed and ``path`` is left as it was, byte for byte.

    A symbolic link stays a link: the file it points to is replaced. A path that is not a regular file (a device, a
    pipe) is given to the block itself, to write in place.

    Args:
        path: The file to write.

    Yields:
        The path to write (the temporary file).
    """
    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        yield path
        return
    tmp = path + '.part'
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb', **open_kwargs: Any) -> Iterator[IO[Any]]:
    """:func:`atomic_path` with the file open: the block writes to the open temporary file.

    Args:
        path: The file to write.
        mode: ``open``'s mode: ``'wb'`` or ``'w'``.
        open_kwargs: Further ``open`` arguments (``newline=''``, ``encoding``).

    Yields:
        The open temporary file.
    """
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def link_atomic(src: str, dst: str) -> None:
    """Make ``dst`` a copy of ``src`` atomically (a hard link where the file system allows, else a copy)."""
    tmp = dst + '.part'
    try:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)


def save_safetensors_atomic(state: Mapping[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None):
    """Write a state_dict as safetensors, atomically (:func:`atomic_write`)."""
    from safetensors.torch import save
    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)


def write_json_atomic(obj: Any, path: str, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` as indented JSON, atomically (:func:`atomic_write`).

    Args:
        obj: The value.
        path: The file.
        default: ``json.dump``'s ``default`` (e.g. ``list`` for tuples and sets inside).
    """
    with atomic_write(path, 'w') as f:
        json.dump(obj, f, indent=2, default=default)


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


# --------------------------------------------------------------------------------------------------------------------
# JSON summaries and log lines
def dst_summary(sparsifier: Any, flops: Any | None = None) -> dict[str, Any]:
    """The ``dst_summary.json`` content: per-tensor density and explored fraction, final R_s, update history, and
    with ``flops`` (a :class:`timm_dst.core.flops.TrainingFlops`) inference and training FLOPs (docs/flops.md)."""
    out = {
        'method': sparsifier.method_name, 'sparsity': sparsifier.sparsity, 'distribution': sparsifier.distribution,
        'density': sparsifier.density, 'model_density': sparsifier.model_density,  # sparse tensors; all weights
        'itop_rate': sparsifier.itop_rate, 'step': sparsifier.step,
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
