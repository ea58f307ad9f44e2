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
* ``CheckpointSaver`` is :class:`~timm_dst.integrations.timm.saver.DstCheckpointSaver` (the saver of every front
  end): every checkpoint (``checkpoint-N``, ``last``, ``model_best``, recovery) has the
  :func:`timm_dst.integrations.timm.pack_checkpoint` layout: plain timm ``state_dict`` / ``state_dict_ema`` plus the
  DST state;
* ``update_summary`` (once per epoch) appends a row to ``dst_summary.csv`` beside ``summary.csv``.

Modules: this one holds :class:`Launcher` (what happens at each event: attaching, resuming, reporting) and
:func:`main`; :mod:`.launch` the command line (:func:`split_argv`, :func:`create_parser`, :func:`read_train_config`);
:mod:`.patches` the wrappers of timm's and torch's entry points and the saver train.py gets; :mod:`._report` the
one-line failures and log lines. See docs/timm-train.md.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import os
import runpy
import sys
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ...core.controller import NonFiniteGradientError
from ...core.flops import TrainingFlops
from ...methods._registry import get_method_info
from ._lth import rewind_hooks, run_two_phases, two_phases
from ._report import PROG, LaunchError, fail, is_primary, log, logger, rank, world_size
from ._snip import init_data
from .checkpoint import read_dst_state, restore_dst_state
from .config import writable_folder_problem
from .flags import (
    check_dst_values,
    create_sparsifier_from_args,
    dst_options,
    option_changes,
    sparsifier_kwargs,
    validate_dst_args,
)
from .launch import create_parser, read_train_config, split_argv
from .outputs import (
    DST_SUMMARY,
    atomic_path,
    atomic_write,
    dst_summary,
    flops_line,
    rank_masks_file,
    short_error,
    write_json_atomic,
)
from .patches import TimmPatches

__all__ = ['main', 'split_argv', 'create_parser', 'read_train_config', 'Launcher', 'LaunchError', 'PROG']


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
        self.resume_args: Any = None  # the --resume checkpoint's args (train.py's, DST flags in an edited script)
        self._last_logged_update = 0
        self._hooks: list[Any] = []
        # the hook points reached (check_hook_points): EMA copies (and those made before attaching), savers made,
        # checkpoints written and those packed with the DST state, the epochs with a dst_summary.csv row
        self.ema_made, self.ema_before_attach, self.savers_made, self.saves, self.packed = 0, 0, 0, 0, 0
        self.summary_epochs: set[int] = set()

    def patched(self) -> contextlib.AbstractContextManager[None]:
        """Install the wrappers of timm's entry points (:class:`~timm_dst.integrations.timm.patches.TimmPatches`),
        restored on exit."""
        return TimmPatches(self).patched()

    def check_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Every optimizer's step pre-hook: a step before the sparsifier is attached (and told the run's length)
        means train.py does not use the timm functions the launcher relies on."""
        if self.sparsifier is None:
            fail(f'{self.script}: an optimizer stepped before the sparsifier attached: the launcher needs '
                 'timm.create_model / timm.optim.create_optimizer_v2 / timm.scheduler.create_scheduler_v2 '
                 f'({_timm_version()}; edit the script with timm_dst.integrations.timm instead, see '
                 'docs/timm-train.md)')
        if self.sparsifier.method.attaches and self.sparsifier.total_steps is None:
            fail(f'{self.script}: training started without create_scheduler_v2: the run\'s optimizer steps are '
                 f'unknown to the sparsifier ({_timm_version()})')

    def check_hook_points(self, when: str, epoch: int | None = None, final: bool = False) -> None:
        """Stop with one line naming the first hook point train.py did not reach by ``when`` (the end of an epoch:
        ``epoch``, or of the run: ``final``), so that none is missed silently (docs/timm-train.md)."""
        sp, primary = self.sparsifier, is_primary()
        args = self.train_args
        missing = None
        if sp is None:
            missing = 'timm.optim.create_optimizer_v2 (the sparsifier never attached)'
        elif sp.method.attaches and sp.total_steps is None:
            missing = 'timm.scheduler.create_scheduler_v2 (the run\'s optimizer steps were never set)'
        elif args is None:
            missing = 'timm.optim.optimizer_kwargs(cfg=args) (train.py\'s seed, batch size and input size are unknown)'
        elif self.ema_before_attach:
            missing = 'ModelEma* after the sparsifier attached (an EMA copy was made of the dense model)'
        elif getattr(args, 'model_ema', False) and not self.ema_made:
            missing = 'timm.utils.ModelEma / ModelEmaV2 / ModelEmaV3 (--model-ema: the EMA copy is not known sparse)'
        elif primary and not self.savers_made:
            missing = 'timm.utils.CheckpointSaver (checkpoints would carry no DST state)'
        elif primary and self.packed < self.saves:
            missing = 'CheckpointSaver._save (a checkpoint was written without the DST state)'
        elif primary and epoch is not None and epoch not in self.summary_epochs:
            missing = f'timm.utils.update_summary (no dst_summary.csv row for epoch {epoch})'
        elif primary and final and sp.step > 0 and not self.summary_epochs:
            missing = 'timm.utils.update_summary (no dst_summary.csv row)'
        if missing:
            fail(f'{self.script}: hook point not reached by {when}: {missing} ({_timm_version()}); the launcher '
                 'relies on it: edit the script with timm_dst.integrations.timm instead, see docs/timm-train.md')

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
        data = init_data(self, kw, model, resume_path)  # SNIP: batches of train.py's training loader (_snip.py)
        try:
            sp = create_sparsifier_from_args(model, optimizer, self.dst_args, resume=resume_path, seed=kw['seed'],
                                             **data)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            fail(f'--resume {resume_path}: {e}' if resume_path else f'--dst {self.dst_args.dst}: {e}')
        self.sparsifier, self.model = sp, model
        self.options = dst_options(self.dst_args)
        self.flops = self._make_flops(TrainingFlops, model, sp)
        state = sp.resume_state
        self._log_option_changes(state)
        if state is not None and self.flops is not None and state.get('flops') is not None:
            self.flops.load_state_dict(state['flops'])
        elif resume_path and state is None:
            log(f'DST: {resume_path} holds no timm_dst state: sparse training starts from its weights '
                f'({sp.mask_init} initial topology)')
        self._hooks.append(sp.optimizer.register_step_post_hook(self._after_step))
        self._hooks += rewind_hooks(self)  # the dense phase of LTH: its rewind point (_lth.py)
        self._last_logged_update = len(sp.history)
        log(f'DST: attached {sp!r}')

    def _read_state(self, path: str) -> dict[str, Any] | None:
        try:
            return read_dst_state(path)
        except (ValueError, RuntimeError, OSError) as e:
            fail(f'--resume {path}: {e}')
        return None

    def restore_after_attach(self, path: str) -> None:
        """A resume after attaching (not timm's order): the weights came in through the load hooks."""
        state = self._read_state(path)
        sp = self.sparsifier
        if state is not None:
            try:
                restore_dst_state(sp, state, flops=self.flops, rng=False)
            except (ValueError, KeyError) as e:
                fail(f'--resume {path}: {e}')
        sp.resume_state = state
        self._log_option_changes(state)

    def _log_option_changes(self, state: Mapping[str, Any] | None) -> None:
        """On a resume: the DST options that differ from the checkpoint's, in one line. The checkpoint's options are
        in its DST state (launcher checkpoints), else in its ``args`` (a train.py edited with
        timm_dst.integrations.timm)."""
        if not isinstance(state, Mapping):
            return
        old = state.get('options')
        if old is None and getattr(self.resume_args, 'dst', None) == self.dst_args.dst:
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                old = dst_options(self.resume_args)
        changes = option_changes(old, self.options)
        if changes:
            log(f'DST: resuming with {changes}')

    def _make_flops(self, cls: type, model: nn.Module, sp: Any) -> Any:
        """Training FLOPs at train.py's input size and nominal global batch (batch x accumulation x processes)."""
        a = self.train_args
        try:
            from timm.data import resolve_data_config
            input_size = resolve_data_config(vars(a) if a is not None else {}, model=model)['input_size']
            batch = int(getattr(a, 'batch_size', 1) or 1) * int(getattr(a, 'grad_accum_steps', 1) or 1)
            return cls(model, input_size, sp, samples_per_step=batch * world_size(), attach=True)
        except Exception as e:  # FLOPs are a report: a model flop_counter cannot trace trains all the same
            logger.warning(f'DST: no FLOPs count ({type(e).__name__}: {e})')
            return None

    # ------------------------------------------------------------------------------------------------------------
    # reporting
    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        sp = self.sparsifier
        if len(sp.history) > self._last_logged_update:
            self._last_logged_update = len(sp.history)
            h = sp.history[-1]
            log(f'DST: step {sp.step}  topology update {len(sp.history) - 1}  prune rate {h["prune_rate"]:.4f}  '
                f'density {_densities(h["density"], _model_density(sp), 4)}  R_s {h["itop_rate"]:.4f}')

    def row(self, epoch: int) -> dict[str, Any]:
        """The DST columns of one epoch."""
        sp = self.sparsifier
        row = {'epoch': epoch, 'step': sp.step, 'topology_updates': max(len(sp.history) - 1, 0),
               'density': f'{sp.density:.6f}', 'model_density': _fmt(_model_density(sp)),
               'itop_rate': f'{sp.itop_rate:.6f}'}
        if self.flops is not None:
            s = self.flops.summary()
            row.update({'inference_flops_ratio': f'{s["inference_flops_ratio"]:.6f}',
                        'train_flops': f'{s["train_flops"]:.6g}', 'train_flops_ratio': f'{s["train_flops_ratio"]:.6f}'})
        return row

    def write_epoch_row(self, epoch: int, path: str) -> None:
        """Write the row of ``epoch`` to ``dst_summary.csv`` (atomically; a resumed run replaces the rows of the epochs
        it repeats) and log it."""
        row = self.row(epoch)
        rows = []
        if os.path.isfile(path):
            with open(path, newline='') as f:
                rows = [r for r in csv.DictReader(f) if int(r['epoch']) < epoch]
        rows.append(row)
        try:
            with atomic_write(path, 'w', newline='') as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
                writer.writerows(rows)
        except OSError as e:
            fail(f'{path}: the row of epoch {epoch} was not written ({short_error(e)})')
        densities = _densities(float(row['density']), _model_density(self.sparsifier), 6)
        log(f'DST: epoch {epoch}  step {row["step"]}  density {densities}  R_s {row["itop_rate"]}')

    def finish(self) -> dict[str, Any] | None:
        """After train.py returns: the final density, R_s and sparse FLOPs (logged, and ``dst_summary.json`` in the
        output folder)."""
        sp = self.sparsifier
        if sp is None:
            return None
        self.check_hook_points('the end of the run', final=True)
        summary = dst_summary(sp, self.flops)
        line = f'DST: {sp.method_name} final density {_densities(sp.density, _model_density(sp), 4)}  ' \
               f'R_s {sp.itop_rate:.4f}'
        if self.flops is not None:
            line += f'  {flops_line(summary)}'
        log(line)
        if self.output_dir and is_primary():
            path = os.path.join(self.output_dir, DST_SUMMARY)
            try:
                write_json_atomic(summary, path, default=list)
            except OSError as e:
                fail(f'{path} was not written ({short_error(e)})')
        folder = getattr(self.dst_args, 'dst_rank_masks', None)
        if folder and sp.method.attaches:
            os.makedirs(folder, exist_ok=True)
            with atomic_path(os.path.join(folder, rank_masks_file(rank()))) as tmp:
                torch.save({'masks': {t.name: t.mask.cpu() for t in sp.targets}, 'itop_rate': sp.itop_rate,
                            'step': sp.step}, tmp)
        return summary


def _timm_version() -> str:
    try:
        import timm
        return f'timm {timm.__version__}'
    except ImportError:
        return 'timm not importable'


def _model_density(sp: Any) -> float | None:
    """The density of all the model's weights (``Sparsifier.model_density``), None where the controller has none."""
    return getattr(sp, 'model_density', None)


def _fmt(x: float | None) -> str:
    return '' if x is None else f'{x:.6f}'


def _densities(density: float, model_density: float | None, digits: int) -> str:
    """``0.1000 (sparse tensors), 0.1234 (all weights)``: each density named."""
    text = f'{density:.{digits}f} (sparse tensors)'
    return text if model_density is None else f'{text}, {model_density:.{digits}f} (all weights)'


# --------------------------------------------------------------------------------------------------------------------
def provided_by_launcher(method: str) -> tuple[str, ...]:
    """The method's inputs the launcher supplies itself when the user gives none (checked at attach, not before
    train.py starts): the data batches of a SNIP-like method (train.py's loader) and a dense phase's trained state."""
    try:
        info = get_method_info(method)
    except ValueError:
        return ()
    phase = info.dense_phase
    return tuple(a for a in (info.init_data_arg, phase.trained_state_arg if phase else None) if a)


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
        fail('give the path of a timm train.py first, e.g. timm-dst-run ../pytorch-image-models/train.py DATA '
             '--model resnet50 --dst rigl-itop (see --help)')
    if not os.path.isfile(script):
        what = 'a folder' if os.path.isdir(script) else 'no such file'
        fail(f'{script}: {what} (give the path of a timm train.py)')
    try:
        with open(script, 'rb') as f:
            compile(f.read(), script, 'exec')
    except (SyntaxError, ValueError) as e:
        where = f', line {e.lineno}' if getattr(e, 'lineno', None) else ''
        fail(f'{script}: not a Python script ({getattr(e, "msg", None) or short_error(e)}{where}); give the path of a '
             'timm train.py')
    except OSError as e:
        fail(f'{script}: cannot be read ({short_error(e)})')
    config = None if wants_help else read_train_config(rest, parser)
    dst_args, unknown = parser.parse_known_args(dst_tokens)
    if unknown:
        fail(f'unexpected DST argument(s): {" ".join(unknown)}')
    validate_dst_args(dst_args, fail)
    check_dst_values(dst_args, fail, provided=provided_by_launcher(dst_args.dst))  # all that needs no model
    if dst_args.dst_rank_masks:
        problem = writable_folder_problem(dst_args.dst_rank_masks)
        if problem:
            fail(f'--dst-rank-masks {dst_args.dst_rank_masks}: {problem}; give a writable folder')

    if not wants_help and two_phases(dst_args):  # LTH: the dense phase, then the sparse phase (_lth.py)
        return run_two_phases(script, rest, dst_tokens, dst_args)
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
            fail(f'{e.filename or "a file"} was not written ({e.strerror})')
        except NonFiniteGradientError as e:  # training diverged: one line, exit 1 (as timm-dst-train)
            print(f'{PROG}: {e}', file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        if not launcher.optimizer_seen and not wants_help:
            fail(f'{script} ran to its end without creating an optimizer with timm.optim.create_optimizer_v2: '
                 'nothing was trained with DST (give the path of a timm train.py)')
        launcher.finish()
    finally:
        sys.argv = old_argv
        sys.path.remove(os.path.dirname(script_path))


if __name__ == '__main__':
    main()
