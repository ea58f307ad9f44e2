"""The launcher's wrappers of timm's and torch's entry points (:class:`TimmPatches`), installed where train.py looks
them up while it runs, and the checkpoint saver train.py gets in place of timm's (:func:`launcher_saver_class`).

Each wrapper calls the timm function it wraps and tells the :class:`~timm_dst.integrations.timm.launcher.Launcher`
what happened (a model, its optimizer, the resume, the run's length, an epoch's summary); the launcher decides what to
do. docs/timm-train.md lists them.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import pickle
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from timm.utils import CheckpointSaver

from ._report import PROG, fail, log, logger, world_size
from ._snip import wrap_create_loader
from .checkpoint import CheckpointError, model_state, read_checkpoint, read_checkpoint_file
from .config import writable_folder_problem
from .flags import begin_training
from .outputs import DST_SUMMARY_CSV, short_error, write_failure_cause
from .saver import DstCheckpointSaver

__all__ = ['TimmPatches', 'launcher_saver_class']


def _read_user_checkpoint(path: str, flag: str) -> Mapping[str, Any]:
    """A checkpoint file named by ``flag``, read (memory-mapped) before timm reads it: a folder, a missing, empty,
    truncated or foreign file, or one that holds no dict, is one line (timm-dst-train's wording), exit status 2."""
    if os.path.isdir(path):
        fail(f'{flag} {path}: a folder; give a checkpoint file (e.g. {os.path.join(path, "last.pth.tar")})')
    if not os.path.isfile(path):
        fail(f'{flag} {path}: no such file')
    try:
        if path.endswith('.safetensors'):
            return read_checkpoint_file(path, flag)
        ckpt = read_checkpoint(path)  # memory-mapped: cheap for any size
    except Exception as e:  # the one-line reason of timm-dst-train (empty, truncated, not a torch file, ...)
        try:
            read_checkpoint_file(path, flag)
        except CheckpointError as reason:
            fail(str(reason))
        fail(f'{flag} {path}: not a readable checkpoint ({short_error(e)})')
    if not isinstance(ckpt, Mapping):
        fail(f'{flag} {path}: expected a checkpoint dict or a state_dict, got {type(ckpt).__name__}')
    return ckpt


def _weights_misfit(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """How plain checkpoint weights do not fit ``model`` (masked or not): missing / unexpected keys, shapes that
    differ (first keys and counts), or None when they fit (timm's strict ``load_state_dict`` will take them)."""
    own = {}
    for key, value in model.state_dict().items():
        if key.endswith('_mask') and key[:-5] + '_orig' in model.state_dict():
            continue
        own[key[:-5] if key.endswith('_orig') else key] = value
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f'{label}: {", ".join(keys[:3])}{" ..." if len(keys) > 3 else ""} ({len(keys)})'
             for label, keys in (('missing', missing), ('unexpected', unexpected), ('shape differs', wrong)) if keys]
    return '; '.join(parts) or None


# --------------------------------------------------------------------------------------------------------------------
class TimmPatches:
    """The wrappers of one launcher run.

    Args:
        launcher: The :class:`~timm_dst.integrations.timm.launcher.Launcher` they report to.
    """

    def __init__(self, launcher: Any):
        self.launcher = launcher

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """Install the wrappers (restored on exit)."""
        import timm
        import timm.models
        import timm.optim
        import timm.scheduler
        import timm.scheduler.scheduler_factory
        import timm.utils
        import timm.utils.model_ema
        from torch.nn.parallel import DistributedDataParallel
        try:
            import timm.task as timm_task
        except ImportError:  # timm releases before the task API
            timm_task = None
        try:
            import timm.optim._optim_factory as optim_factory
        except ImportError:
            optim_factory = None

        saved: list[tuple[Any, str, Any]] = []

        def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
            if owner is None or not hasattr(owner, name):
                return
            orig = getattr(owner, name)
            saved.append((owner, name, orig))
            setattr(owner, name, make(orig))

        wrapped: dict[int, Any] = {}  # one wrapper per original function, shared by every module exposing it

        def shared(factory: Callable[[Any], Any]) -> Callable[[Any], Any]:
            def make(orig: Any) -> Any:
                if id(orig) not in wrapped:
                    wrapped[id(orig)] = factory(orig)
                return wrapped[id(orig)]
            return make

        for owner in (timm, timm.models):
            patch(owner, 'create_model', shared(self._wrap_create_model))
        for owner in (timm.optim, optim_factory):
            patch(owner, 'create_optimizer_v2', shared(self._wrap_create_optimizer))
            patch(owner, 'optimizer_kwargs', shared(self._wrap_optimizer_kwargs))
        for owner in (timm.scheduler, timm.scheduler.scheduler_factory):
            patch(owner, 'create_scheduler_v2', shared(self._wrap_create_scheduler))
        patch(timm.models, 'resume_checkpoint', shared(self._wrap_resume))
        if timm_task is not None:
            patch(timm_task, 'resume_task_checkpoint', shared(self._wrap_resume))
        patch(timm.utils, 'update_summary', shared(self._wrap_update_summary))
        import timm.data
        for owner in (timm.data, sys.modules.get('timm.data.loader')):  # SNIP's batches: train.py's loader (_snip.py)
            patch(owner, 'create_loader', shared(lambda orig: wrap_create_loader(self.launcher, orig)))
        for owner in (timm.utils, sys.modules.get('timm.utils.summary')):
            patch(owner, 'get_outdir', shared(self._wrap_get_outdir))
        patch(argparse.ArgumentParser, 'set_defaults', self._wrap_set_defaults)
        patch(torch, 'compile', shared(self._wrap_before))
        saver_cls = launcher_saver_class(self.launcher)
        for owner in (timm.utils, sys.modules.get('timm.utils.checkpoint_saver')):
            patch(owner, 'CheckpointSaver', lambda orig: saver_cls)
        for cls_name in ('ModelEma', 'ModelEmaV2', 'ModelEmaV3'):
            patch(getattr(timm.utils.model_ema, cls_name, None), '__init__', self._wrap_ema)
        patch(DistributedDataParallel, '__init__', self._wrap_ddp)
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        hook = register_optimizer_step_pre_hook(self.launcher.check_step)
        try:
            yield
        finally:
            hook.remove()
            for owner, name, orig in reversed(saved):
                setattr(owner, name, orig)

    def _wrap_create_model(self, orig: Callable) -> Callable:
        launcher = self.launcher

        def create_model(*args: Any, **kwargs: Any) -> nn.Module:
            path = kwargs.get('checkpoint_path')  # train.py's --initial-checkpoint, loaded by timm inside
            if not path:
                model = orig(*args, **kwargs)
            else:
                _read_user_checkpoint(path, '--initial-checkpoint')
                try:
                    model = orig(*args, **kwargs)
                except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
                    name = args[0] if args and isinstance(args[0], str) else kwargs.get('model_name')
                    fail(f'--initial-checkpoint {path}: its weights do not load into --model {name} '
                         f'({short_error(e)})')
            launcher.models.append(weakref.ref(model))
            return model
        return create_model

    def _wrap_optimizer_kwargs(self, orig: Callable) -> Callable:
        launcher = self.launcher

        def optimizer_kwargs(*args: Any, **kwargs: Any) -> dict[str, Any]:
            cfg = kwargs.get('cfg', args[0] if args else None)
            if isinstance(cfg, argparse.Namespace) and launcher.train_args is None:
                launcher.train_args = cfg
            return orig(*args, **kwargs)
        return optimizer_kwargs

    def _wrap_create_optimizer(self, orig: Callable) -> Callable:
        launcher = self.launcher

        def create_optimizer_v2(model_or_params: Any, *args: Any, **kwargs: Any) -> Any:
            optimizer = orig(model_or_params, *args, **kwargs)
            if launcher.optimizer_seen:
                logger.warning(f'{PROG}: create_optimizer_v2 called again: the sparsifier stays with the first '
                               'optimizer')
                return optimizer
            launcher.optimizer_seen = True
            if not isinstance(model_or_params, nn.Module):
                fail(f'{launcher.script} gives create_optimizer_v2 parameters, not the model: the launcher needs the '
                     'model (edit the script with timm_dst.integrations.timm instead, see docs/timm-train.md)')
            launcher.pending = (self._student(model_or_params), optimizer)
            return optimizer
        return create_optimizer_v2

    def _student(self, trained: nn.Module) -> nn.Module:
        """The first model made by ``create_model`` that the optimizer trains (the module itself or a part of it)."""
        launcher = self.launcher
        inside = {id(m) for m in trained.modules()}
        for ref in launcher.models:
            m = ref()
            if m is not None and id(m) in inside:
                return m
        return trained

    def _wrap_before(self, orig: Callable) -> Callable:
        """Attach (if still pending) before ``orig`` runs: EMA, DDP, torch.compile."""
        launcher = self.launcher

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            launcher.attach()
            return orig(*args, **kwargs)
        wrapper.__wrapped__ = orig  # type: ignore[attr-defined]
        return wrapper

    def _wrap_ema(self, orig: Callable) -> Callable:
        """Attach (if still pending) before an EMA copy is made; an EMA made before the sparsifier exists (before
        the optimizer) is a dense copy, reported at the next hook-point check."""
        launcher = self.launcher

        def __init__(*args: Any, **kwargs: Any) -> Any:
            launcher.attach()
            if launcher.sparsifier is None:
                launcher.ema_before_attach += 1
            else:
                launcher.ema_made += 1
            return orig(*args, **kwargs)
        __init__.__wrapped__ = orig  # type: ignore[attr-defined]
        return __init__

    def _wrap_ddp(self, orig: Callable) -> Callable:
        """Attach before DDP wraps the model. Also: ``device_ids=[cpu]`` (timm's train.py with ``--device cpu``),
        which DDP refuses, becomes None, DDP's way of saying a CPU module."""
        launcher = self.launcher

        def __init__(ddp: Any, module: nn.Module, *args: Any, **kwargs: Any) -> None:
            launcher.attach()
            ids = kwargs.get('device_ids')
            if ids and all(torch.device(d).type == 'cpu' for d in ids if not isinstance(d, int)) \
                    and not any(isinstance(d, int) for d in ids):
                kwargs['device_ids'] = None
            orig(ddp, module, *args, **kwargs)
        return __init__

    def _wrap_resume(self, orig: Callable) -> Callable:
        launcher = self.launcher

        def resume(model: Any, checkpoint_path: str, *args: Any, **kwargs: Any) -> Any:
            self._check_resume(checkpoint_path)
            if launcher.sparsifier is None:
                epoch = self._timm_resume(orig, model, checkpoint_path, *args, **kwargs)
                launcher.resume_epoch = epoch
                launcher.attach(resume_path=checkpoint_path)
                return epoch
            # attached already: the masks first, then the plain weights reach the masked model through its load hooks
            launcher.restore_after_attach(checkpoint_path)
            epoch = self._timm_resume(orig, model, checkpoint_path, *args, **kwargs)
            launcher.resume_epoch = epoch
            return epoch
        return resume

    @staticmethod
    def _timm_resume(orig: Callable, model: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        """timm's resume, with what it raises for a checkpoint :meth:`_check_resume` let through as one line."""
        try:
            return orig(model, path, *args, **kwargs)
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
            fail(f'--resume {path}: timm cannot resume from it ({short_error(e)})')

    def _check_resume(self, path: str) -> None:
        """Before timm reads a ``--resume`` checkpoint: a readable checkpoint file whose weights fit the model, saved
        with the same optimizer (unless ``--no-resume-opt``). Anything else is one line, exit status 2, where timm
        would raise from deep inside ``torch.load`` or ``load_state_dict``."""
        launcher = self.launcher
        ckpt = _read_user_checkpoint(path, '--resume')
        a = launcher.train_args
        old_args = launcher.resume_args = ckpt.get('args')
        old_opt, opt = getattr(old_args, 'opt', None), getattr(a, 'opt', None)
        if old_opt is not None and opt is not None and not getattr(a, 'no_resume_opt', False) \
                and str(old_opt).lower() != str(opt).lower():
            fail(f'--resume {path}: the run was trained with --opt {old_opt}; resume with the same --opt, or add '
                 '--no-resume-opt to start a fresh optimizer state')
        model = launcher.pending[0] if launcher.pending is not None else launcher.model
        if model is not None:
            problem = _weights_misfit(model, model_state(ckpt))
            if problem:
                arch, name = ckpt.get('arch'), getattr(a, 'model', None)
                which = f'the checkpoint is of model {arch!r}, not --model {name!r}: ' if arch and name and \
                    arch != name else ''
                fail(f'--resume {path}: {which}its weights do not fit the model ({problem})')

    def _wrap_create_scheduler(self, orig: Callable) -> Callable:
        launcher = self.launcher

        def create_scheduler_v2(*args: Any, **kwargs: Any) -> Any:
            launcher.attach()
            out = orig(*args, **kwargs)
            if launcher.scheduler_seen or launcher.sparsifier is None:
                return out
            launcher.scheduler_seen = True
            num_epochs = out[1] if isinstance(out, tuple) and len(out) == 2 else None
            num_epochs = num_epochs or kwargs.get('num_epochs')
            upe = int(kwargs.get('updates_per_epoch') or 0)
            if not num_epochs or upe < 1:
                fail(f'{launcher.script} calls create_scheduler_v2 without updates_per_epoch: the run\'s optimizer '
                     'steps are unknown (timm 1.0.x train.py passes them)')
            launcher.updates_per_epoch = upe
            total = int(num_epochs) * upe
            sp = launcher.sparsifier
            start = int(launcher.resume_epoch) * upe if launcher.resume_epoch else None
            if sp.resume_state is not None and start is not None and sp.step != start:
                logger.warning(f'DST: the checkpoint\'s {sp.step} optimizer steps differ from timm\'s count '
                               f'({launcher.resume_epoch} epochs x {upe}): another process count, batch size or '
                               'accumulation than the saved run, or a recovery checkpoint; topology updates '
                               f'continue from step {sp.step}')
            if sp.resume_state is not None and sp.resume_state.get('rng') is not None and world_size() > 1:
                log('DST: random states of a multi-process run are not restored (rank 0\'s only saved)')
            try:  # fractions of training resolved now: their order against the steps given
                begin_training(sp, total, start_step=start)
            except ValueError as e:
                fail(f'--dst {sp.method_name} over {total} optimizer steps ({num_epochs} epochs x {upe}): {e}')
            log(f'DST: {sp.method_name} over {total} optimizer steps ({num_epochs} epochs x {upe}), '
                f'step {sp.step}, density {sp.density:.4f}, R_s {sp.itop_rate:.4f}')
            return out
        return create_scheduler_v2

    def _wrap_update_summary(self, orig: Callable) -> Callable:
        launcher = self.launcher

        def update_summary(epoch: int, *args: Any, **kwargs: Any) -> Any:
            filename = kwargs.get('filename', args[2] if len(args) > 2 else None)
            try:
                out = orig(epoch, *args, **kwargs)
            except OSError as e:
                fail(f'{filename}: the row of epoch {epoch} was not written ({short_error(e)})')
            if filename and launcher.sparsifier is not None:
                launcher.output_dir = os.path.dirname(os.path.abspath(filename))
                launcher.write_epoch_row(int(epoch), os.path.join(launcher.output_dir, DST_SUMMARY_CSV))
                launcher.summary_epochs.add(int(epoch))
            launcher.check_hook_points(f'the end of epoch {epoch}')
            return out
        return update_summary

    def _wrap_get_outdir(self, orig: Callable) -> Callable:
        def get_outdir(path: str, *paths: str, **kwargs: Any) -> str:
            try:
                return orig(path, *paths, **kwargs)
            except OSError as e:
                folder = os.path.join(path, *paths)
                problem = writable_folder_problem(folder) or short_error(e)
                fail(f'--output {path}: cannot create the run folder {folder}: {problem}; give a writable folder')
        return get_outdir

    def _wrap_set_defaults(self, orig: Callable) -> Callable:
        """train.py's ``parser.set_defaults(**config)``: a config key that is no flag of train.py (nor a DST flag)
        would only add an attribute nobody reads; refused in one line."""
        launcher = self.launcher

        def set_defaults(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
            keys = launcher.config_keys
            if keys is not None and set(kwargs) == keys:
                launcher.config_keys = None  # train.py's call: checked once
                known = {a.dest for a in parser._actions} | set(vars(launcher.dst_args))
                unknown = sorted(k for k in keys if k not in known)
                if unknown:
                    fail(f'-c/--config {launcher.config_path}: unknown key(s) {", ".join(unknown)}: not a flag of '
                         f'{launcher.script} nor a DST flag (keys are the flag names with underscores, see '
                         f'{launcher.script} --help)')
            return orig(parser, **kwargs)
        return set_defaults


# --------------------------------------------------------------------------------------------------------------------
# the saver train.py gets
_TIMM_SAVER_ARGS = list(inspect.signature(CheckpointSaver.__init__).parameters)[1:]  # timm's, in order, without self


class _LauncherSaver(DstCheckpointSaver):
    """:class:`DstCheckpointSaver` as train.py builds it (timm's arguments): it attaches the sparsifier first (so the
    EMA, DDP and compile that follow see the sparse model), refuses checkpoint folders it cannot write, stores the
    launcher's DST options in every checkpoint, and says a failed write in the launcher's one line."""

    launcher: Any = None  # set by launcher_saver_class

    def __init__(self, *args: Any, **kwargs: Any):
        launcher = self.launcher
        launcher.attach()
        launcher.savers_made += 1
        kwargs.update(zip(_TIMM_SAVER_ARGS, args))
        super().__init__(lambda: {'options': launcher.options}, launcher.sparsifier, launcher.flops, rng=True,
                         ema_orig=False, **kwargs)
        launcher.output_dir = getattr(self, 'checkpoint_dir', None) or launcher.output_dir
        self._target: tuple[str, int] | None = None  # (the file being written, its epoch)
        for folder in {getattr(self, 'checkpoint_dir', ''), getattr(self, 'recovery_dir', '')} - {''}:
            problem = writable_folder_problem(folder)
            if problem:
                fail(f'--output: cannot write checkpoints in {folder}: {problem}; give a writable folder')

    def pack(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The launcher's sparsifier as it is at this write (None before it attaches: timm's plain checkpoint)."""
        self.sparsifier, self.flops = self.launcher.sparsifier, self.launcher.flops
        if self.sparsifier is not None:
            self.launcher.packed += 1
        return super().pack(checkpoint)

    def save_checkpoint(self, epoch: int, *args: Any, **kwargs: Any) -> Any:
        last = os.path.join(self.checkpoint_dir, 'last' + self.extension)
        self._target = (last, epoch)
        self.launcher.saves += 1
        try:
            out = super().save_checkpoint(epoch, *args, **kwargs)
            self.launcher.check_hook_points(f'the end of epoch {epoch}', epoch=int(epoch))
            return out
        except OSError as e:  # renaming the written file to last, or its copies (checkpoint-N, model_best)
            tmp = os.path.join(self.checkpoint_dir, 'tmp' + self.extension)
            if os.path.exists(tmp):
                self._write_failed(tmp, epoch, e)
            copy = getattr(e, 'filename2', None) or e.filename or \
                f'{self.save_prefix}-{epoch}{self.extension} / model_best{self.extension}'
            fail(f'checkpoint of epoch {epoch} written to {last}, but not its copy {copy} ({e.strerror or e})')
        finally:
            self._target = None

    def save_recovery(self, epoch: int, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Any:
        name = '-'.join([getattr(self, 'recovery_prefix', 'recovery'), str(epoch), str(batch_idx)])
        self._target = (os.path.join(self.recovery_dir, name + self.extension), epoch)
        self.launcher.saves += 1
        try:
            return super().save_recovery(epoch, batch_idx, *args, **kwargs)
        finally:
            self._target = None

    def _write_failed(self, save_path: str, epoch: int, e: BaseException) -> None:
        """A checkpoint write failed (a full disk, a read-only or vanished folder): remove the partial file, say which
        checkpoint was not written and that the previous one is untouched, exit 2."""
        target_path, epoch = self._target if self._target is not None else (save_path, epoch)
        if save_path != target_path and (os.path.islink(save_path) or os.path.isfile(save_path)):
            with contextlib.suppress(OSError):
                os.remove(save_path)  # timm writes to a temporary name, renamed over the target once complete
        kept = (f'the previous {os.path.basename(target_path)} is unchanged' if os.path.isfile(target_path)
                else 'no earlier checkpoint of that name exists')
        fail(f'checkpoint of epoch {epoch} not written: {target_path} ({write_failure_cause(e)}); {kept}')


def launcher_saver_class(launcher: Any) -> type[DstCheckpointSaver]:
    """The class train.py gets as ``timm.utils.CheckpointSaver`` under ``launcher``: a :class:`DstCheckpointSaver`
    (of that name) taking timm's arguments."""
    return type('DstCheckpointSaver', (_LauncherSaver,), {'launcher': launcher, '__module__': __name__,
                                                          '__qualname__': 'DstCheckpointSaver'})
