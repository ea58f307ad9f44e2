"""Resuming a ``timm-dst-train`` run from its checkpoint: the checks that make a resume safe (one-line errors), the
restore of every piece of state, and a longer or shorter ``--epochs`` handled consistently."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch
import torch.nn as nn

from ..integrations.timm.checkpoint import (
    DST_KEY,
    CheckpointError,
    check_resume_compatible,
    check_resume_source,
    check_same_model_and_opt,
    load_dense_weights,
    load_plain_state_dict,
    model_state,
    read_checkpoint_file,
    restore_dst_state,
)
from ..integrations.timm.flags import dst_options, option_changes
from ..integrations.timm.outputs import SUMMARY_CSV
from .config import user_error
from .outputs import truncate_summary
from .sharded import DCP_DIR, is_sharded_checkpoint, load_sharded
from .state import RunResume, RunState

__all__ = ['load_resume', 'resume_run']

_logger = logging.getLogger('timm_dst.train')


def load_resume(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer) -> RunResume:
    """Read the ``--resume`` checkpoint before the sparsifier is created (it is built from the model this leaves).

    A dense checkpoint (a timm checkpoint without DST state) has its weights (and, unless ``--no-resume-opt``, its
    optimizer state) loaded into the model now, so the initial topology (``--mask-init``) is chosen from them, as
    timm's train.py under the launcher does (:func:`timm_dst.integrations.timm.create_sparsifier_from_args`).

    Args:
        args: The parsed flags.
        model: The freshly built model.
        optimizer: Its optimizer.

    Returns:
        The checkpoint and whether it is dense; :func:`resume_run` restores the rest.
    """
    try:
        ckpt = read_checkpoint_file(args.resume, '--resume')
        if is_sharded_checkpoint(ckpt) or args.fsdp:
            check_sharded_source(args, ckpt)
            return RunResume(ckpt=ckpt, dense=False)
        dense = check_resume_source(args.resume, ckpt, args)
        if dense:
            load_dense_weights(model, ckpt, args.resume, '--resume')
            if not args.no_resume_opt:
                _load_optimizer(args, optimizer, ckpt)
    except CheckpointError as e:
        raise user_error(str(e)) from None
    return RunResume(ckpt=ckpt, dense=dense)


def check_sharded_source(args: argparse.Namespace, ckpt: dict[str, Any]) -> None:
    """A ``--fsdp`` run resumes a ``--fsdp`` checkpoint of the same model and optimizer, and only that.

    Raises:
        CheckpointError: What differs, in one line.
    """
    if not is_sharded_checkpoint(ckpt):
        raise CheckpointError(f'--resume {args.resume}: not a checkpoint of a --fsdp run (its tensors are in the '
                              'file); resume it without --fsdp, or start from its weights with --initial-checkpoint')
    if not args.fsdp:
        raise CheckpointError(f'--resume {args.resume}: a checkpoint of a --fsdp run (its tensors sharded in '
                              f'{DCP_DIR}/{ckpt[DST_KEY]["dcp"]}): resume it with --fsdp')
    check_same_model_and_opt(args.resume, ckpt, args)
    if 'run' not in ckpt[DST_KEY]:
        raise CheckpointError(f'--resume {args.resume}: its DST state holds no timm-dst-train run state')


def _load_optimizer(args: argparse.Namespace, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any]) -> None:
    if ckpt.get('optimizer') is None:
        raise CheckpointError(f'--resume {args.resume}: holds no optimizer state; add --no-resume-opt to start a '
                              'fresh one')
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f'--resume {args.resume}: its optimizer state does not fit --opt {args.opt} ({e}); '
                              'add --no-resume-opt to start a fresh one') from None


def _option_changes(old_args: Any, args: Any) -> str:
    """The DST options the resumed run changes (``--update-interval 500 (the checkpoint was trained with 1000)``),
    from the checkpoint's ``args``; '' when none, or when the checkpoint's arguments cannot say."""
    if getattr(old_args, 'dst', None) != args.dst:
        return ''
    try:
        return option_changes(dst_options(old_args), dst_options(args))
    except (ValueError, KeyError, TypeError, AttributeError):  # arguments of an older version: nothing to compare
        return ''


def dense_start_epoch(ckpt: dict[str, Any]) -> int:
    """The epoch a dense timm checkpoint continues at, as ``timm.models.resume_checkpoint`` counts it (the saved
    epoch + 1 for checkpoints of version 2 and later)."""
    epoch = int(ckpt.get('epoch') or 0)
    return epoch + 1 if int(ckpt.get('version') or 0) > 1 else epoch


def resume_run(state: RunState) -> None:
    """Restore a ``--resume`` checkpoint into a built run (weights, optimizer, sparsifier, EMA, schedule, position,
    meters, random states); every user error is one line, exit status 2."""
    args, acc, tr = state.setup.args, state.setup.accelerator, state.training
    ckpt = state.resume.ckpt
    if state.resume.dense:
        return _resume_dense(state, ckpt)
    try:
        if is_sharded_checkpoint(ckpt):  # every rank reads its shards (DCP)
            saved = dict(ckpt[DST_KEY])
            load_sharded(state, ckpt, args.resume, optimizer=not args.no_resume_opt)
        else:
            saved = check_resume_compatible(args.resume, ckpt, args)
            # the masks first: loading weights into the model re-applies the masks it carries at that moment
            restore_dst_state(tr.sparsifier, saved, flops=tr.flops, rng=False)
            load_plain_state_dict(tr.model, model_state(ckpt))
        pos = saved['run']
        if not args.no_resume_opt and not is_sharded_checkpoint(ckpt):
            try:
                tr.optimizer.load_state_dict(ckpt['optimizer'])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f'--resume {args.resume}: its optimizer state does not fit --opt '
                                      f'{args.opt} ({e}); add --no-resume-opt to start a fresh one') from None
    except CheckpointError as e:
        raise user_error(str(e)) from None
    except ValueError as e:  # the sparsifier's own check (method, sparsity, distribution, tensors)
        raise user_error(f'--resume {args.resume}: {e}') from None
    changes = _option_changes(ckpt.get('args'), args)
    if changes:
        _logger.warning(f'resuming with {changes}')
    if tr.ema is not None:
        if ckpt.get('state_dict_ema') is None:
            raise user_error(f'--resume {args.resume}: no EMA in the checkpoint (trained without --model-ema)')
        _restore_ema(state, model_state(ckpt, use_ema=True), pos.get('ema_orig') or saved.get('ema_orig'))
    if pos['num_epochs'] == tr.num_epochs and ckpt.get('scheduler') is not None and tr.scheduler is not None:
        tr.scheduler.load_state_dict(ckpt['scheduler'])
    elif pos['num_epochs'] != tr.num_epochs:
        _extend(state, pos)
    at = state.position
    at.start_epoch, at.start_batch = pos['next_epoch'], pos['next_batch']
    at.num_updates = pos['num_updates']
    at.meters = dict(pos.get('meters') or at.meters)
    state.resume.scaler = None if args.no_resume_opt else ckpt.get('amp_scaler')
    state.resume.saver = ckpt.get('saver')
    rngs = pos.get('rng') or []
    if len(rngs) == acc.num_processes:
        state.resume.rng = rngs[acc.process_index]
    else:
        _logger.warning(f'checkpoint from {len(rngs)} process(es), now {acc.num_processes}: random states are '
                        're-seeded (data order is unchanged)')
    _resumed(state)


def _resumed(state: RunState) -> None:
    """Drop the rows of ``summary.csv`` past the resumed epoch; log where the run continues."""
    pos = state.position
    if state.setup.is_main:
        truncate_summary(os.path.join(state.setup.output_dir, SUMMARY_CSV), pos.start_epoch)
    _logger.info(f'resumed from {state.setup.args.resume}: epoch {pos.start_epoch}, batch {pos.start_batch}, '
                 f'{pos.num_updates} optimizer steps')


def _resume_dense(state: RunState, ckpt: dict[str, Any]) -> None:
    """The rest of a dense ``--resume`` (weights, optimizer state and masks are in place): position, lr schedule,
    EMA and AMP scaler; the run continues at the checkpoint's next epoch with fresh meters and random states."""
    args, tr = state.setup.args, state.training
    sp = tr.sparsifier
    start = dense_start_epoch(ckpt)
    if start >= tr.num_epochs:
        raise user_error(f'--resume {args.resume}: the dense checkpoint is at epoch {start}, at or past the end of '
                         f'--epochs {args.epochs}')
    pos = state.position
    pos.start_epoch, pos.start_batch, pos.num_updates = start, 0, start * state.data.updates_per_epoch
    if tr.scheduler is not None and start > 0:
        if args.sched_on_updates:
            tr.scheduler.step_update(pos.num_updates)
        else:
            tr.scheduler.step(start)
    if tr.ema is not None:
        _restore_ema(state, model_state(ckpt, use_ema=True), None)
    state.resume.scaler = None if args.no_resume_opt else ckpt.get('amp_scaler')
    if state.setup.is_main:
        truncate_summary(os.path.join(state.setup.output_dir, SUMMARY_CSV), pos.start_epoch)
    opt = 'a fresh optimizer state' if args.no_resume_opt else 'its optimizer state'
    _logger.info(f'resumed from {args.resume}: a dense checkpoint (no timm-dst state): sparse training starts from '
                 f'its weights with {opt} at epoch {start} (optimizer step {pos.num_updates}); initial topology by '
                 f'--mask-init {sp.mask_init}, density {sp.density:.4f}')


def _extend(state: RunState, pos: dict[str, Any]) -> None:
    """A resume with another ``--epochs``: the lr schedule and the sparsifier both follow the new length (the
    schedule is rebuilt for it and stepped to the checkpoint's position; the sparsifier already counts the new
    total), or the run is refused when the checkpoint is past the new end."""
    args, tr = state.setup.args, state.training
    if pos['num_updates'] > tr.total_steps:
        raise user_error(f'--resume {args.resume}: the run is at optimizer step {pos["num_updates"]}, past '
                         f'the end of --epochs {args.epochs} ({tr.total_steps} steps)')
    if tr.scheduler is not None:
        if args.sched_on_updates:
            tr.scheduler.step_update(pos['num_updates'])
        else:
            tr.scheduler.step(pos['next_epoch'])
    _logger.info(f'resume: {pos["num_epochs"]} -> {tr.num_epochs} epochs; the lr schedule and the sparsifier '
                 f'(total {tr.total_steps} optimizer steps) follow the new length')


@torch.no_grad()
def _restore_ema(state: RunState, plain: dict[str, torch.Tensor], orig: dict[str, torch.Tensor] | None) -> None:
    ema, model = state.training.ema, state.training.model
    load_plain_state_dict(ema.module, plain)
    own = dict(ema.module.named_buffers())
    for name, buf in model.named_buffers():  # the EMA's masks are the model's
        if name.endswith('_mask') and name in own:
            own[name].copy_(buf)
    if orig:
        params = dict(ema.module.named_parameters())
        for k, v in orig.items():
            if k in params:
                params[k].copy_(v)
