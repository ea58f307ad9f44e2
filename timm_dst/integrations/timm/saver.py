"""The one checkpoint saver of timm-dst: timm's ``CheckpointSaver`` writing the timm-dst layout.

:class:`DstCheckpointSaver` serves every front end: ``timm-dst-train`` builds it, the launcher
(``python -m timm_dst.run train.py``) hands a subclass of it to train.py in place of timm's, and :func:`pack_saver`
turns the saver of an edited train.py into one (docs/timm-train.md). It keeps timm's bookkeeping (``last``,
``model_best``, the ``checkpoint-N`` history, ``recovery-E-B``) and timm's checkpoint dict: its ``_save`` hook lets
timm build the dict and packs it (:func:`~timm_dst.integrations.timm.pack_checkpoint`) on its way to the file. That
needs one swap: while timm's ``_save`` runs, the name ``torch`` *in the module that defines it* (timm's
``checkpoint_saver``) stands for a copy of ``torch`` whose ``save`` packs the first dict of this thread and writes it
atomically (:func:`~timm_dst.integrations.timm.outputs.atomic_path`); ``torch.save`` itself is never replaced.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from timm.utils import CheckpointSaver

from .checkpoint import pack_checkpoint
from .outputs import OutputWriteError, atomic_path, is_write_failure, link_atomic, write_failure_cause

__all__ = ['DstCheckpointSaver', 'pack_saver', 'packing_torch_save']


class _NamedScaler:
    """A ``torch.amp.GradScaler`` (Accelerate's) with the ``state_dict_key`` of timm's ``NativeScaler``, under which
    timm's ``_save`` stores it (``amp_scaler``)."""

    state_dict_key = 'amp_scaler'

    def __init__(self, scaler: Any):
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scaler.load_state_dict(state)


class _SavingTorch:
    """``torch`` as one module sees it while one checkpoint is written: ``save`` is the packing save."""

    def __init__(self, save: Callable[..., Any]):
        self.save = save

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class DstCheckpointSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` whose every file (``last``, ``model_best``, ``checkpoint-N``, ``recovery-E-B``) holds
    plain timm weights in ``state_dict`` / ``state_dict_ema`` and the DST state under ``timm_dst``.

    Each file is written atomically: a failed write (a full disk, a vanished folder) leaves every earlier checkpoint
    as it was and raises :class:`~timm_dst.integrations.timm.outputs.OutputWriteError` in one line.

    Args:
        state_fn: Returns further entries of the DST state, called at each write (``timm-dst-train``: the run's
            position, meters and every rank's random states; the launcher: the DST options).
        sparsifier: The run's sparsifier.
        flops: Its training-FLOPs counter (:class:`~timm_dst.core.flops.TrainingFlops`), if any.
        scheduler: An lr scheduler whose state goes under ``scheduler`` (timm's own train.py saves none).
        rng: Store this process's random states in the DST state (default: without ``state_fn`` only; the run state
            of ``timm-dst-train`` holds every rank's).
        ema_orig: Store the EMA's ``x_orig`` tensors as ``ema_orig`` in the DST state (default: with ``state_fn``:
            ``timm-dst-train``'s resume reads them).
        kwargs: timm's ``CheckpointSaver`` arguments (``model``, ``optimizer``, ``args``, ``model_ema``,
            ``amp_scaler``, ``checkpoint_dir``, ...). An ``amp_scaler`` without timm's ``state_dict_key`` (a torch
            ``GradScaler``) is stored under ``amp_scaler`` as ``NativeScaler``'s is.
    """

    def __init__(self, state_fn: Callable[[], Mapping[str, Any]] | None = None, sparsifier: Any = None,
                 flops: Any = None, scheduler: Any = None, *, rng: bool | None = None, ema_orig: bool | None = None,
                 **kwargs: Any):
        scaler = kwargs.get('amp_scaler')
        if scaler is not None and not hasattr(scaler, 'state_dict_key'):
            kwargs['amp_scaler'] = _NamedScaler(scaler)
        super().__init__(**kwargs)
        self.setup_dst(sparsifier, flops, state_fn=state_fn, scheduler=scheduler, rng=rng, ema_orig=ema_orig)

    def setup_dst(self, sparsifier: Any, flops: Any = None, state_fn: Callable[[], Mapping[str, Any]] | None = None,
                  scheduler: Any = None, rng: bool | None = None, ema_orig: bool | None = None) -> None:
        """Set what the checkpoints hold besides timm's entries (the arguments of the class)."""
        self.sparsifier, self.flops, self.state_fn, self.scheduler = sparsifier, flops, state_fn, scheduler
        self.store_rng = state_fn is None if rng is None else rng
        self.store_ema_orig = state_fn is not None if ema_orig is None else ema_orig

    # ------------------------------------------------------------------------------------------------------------
    # timm's hooks
    def _save(self, save_path: str, epoch: int, metric: float | None = None) -> None:
        """timm's ``_save`` (which builds the checkpoint dict), its dict packed and written atomically."""
        try:
            with self._packing():
                super()._save(save_path, epoch, metric)
        except (OSError, RuntimeError) as e:
            if not is_write_failure(e):
                raise
            self._write_failed(save_path, epoch, e)

    def _replace(self, src: str, dst: str) -> None:
        """Rename a written file over its target in one step (timm removes the target first)."""
        os.replace(src, dst)

    def _duplicate(self, src: str, dst: str) -> None:
        """``checkpoint-N`` / ``model_best`` as a hard link (or a copy) of ``last``, replaced in one step."""
        link_atomic(src, dst)

    def save_last(self, epoch: int) -> None:
        """Write ``last`` only (not ranked, no history entry: a mid-epoch stop)."""
        tmp = os.path.join(self.checkpoint_dir, 'tmp' + self.extension)
        self._save(tmp, epoch)
        self._replace(tmp, os.path.join(self.checkpoint_dir, 'last' + self.extension))

    # ------------------------------------------------------------------------------------------------------------
    def pack(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Turn the dict timm's ``_save`` built into the timm-dst layout, in place (and return it). Without a
        sparsifier (yet) it stays timm's."""
        if self.sparsifier is None:
            return checkpoint
        if self.scheduler is not None:
            checkpoint['scheduler'] = self.scheduler.state_dict()
        extra = dict(self.state_fn()) if self.state_fn is not None else {}
        ema = checkpoint.get('state_dict_ema')
        if self.store_ema_orig and isinstance(ema, Mapping):  # the EMA under its masks (the plain EMA holds zeros)
            extra['ema_orig'] = {k: v for k, v in ema.items() if k.endswith('_orig')}
        return pack_checkpoint(checkpoint, self.sparsifier, flops=self.flops, rng=self.store_rng, extra=extra)

    def _write_failed(self, save_path: str, epoch: int, e: BaseException) -> None:
        """A checkpoint write failed: remove timm's partial temporary file and raise one line."""
        if os.path.islink(save_path) or os.path.isfile(save_path):
            with contextlib.suppress(OSError):
                os.remove(save_path)  # timm's temporary name (tmp / recovery_tmp), renamed over the target once whole
        raise OutputWriteError(f'checkpoint of epoch {epoch} not written: {save_path} ({write_failure_cause(e)}); '
                               'the checkpoints written before are unchanged') from e

    def _next_save(self) -> Callable[..., Any]:
        """The ``_save`` that ``super()._save`` runs (timm's, or that of a saver class :func:`pack_saver` converted)."""
        mro = type(self).__mro__
        for cls in mro[mro.index(DstCheckpointSaver) + 1:]:
            if '_save' in vars(cls):
                return vars(cls)['_save']
        raise RuntimeError('timm_dst: no CheckpointSaver._save to wrap')

    @contextlib.contextmanager
    def _packing(self) -> Iterator[None]:
        """Within the block, the first dict that the module of the next ``_save`` hands to ``torch.save`` on this
        thread is packed (:meth:`pack`) and written atomically; nothing else is touched.

        Raises:
            RuntimeError: When the block saved no dict that way (the checkpoint would lack the DST state).
        """
        fn = self._next_save()
        namespace = getattr(fn, '__globals__', {})
        if namespace.get('torch') is not torch:
            raise RuntimeError(f'timm_dst: {fn.__qualname__} does not write through torch.save; its checkpoints '
                               'cannot hold the DST state (this timm version saves differently)')
        thread, packed = threading.get_ident(), []

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if packed or not isinstance(obj, dict) or threading.get_ident() != thread:
                return torch.save(obj, f, *args, **kwargs)
            packed.append(True)
            self.pack(obj)
            if not isinstance(f, (str, os.PathLike)):
                return torch.save(obj, f, *args, **kwargs)
            with atomic_path(f) as tmp:
                return torch.save(obj, tmp, *args, **kwargs)

        namespace['torch'] = _SavingTorch(save)
        try:
            yield
        finally:
            namespace['torch'] = torch
        if not packed:
            raise RuntimeError(f'timm_dst: {fn.__qualname__} saved no dict through torch.save; the checkpoint lacks '
                               'the DST state (this timm version saves differently)')


def pack_saver(saver: CheckpointSaver, sparsifier: Any, flops: Any | None = None) -> DstCheckpointSaver:
    """Make a timm ``CheckpointSaver`` (made by an edited train.py) a :class:`DstCheckpointSaver`, in place: every
    checkpoint it writes (``checkpoint-N``, ``last``, ``model_best``, recovery) has the timm-dst layout, this process's
    random states included. A subclass of timm's saver keeps its own methods. Returns the saver."""
    if not isinstance(saver, DstCheckpointSaver):
        cls = type(saver)
        saver.__class__ = DstCheckpointSaver if cls is CheckpointSaver else type(
            cls.__name__, (DstCheckpointSaver, cls), {'__module__': cls.__module__, '__qualname__': cls.__qualname__})
    saver.setup_dst(sparsifier, flops, rng=True, ema_orig=False)
    return saver


@contextlib.contextmanager
def packing_torch_save(sparsifier: Any, flops: Any | None = None,
                       extra: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Deprecated (use :class:`DstCheckpointSaver` or :func:`pack_saver`): within the block, the first dict handed to
    ``torch.save`` anywhere in the process is packed (:func:`pack_checkpoint`) first.

    Raises:
        RuntimeError: When the block saved no dict through ``torch.save``.
    """
    warnings.warn('packing_torch_save is deprecated: use DstCheckpointSaver or pack_saver (it stays for one release)',
                  DeprecationWarning, stacklevel=3)
    real_save, seen = torch.save, []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(obj, dict) and not seen:
            seen.append(True)
            pack_checkpoint(obj, sparsifier, flops=flops, extra=extra)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    try:
        yield
    finally:
        torch.save = real_save
    if not seen:
        raise RuntimeError('timm_dst: the checkpoint write saved no dict through torch.save; the checkpoint lacks the '
                           'DST state (this timm version saves differently)')


def __getattr__(name: str) -> Any:
    if name == 'DSTCheckpointSaver':  # the launcher's saver class had this name
        warnings.warn('DSTCheckpointSaver is deprecated: it is DstCheckpointSaver (the old name stays for one release)',
                      DeprecationWarning, stacklevel=2)
        return DstCheckpointSaver
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
