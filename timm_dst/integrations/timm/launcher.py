"""timm-dst-run: run an unmodified timm ``train.py`` with dynamic sparse training.

::

    python -m timm_dst.run PATH/TO/train.py DATA --model resnet50 ... --dst rigl-itop --sparsity 0.9
    torchrun --nproc_per_node 2 -m timm_dst.run train.py ...
    accelerate launch -m timm_dst.run train.py ...

The DST flags (``--dst``, ``--sparsity``, ``--update-interval``, ... and every method's own flags: the names of
``timm-dst-train``, see :func:`timm_dst.integrations.timm.add_dst_args`) are taken out of the arguments, wherever they
stand; everything else reaches train.py untouched (``-c config.yaml`` included). Before the script runs as ``__main__``,
timm's public functions it calls are wrapped where train.py looks them up (``timm.models``, ``timm.optim``,
``timm.scheduler``, ``timm.utils``, ``timm.task``):

* ``create_model`` records the models made (the student is the first one the optimizer trains, not a distillation
  teacher); ``optimizer_kwargs(cfg=args)`` hands over train.py's parsed arguments (seed, batch size, input size);
* ``create_optimizer_v2``: the model and its optimizer exist (weights of ``--pretrained`` / ``--initial-checkpoint``
  are loaded by then). The sparsifier attaches right after ``--resume`` has loaded (``resume_checkpoint`` /
  ``resume_task_checkpoint``), or without one at the first of: the EMA copy (``ModelEma*``), DDP, ``torch.compile``,
  the ``CheckpointSaver``, ``create_scheduler_v2``. So it is attached before EMA, DDP and compile in every timm 1.0.x
  train.py;
* ``create_scheduler_v2`` returns the scheduled epochs; with its ``updates_per_epoch`` (already divided by the gradient
  accumulation) they give the run's optimizer steps (:meth:`Sparsifier.set_total_steps`);
* ``CheckpointSaver`` writes every checkpoint (``checkpoint-N``, ``last``, ``model_best``, recovery) in the
  :func:`timm_dst.integrations.timm.pack_checkpoint` layout: plain timm ``state_dict`` / ``state_dict_ema`` plus the
DST state;
* ``update_summary`` (once per epoch) appends a row to ``dst_summary.csv`` beside ``summary.csv``.

See docs/timm-train.md.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import json
import logging
import os
import pickle
import runpy
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ...core.controller import NonFiniteGradientError
from ...core.flops import TrainingFlops
from .checkpoint import (
    CheckpointError,
    model_state,
    packing_torch_save,
    read_checkpoint,
    read_checkpoint_file,
    read_dst_state,
    restore_dst_state,
)
from .config import _coerce, read_yaml_config, writable_folder_problem
from .flags import (
    add_dst_args,
    begin_training,
    create_sparsifier_from_args,
    dst_option_strings,
    dst_options,
    option_changes,
    sparsifier_kwargs,
    validate_dst_args,
)
from .outputs import dst_summary, flops_line, is_write_failure, short_error, write_failure_cause

__all__ = ['main', 'split_argv', 'Launcher']

PROG = 'timm-dst-run'
DST_SUMMARY_CSV = 'dst_summary.csv'
DST_SUMMARY_JSON = 'dst_summary.json'
_logger = logging.getLogger('train')  # timm's train.py logger: the launcher's lines read like its own


class LaunchError(Exception):
    """A problem with the arguments or the script: reported in one line, exit status 2."""


def _fail(msg: str) -> None:
    print(f'{PROG}: error: {msg}', file=sys.stderr, flush=True)
    raise SystemExit(2)


def _rank() -> int:
    """This process's rank (from the environment once train.py has destroyed its process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get('RANK', 0))


def _is_primary() -> bool:
    return _rank() == 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# --------------------------------------------------------------------------------------------------------------------
# arguments
class _Parser(argparse.ArgumentParser):
    """argparse with its errors as the launcher's one line (no usage block), exit status 2."""

    def error(self, message: str):
        _fail(message)


def create_parser() -> argparse.ArgumentParser:
    """The launcher's parser: the DST flags only (train.py parses the rest)."""
    parser = _Parser(
        prog=PROG, allow_abbrev=False, add_help=False,
        usage=f'{PROG} PATH/TO/train.py [train.py arguments] [DST flags]   (or python -m timm_dst.run ...)',
        description='Run an unmodified timm train.py with dynamic sparse training. The DST flags below may stand '
                    'anywhere after the script; every other argument goes to train.py as it is. '
                    '`%(prog)s train.py --help` shows train.py\'s own flags after these. See docs/timm-train.md.')
    parser.add_argument('-h', '--help', action='store_true', help='show this help (and train.py\'s) and exit')
    g = add_dst_args(parser)  # --dst defaults to the registry's DEFAULT_METHOD
    g.add_argument('--dst-rank-masks', default=None, metavar='DIR',
                   help='each process writes its final masks and R_s to DIR/masks_rank<R>.pt (to check that the '
                        'ranks agree)')
    return parser


def split_argv(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Split the launcher's arguments into the script, train.py's arguments and the DST flags (with their values).

    DST flags match exactly (``--sparsity 0.9`` or ``--sparsity=0.9``); flags taking several values take the
    following arguments up to the next one starting with ``-``. The script is the first other argument ending in
    ``.py``.
    """
    opts = {**dst_option_strings(), '--dst-rank-masks': 1}
    script, rest, dst = None, [], []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split('=', 1)[0] if tok.startswith('--') else tok
        if name in opts:
            dst.append(tok)
            n = opts[name]
            i += 1
            if '=' in tok:
                continue
            if n == -1:
                while i < len(argv) and not _is_flag(argv[i]):
                    dst.append(argv[i])
                    i += 1
            else:
                dst.extend(argv[i:i + n])
                i += n
            continue
        if script is None and not tok.startswith('-') and tok.endswith('.py'):
            script = tok
        else:
            rest.append(tok)
        i += 1
    return script, rest, dst


class _ConfigParser(argparse.ArgumentParser):
    """timm train.py's first parser (``-c/--config`` only), with errors as the launcher's one line."""

    def error(self, message: str):
        _fail(f'-c/--config: {message}')


def read_train_config(rest: list[str], dst_parser: argparse.ArgumentParser) -> tuple[str, set[str]] | None:
    """Check the ``-c/--config`` YAML that train.py will read (found in its arguments as train.py's own first parser
    finds it), before train.py starts; its DST keys (``sparsity: 0.9``, ...) become the defaults of ``dst_parser``
    (the DST flags on the command line win). Returns the config's path and keys (None without a config).

    Refused in one line, exit status 2: no such file, unreadable, not valid YAML, not a mapping (an empty file
    included: train.py cannot read it), a key given twice (YAML keeps the last silently), a key with dashes
    (train.py's ``parser.set_defaults`` reads ``batch_size``; ``batch-size`` would be ignored), a DST value of the
    wrong type. Keys that are no flag of train.py are refused once train.py defines its flags
    (:meth:`Launcher.patched`).
    """
    config_parser = _ConfigParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str)
    path = config_parser.parse_known_args(rest)[0].config
    if not path:
        return None
    cfg = read_yaml_config(path, _fail)
    if not isinstance(cfg, dict):
        got = 'an empty file' if cfg is None else f'a {type(cfg).__name__}'
        _fail(f'-c/--config {path}: expected a mapping of train.py flag names (with underscores) to values, got {got}')
    for key in cfg:
        if not isinstance(key, str):
            _fail(f'-c/--config {path}: key {key!r} is not a flag name (keys are train.py\'s flag names)')
        if '-' in key:
            twin = key.lstrip('-').replace('-', '_')
            both = f'keys {key} and {twin} both name --{twin.replace("_", "-")}: ' if twin in cfg else f'key {key}: '
            _fail(f'-c/--config {path}: {both}train.py reads config keys with underscores ({twin}); a key with '
                  'dashes would be ignored')
    actions = {a.dest: a for a in dst_parser._actions if a.dest != 'help'}
    defaults = {}
    for key, value in cfg.items():
        if key in actions:
            try:
                defaults[key] = _coerce(actions[key], value)
            except ValueError as e:
                _fail(f'-c/--config {path}: key {key}: {value!r} is not accepted; expected {e}')
    dst_parser.set_defaults(**defaults)
    return path, set(cfg)


def _is_flag(tok: str) -> bool:
    if not tok.startswith('-') or tok == '-':
        return False
    try:
        float(tok)
        return False
    except ValueError:
        return True


def _read_user_checkpoint(path: str, flag: str) -> Mapping[str, Any]:
    """A checkpoint file named by ``flag``, read (memory-mapped) before timm reads it: a folder, a missing, empty,
    truncated or foreign file, or one that holds no dict, is one line (timm-dst-train's wording), exit status 2."""
    if os.path.isdir(path):
        _fail(f'{flag} {path}: a folder; give a checkpoint file (e.g. {os.path.join(path, "last.pth.tar")})')
    if not os.path.isfile(path):
        _fail(f'{flag} {path}: no such file')
    try:
        if path.endswith('.safetensors'):
            return read_checkpoint_file(path, flag)
        ckpt = read_checkpoint(path)  # memory-mapped: cheap for any size
    except Exception as e:  # the one-line reason of timm-dst-train (empty, truncated, not a torch file, ...)
        try:
            read_checkpoint_file(path, flag)
        except CheckpointError as reason:
            _fail(str(reason))
        _fail(f'{flag} {path}: not a readable checkpoint ({short_error(e)})')
    if not isinstance(ckpt, Mapping):
        _fail(f'{flag} {path}: expected a checkpoint dict or a state_dict, got {type(ckpt).__name__}')
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
# the launcher
class Launcher:
    """Wraps timm's public functions for one run of a train.py and attaches the sparsifier at the right moment.

    Args:
        dst_args: The parsed DST flags (:func:`timm_dst.integrations.timm.add_dst_args`).
        script: The train.py path (for messages).
    """

    def __init__(self, dst_args: argparse.Namespace, script: str = 'train.py'):
        self.dst_args = dst_args
        self.script = script
        self.train_args: argparse.Namespace | None = None
        self.models: list[weakref.ref] = []
        self.pending: tuple[nn.Module, Any] | None = None
        self.sparsifier: Any = None
        self.flops: Any = None
        self.model: nn.Module | None = None
        self.resume_epoch: int | None = None
        self.updates_per_epoch: int | None = None
        self.output_dir: str | None = None
        self.optimizer_seen = False
        self.scheduler_seen = False
        self.config_path: str | None = None  # the -c config, and its keys (checked against train.py's flags)
        self.config_keys: set[str] | None = None
        self.options: dict[str, Any] = {}  # plugin.dst_options, stored in every checkpoint
        self._resume_args: Any = None  # the --resume checkpoint's args (train.py's, DST flags in an edited script)
        self._last_logged_update = 0
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------------------------------------------------
    # patching
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
        for owner in (timm.utils, sys.modules.get('timm.utils.summary')):
            patch(owner, 'get_outdir', shared(self._wrap_get_outdir))
        patch(argparse.ArgumentParser, 'set_defaults', self._wrap_set_defaults)
        patch(torch, 'compile', shared(self._wrap_before))
        saver_cls = self._saver_class(timm.utils.CheckpointSaver)
        for owner in (timm.utils, sys.modules.get('timm.utils.checkpoint_saver')):
            patch(owner, 'CheckpointSaver', lambda orig: saver_cls)
        for cls_name in ('ModelEma', 'ModelEmaV2', 'ModelEmaV3'):
            patch(getattr(timm.utils.model_ema, cls_name, None), '__init__', self._wrap_before)
        patch(DistributedDataParallel, '__init__', self._wrap_ddp)
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        hook = register_optimizer_step_pre_hook(self._any_step)
        try:
            yield
        finally:
            hook.remove()
            for owner, name, orig in reversed(saved):
                setattr(owner, name, orig)

    def _wrap_create_model(self, orig: Callable) -> Callable:
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
                    _fail(f'--initial-checkpoint {path}: its weights do not load into --model {name} '
                          f'({short_error(e)})')
            self.models.append(weakref.ref(model))
            return model
        return create_model

    def _wrap_optimizer_kwargs(self, orig: Callable) -> Callable:
        def optimizer_kwargs(*args: Any, **kwargs: Any) -> dict[str, Any]:
            cfg = kwargs.get('cfg', args[0] if args else None)
            if isinstance(cfg, argparse.Namespace) and self.train_args is None:
                self.train_args = cfg
            return orig(*args, **kwargs)
        return optimizer_kwargs

    def _wrap_create_optimizer(self, orig: Callable) -> Callable:
        def create_optimizer_v2(model_or_params: Any, *args: Any, **kwargs: Any) -> Any:
            optimizer = orig(model_or_params, *args, **kwargs)
            if self.optimizer_seen:
                _logger.warning(f'{PROG}: create_optimizer_v2 called again: the sparsifier stays with the first '
                                'optimizer')
                return optimizer
            self.optimizer_seen = True
            if not isinstance(model_or_params, nn.Module):
                _fail(f'{self.script} gives create_optimizer_v2 parameters, not the model: the launcher needs the '
                      'model (edit the script with timm_dst.integrations.timm instead, see docs/timm-train.md)')
            self.pending = (self._student(model_or_params), optimizer)
            return optimizer
        return create_optimizer_v2

    def _student(self, trained: nn.Module) -> nn.Module:
        """The first model made by ``create_model`` that the optimizer trains (the module itself or a part of it)."""
        inside = {id(m) for m in trained.modules()}
        for ref in self.models:
            m = ref()
            if m is not None and id(m) in inside:
                return m
        return trained

    def _wrap_before(self, orig: Callable) -> Callable:
        """Attach (if still pending) before ``orig`` runs: EMA, DDP, torch.compile."""
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.attach()
            return orig(*args, **kwargs)
        wrapper.__wrapped__ = orig  # type: ignore[attr-defined]
        return wrapper

    def _wrap_ddp(self, orig: Callable) -> Callable:
        """Attach before DDP wraps the model. Also: ``device_ids=[cpu]`` (timm's train.py with ``--device cpu``),
        which DDP refuses, becomes None, DDP's way of saying a CPU module."""
        def __init__(ddp: Any, module: nn.Module, *args: Any, **kwargs: Any) -> None:
            self.attach()
            ids = kwargs.get('device_ids')
            if ids and all(torch.device(d).type == 'cpu' for d in ids if not isinstance(d, int)) \
                    and not any(isinstance(d, int) for d in ids):
                kwargs['device_ids'] = None
            orig(ddp, module, *args, **kwargs)
        return __init__

    def _wrap_resume(self, orig: Callable) -> Callable:
        def resume(model: Any, checkpoint_path: str, *args: Any, **kwargs: Any) -> Any:
            self._check_resume(checkpoint_path)
            if self.sparsifier is None:
                epoch = self._timm_resume(orig, model, checkpoint_path, *args, **kwargs)
                self.resume_epoch = epoch
                self.attach(resume_path=checkpoint_path)
                return epoch
            # attached already: the masks first, then the plain weights reach the masked model through its load hooks
            self._restore(checkpoint_path)
            epoch = self._timm_resume(orig, model, checkpoint_path, *args, **kwargs)
            self.resume_epoch = epoch
            return epoch
        return resume

    @staticmethod
    def _timm_resume(orig: Callable, model: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        """timm's resume, with what it raises for a checkpoint :meth:`_check_resume` let through as one line."""
        try:
            return orig(model, path, *args, **kwargs)
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
            _fail(f'--resume {path}: timm cannot resume from it ({short_error(e)})')

    def _check_resume(self, path: str) -> None:
        """Before timm reads a ``--resume`` checkpoint: a readable checkpoint file whose weights fit the model, saved
        with the same optimizer (unless ``--no-resume-opt``). Anything else is one line, exit status 2, where timm
        would raise from deep inside ``torch.load`` or ``load_state_dict``."""
        ckpt = _read_user_checkpoint(path, '--resume')
        a = self.train_args
        old_args = self._resume_args = ckpt.get('args')
        old_opt, opt = getattr(old_args, 'opt', None), getattr(a, 'opt', None)
        if old_opt is not None and opt is not None and not getattr(a, 'no_resume_opt', False) \
                and str(old_opt).lower() != str(opt).lower():
            _fail(f'--resume {path}: the run was trained with --opt {old_opt}; resume with the same --opt, or add '
                  '--no-resume-opt to start a fresh optimizer state')
        model = self.pending[0] if self.pending is not None else self.model
        if model is not None:
            problem = _weights_misfit(model, model_state(ckpt))
            if problem:
                arch, name = ckpt.get('arch'), getattr(a, 'model', None)
                which = f'the checkpoint is of model {arch!r}, not --model {name!r}: ' if arch and name and \
                    arch != name else ''
                _fail(f'--resume {path}: {which}its weights do not fit the model ({problem})')

    def _wrap_create_scheduler(self, orig: Callable) -> Callable:
        def create_scheduler_v2(*args: Any, **kwargs: Any) -> Any:
            self.attach()
            out = orig(*args, **kwargs)
            if self.scheduler_seen or self.sparsifier is None:
                return out
            self.scheduler_seen = True
            num_epochs = out[1] if isinstance(out, tuple) and len(out) == 2 else None
            num_epochs = num_epochs or kwargs.get('num_epochs')
            upe = int(kwargs.get('updates_per_epoch') or 0)
            if not num_epochs or upe < 1:
                _fail(f'{self.script} calls create_scheduler_v2 without updates_per_epoch: the run\'s optimizer '
                      'steps are unknown (timm 1.0.x train.py passes them)')
            self.updates_per_epoch = upe
            total = int(num_epochs) * upe
            sp = self.sparsifier
            start = int(self.resume_epoch) * upe if self.resume_epoch else None
            if sp.resume_state is not None and start is not None and sp.step != start:
                _logger.warning(f'DST: the checkpoint\'s {sp.step} optimizer steps differ from timm\'s count '
                                f'({self.resume_epoch} epochs x {upe}): another process count, batch size or '
                                'accumulation than the saved run, or a recovery checkpoint; topology updates '
                                f'continue from step {sp.step}')
            if sp.resume_state is not None and sp.resume_state.get('rng') is not None and _world_size() > 1:
                self._log('DST: random states of a multi-process run are not restored (rank 0\'s only saved)')
            begin_training(sp, total, start_step=start)
            self._log(f'DST: {sp.method_name} over {total} optimizer steps ({num_epochs} epochs x {upe}), '
                      f'step {sp.step}, density {sp.density:.4f}, R_s {sp.itop_rate:.4f}')
            return out
        return create_scheduler_v2

    def _wrap_update_summary(self, orig: Callable) -> Callable:
        def update_summary(epoch: int, *args: Any, **kwargs: Any) -> Any:
            filename = kwargs.get('filename', args[2] if len(args) > 2 else None)
            try:
                out = orig(epoch, *args, **kwargs)
            except OSError as e:
                _fail(f'{filename}: the row of epoch {epoch} was not written ({short_error(e)})')
            if filename and self.sparsifier is not None:
                self.output_dir = os.path.dirname(os.path.abspath(filename))
                self._epoch_row(int(epoch), os.path.join(self.output_dir, DST_SUMMARY_CSV))
            return out
        return update_summary

    def _wrap_get_outdir(self, orig: Callable) -> Callable:
        def get_outdir(path: str, *paths: str, **kwargs: Any) -> str:
            try:
                return orig(path, *paths, **kwargs)
            except OSError as e:
                folder = os.path.join(path, *paths)
                problem = writable_folder_problem(folder) or short_error(e)
                _fail(f'--output {path}: cannot create the run folder {folder}: {problem}; give a writable folder')
        return get_outdir

    def _wrap_set_defaults(self, orig: Callable) -> Callable:
        """train.py's ``parser.set_defaults(**config)``: a config key that is no flag of train.py (nor a DST flag)
        would only add an attribute nobody reads; refused in one line."""
        launcher = self

        def set_defaults(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
            keys = launcher.config_keys
            if keys is not None and set(kwargs) == keys:
                launcher.config_keys = None  # train.py's call: checked once
                known = {a.dest for a in parser._actions} | set(vars(launcher.dst_args))
                unknown = sorted(k for k in keys if k not in known)
                if unknown:
                    _fail(f'-c/--config {launcher.config_path}: unknown key(s) {", ".join(unknown)}: not a flag of '
                          f'{launcher.script} nor a DST flag (keys are the flag names with underscores, see '
                          f'{launcher.script} --help)')
            return orig(parser, **kwargs)
        return set_defaults

    def _saver_class(self, base: type) -> type:
        launcher = self

        class DSTCheckpointSaver(base):  # type: ignore[misc, valid-type]
            """timm's ``CheckpointSaver``; every file it writes holds plain timm weights and the DST state."""

            def __init__(self, *args: Any, **kwargs: Any):
                launcher.attach()
                super().__init__(*args, **kwargs)
                launcher.output_dir = getattr(self, 'checkpoint_dir', None) or launcher.output_dir
                self._target: tuple[str, int] | None = None  # (the file being written, its epoch)
                for folder in {getattr(self, 'checkpoint_dir', ''), getattr(self, 'recovery_dir', '')} - {''}:
                    problem = writable_folder_problem(folder)
                    if problem:
                        _fail(f'--output: cannot write checkpoints in {folder}: {problem}; give a writable folder')

            def save_checkpoint(self, epoch: int, *args: Any, **kwargs: Any) -> Any:
                last = os.path.join(self.checkpoint_dir, 'last' + self.extension)
                self._target = (last, epoch)
                try:
                    return super().save_checkpoint(epoch, *args, **kwargs)
                except OSError as e:  # renaming the written file to last, or its copies (checkpoint-N, model_best)
                    tmp = os.path.join(self.checkpoint_dir, 'tmp' + self.extension)
                    if os.path.exists(tmp):
                        launcher._save_failed(tmp, self._target, e)
                    copy = getattr(e, 'filename2', None) or e.filename or \
                        f'{self.save_prefix}-{epoch}{self.extension} / model_best{self.extension}'
                    _fail(f'checkpoint of epoch {epoch} written to {last}, but not its copy {copy} '
                          f'({e.strerror or e})')
                finally:
                    self._target = None

            def save_recovery(self, epoch: int, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Any:
                name = '-'.join([getattr(self, 'recovery_prefix', 'recovery'), str(epoch), str(batch_idx)])
                self._target = (os.path.join(self.recovery_dir, name + self.extension), epoch)
                try:
                    return super().save_recovery(epoch, batch_idx, *args, **kwargs)
                finally:
                    self._target = None

            def _save(self, save_path: str, *args: Any, **kwargs: Any) -> Any:
                try:
                    if launcher.sparsifier is None:
                        return super()._save(save_path, *args, **kwargs)
                    with packing_torch_save(launcher.sparsifier, launcher.flops, extra={'options': launcher.options}):
                        return super()._save(save_path, *args, **kwargs)
                except (OSError, RuntimeError) as e:
                    if not is_write_failure(e):
                        raise
                    launcher._save_failed(save_path, self._target, e)

        DSTCheckpointSaver.__name__ = DSTCheckpointSaver.__qualname__ = base.__name__
        return DSTCheckpointSaver

    @staticmethod
    def _save_failed(save_path: str, target: tuple[str, int] | None, e: BaseException) -> None:
        """A checkpoint write failed (a full disk, a read-only or vanished folder): remove the partial file, say which
        checkpoint was not written and that the previous one is untouched, exit 2."""
        target_path, epoch = target if target is not None else (save_path, None)
        if save_path != target_path and (os.path.islink(save_path) or os.path.isfile(save_path)):
            with contextlib.suppress(OSError):
                os.remove(save_path)  # timm writes to a temporary name, renamed over the target once complete
        cause = write_failure_cause(e)
        kept = (f'the previous {os.path.basename(target_path)} is unchanged' if os.path.isfile(target_path)
                else 'no earlier checkpoint of that name exists')
        which = f'of epoch {epoch} ' if epoch is not None else ''
        _fail(f'checkpoint {which}not written: {target_path} ({cause}); {kept}')

    def _any_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Every optimizer's step pre-hook: a step before the sparsifier is attached (and told the run's length)
        means train.py does not use the timm functions the launcher relies on."""
        if self.sparsifier is None:
            _fail(f'{self.script}: an optimizer stepped before the sparsifier attached: the launcher needs '
                  'timm.create_model / timm.optim.create_optimizer_v2 / timm.scheduler.create_scheduler_v2 '
                  '(edit the script with timm_dst.integrations.timm instead, see docs/timm-train.md)')
        if self.sparsifier.method.attaches and self.sparsifier.total_steps is None:
            _fail(f'{self.script}: training started without create_scheduler_v2: the run\'s optimizer steps are '
                  'unknown to the sparsifier')

    # ------------------------------------------------------------------------------------------------------------
    # attaching
    def attach(self, resume_path: str | None = None) -> None:
        """Create the sparsifier on the student model and its optimizer, once (no-op when nothing is pending)."""
        if self.pending is None:
            return
        model, optimizer = self.pending
        self.pending = None
        seed = getattr(self.train_args, 'seed', None)  # train.py's --seed unless --dst-seed is given
        kw = sparsifier_kwargs(self.dst_args, seed=int(seed) if seed is not None else 42)
        try:
            sp = create_sparsifier_from_args(model, optimizer, self.dst_args, resume=resume_path, seed=kw['seed'])
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            _fail(f'--resume {resume_path}: {e}' if resume_path else f'--dst {self.dst_args.dst}: {e}')
        self.sparsifier, self.model = sp, model
        self.options = dst_options(self.dst_args)
        self.flops = self._make_flops(TrainingFlops, model, sp)
        state = sp.resume_state
        self._log_option_changes(state)
        if state is not None and self.flops is not None and state.get('flops') is not None:
            self.flops.load_state_dict(state['flops'])
        elif resume_path and state is None:
            self._log(f'DST: {resume_path} holds no timm_dst state: sparse training starts from its weights '
                      f'({sp.mask_init} initial topology)')
        self._hooks.append(sp.optimizer.register_step_post_hook(self._after_step))
        self._last_logged_update = len(sp.history)
        self._log(f'DST: attached {sp!r}')

    def _read_state(self, path: str) -> dict[str, Any] | None:
        try:
            return read_dst_state(path)
        except (ValueError, RuntimeError, OSError) as e:
            _fail(f'--resume {path}: {e}')
        return None

    def _restore(self, path: str) -> None:
        """A resume after attaching (not timm's order): the weights came in through the load hooks."""
        state = self._read_state(path)
        sp = self.sparsifier
        if state is not None:
            try:
                restore_dst_state(sp, state, flops=self.flops, rng=False)
            except (ValueError, KeyError) as e:
                _fail(f'--resume {path}: {e}')
        sp.resume_state = state
        self._log_option_changes(state)

    def _log_option_changes(self, state: Mapping[str, Any] | None) -> None:
        """On a resume: the DST options that differ from the checkpoint's, in one line. The checkpoint's options are
        in its DST state (launcher checkpoints), else in its ``args`` (a train.py edited with
        timm_dst.integrations.timm)."""
        if not isinstance(state, Mapping):
            return
        old = state.get('options')
        if old is None and getattr(self._resume_args, 'dst', None) == self.dst_args.dst:
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                old = dst_options(self._resume_args)
        changes = option_changes(old, self.options)
        if changes:
            self._log(f'DST: resuming with {changes}')

    def _make_flops(self, cls: type, model: nn.Module, sp: Any) -> Any:
        """Training FLOPs at train.py's input size and nominal global batch (batch x accumulation x processes)."""
        a = self.train_args
        try:
            from timm.data import resolve_data_config
            input_size = resolve_data_config(vars(a) if a is not None else {}, model=model)['input_size']
            batch = int(getattr(a, 'batch_size', 1) or 1) * int(getattr(a, 'grad_accum_steps', 1) or 1)
            return cls(model, input_size, sp, samples_per_step=batch * _world_size(), attach=True)
        except Exception as e:  # FLOPs are a report: a model flop_counter cannot trace trains all the same
            _logger.warning(f'DST: no FLOPs count ({type(e).__name__}: {e})')
            return None

    # ------------------------------------------------------------------------------------------------------------
    # reporting
    def _log(self, msg: str) -> None:
        if _is_primary():
            _logger.info(msg)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        sp = self.sparsifier
        if len(sp.history) > self._last_logged_update:
            self._last_logged_update = len(sp.history)
            h = sp.history[-1]
            self._log(f'DST: step {sp.step}  topology update {len(sp.history) - 1}  prune rate {h["prune_rate"]:.4f}  '
                      f'density {h["density"]:.4f}  R_s {h["itop_rate"]:.4f}')

    def row(self, epoch: int) -> dict[str, Any]:
        """The DST columns of one epoch."""
        sp = self.sparsifier
        row = {'epoch': epoch, 'step': sp.step, 'topology_updates': max(len(sp.history) - 1, 0),
               'density': f'{sp.density:.6f}', 'itop_rate': f'{sp.itop_rate:.6f}'}
        if self.flops is not None:
            s = self.flops.summary()
            row.update({'inference_flops_ratio': f'{s["inference_flops_ratio"]:.6f}',
                        'train_flops': f'{s["train_flops"]:.6g}', 'train_flops_ratio': f'{s["train_flops_ratio"]:.6f}'})
        return row

    def _epoch_row(self, epoch: int, path: str) -> None:
        row = self.row(epoch)
        rows = []
        if os.path.isfile(path):  # a resumed run: rows of the epochs it repeats are replaced
            with open(path, newline='') as f:
                rows = [r for r in csv.DictReader(f) if int(r['epoch']) < epoch]
        rows.append(row)
        try:
            with open(path, 'w', newline='') as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
                writer.writerows(rows)
        except OSError as e:
            _fail(f'{path}: the row of epoch {epoch} was not written ({short_error(e)})')
        self._log(f'DST: epoch {epoch}  step {row["step"]}  density {row["density"]}  R_s {row["itop_rate"]}')

    def finish(self) -> dict[str, Any] | None:
        """After train.py returns: the final density, R_s and sparse FLOPs (logged, and ``dst_summary.json`` in the
        output folder)."""
        sp = self.sparsifier
        if sp is None:
            return None
        summary = dst_summary(sp, self.flops)
        line = f'DST: {sp.method_name} final density {sp.density:.4f}  R_s {sp.itop_rate:.4f}'
        if self.flops is not None:
            line += f'  {flops_line(summary)}'
        self._log(line)
        if self.output_dir and _is_primary():
            path = os.path.join(self.output_dir, DST_SUMMARY_JSON)
            try:
                with open(path, 'w') as f:
                    json.dump(summary, f, indent=2, default=list)
            except OSError as e:
                _fail(f'{path} was not written ({short_error(e)})')
        folder = getattr(self.dst_args, 'dst_rank_masks', None)
        if folder and sp.method.attaches:
            os.makedirs(folder, exist_ok=True)
            torch.save({'masks': {t.name: t.mask.cpu() for t in sp.targets}, 'itop_rate': sp.itop_rate,
                        'step': sp.step}, os.path.join(folder, f'masks_rank{_rank()}.pt'))
        return summary


# --------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """``timm-dst-run PATH/TO/train.py [train.py arguments] [DST flags]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = create_parser()
    script, rest, dst_tokens = split_argv(argv)
    wants_help = any(t in ('-h', '--help') for t in argv)
    if wants_help:
        parser.print_help()
        if script is None:
            return
        print(f'\n--- {script} --help ---', flush=True)
    elif script is None:
        _fail('give the path of a timm train.py first, e.g. timm-dst-run ../pytorch-image-models/train.py DATA '
              '--model resnet50 --dst rigl-itop (see --help)')
    if not os.path.isfile(script):
        what = 'a folder' if os.path.isdir(script) else 'no such file'
        _fail(f'{script}: {what} (give the path of a timm train.py)')
    try:
        with open(script, 'rb') as f:
            compile(f.read(), script, 'exec')
    except (SyntaxError, ValueError) as e:
        where = f', line {e.lineno}' if getattr(e, 'lineno', None) else ''
        _fail(f'{script}: not a Python script ({getattr(e, "msg", None) or short_error(e)}{where}); give the path of a '
              'timm train.py')
    except OSError as e:
        _fail(f'{script}: cannot be read ({short_error(e)})')
    config = None if wants_help else read_train_config(rest, parser)
    dst_args, unknown = parser.parse_known_args(dst_tokens)
    if unknown:
        _fail(f'unexpected DST argument(s): {" ".join(unknown)}')
    validate_dst_args(dst_args, _fail)
    if dst_args.dst_rank_masks:
        problem = writable_folder_problem(dst_args.dst_rank_masks)
        if problem:
            _fail(f'--dst-rank-masks {dst_args.dst_rank_masks}: {problem}; give a writable folder')

    launcher = Launcher(dst_args, script=script)
    if config is not None:
        launcher.config_path, launcher.config_keys = config
    script_path = os.path.abspath(script)
    old_argv = sys.argv
    sys.argv = [script_path] + rest  # as `python train.py ...` sees them
    sys.path.insert(0, os.path.dirname(script_path))
    try:
        try:
            with launcher.patched():
                runpy.run_path(script_path, run_name='__main__')
        except OSError as e:  # a write of train.py's own (args.yaml, ...) on a full or read-only disk
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            _fail(f'{e.filename or "a file"} was not written ({e.strerror})')
        except NonFiniteGradientError as e:  # training diverged: one line, exit 1 (as timm-dst-train)
            print(f'{PROG}: {e}', file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        if not launcher.optimizer_seen and not wants_help:
            _fail(f'{script} ran to its end without creating an optimizer with timm.optim.create_optimizer_v2: '
                  'nothing was trained with DST (give the path of a timm train.py)')
        launcher.finish()
    finally:
        sys.argv = old_argv
        sys.path.remove(os.path.dirname(script_path))


if __name__ == '__main__':
    main()
