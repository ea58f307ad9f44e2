"""Resuming a ``timm-dst-train`` run from its checkpoint: the checks that make a resume safe (one-line errors), the
restore of every piece of state, and a longer or shorter ``--epochs`` handled consistently."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..integrations.timm.checkpoint import (
    CheckpointError,
    check_resume_compatible,
    check_resume_source,
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

__all__ = ['load_resume', 'resume_run']

_logger = logging.getLogger('timm_dst.train')


def load_resume(run: Any) -> bool:
    """Read the ``--resume`` checkpoint (kept in ``run.resume_ckpt``) before the sparsifier is created; returns whether
    it is dense (a timm checkpoint without DST state). A dense one's weights (and, unless ``--no-resume-opt``, its
    optimizer state) are loaded into the model now, so the initial topology (``--mask-init``) is chosen from them,
    as timm's train.py under the launcher does (:func:`timm_dst.integrations.timm.create_sparsifier_from_args`)."""
    args = run.args
    try:
        run.resume_ckpt = ckpt = read_checkpoint_file(args.resume, '--resume')
        dense = check_resume_source(args.resume, ckpt, args)
        if dense:
            load_dense_weights(run.model, ckpt, args.resume, '--resume')
            if not args.no_resume_opt:
                _load_optimizer(run, ckpt)
    except CheckpointError as e:
        raise user_error(str(e)) from None
    return dense


def _load_optimizer(run: Any, ckpt: dict[str, Any]) -> None:
    args = run.args
    if ckpt.get('optimizer') is None:
        raise CheckpointError(f'--resume {args.resume}: holds no optimizer state; add --no-resume-opt to start a '
                              'fresh one')
    try:
        run.optimizer.load_state_dict(ckpt['optimizer'])
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


def resume_run(run: Any) -> None:
    """Restore a ``--resume`` checkpoint into a built run (weights, optimizer, sparsifier, EMA, schedule, position,
    meters, random states); every user error is one line, exit status 2."""
    args, acc = run.args, run.accelerator
    ckpt = run.resume_ckpt
    if run.dense_resume:
        return _resume_dense(run, ckpt)
    try:
        state = check_resume_compatible(args.resume, ckpt, args)
        pos = state['run']
        # the masks first: loading weights into the model re-applies the masks it carries at that moment
        restore_dst_state(run.sparsifier, state, flops=run.flops, rng=False)
        load_plain_state_dict(run.model, model_state(ckpt))
        if not args.no_resume_opt:
            try:
                run.optimizer.load_state_dict(ckpt['optimizer'])
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
    if run.ema is not None:
        if ckpt.get('state_dict_ema') is None:
            raise user_error(f'--resume {args.resume}: no EMA in the checkpoint (trained without --model-ema)')
        _restore_ema(run, model_state(ckpt, use_ema=True), pos.get('ema_orig') or state.get('ema_orig'))
    if pos['num_epochs'] == run.num_epochs and ckpt.get('scheduler') is not None and run.scheduler is not None:
        run.scheduler.load_state_dict(ckpt['scheduler'])
    elif pos['num_epochs'] != run.num_epochs:
        _extend(run, pos)
    run.start_epoch, run.start_batch = pos['next_epoch'], pos['next_batch']
    run.num_updates = pos['num_updates']
    run.meters = dict(pos.get('meters') or run.meters)
    run.resume_scaler = None if args.no_resume_opt else ckpt.get('amp_scaler')
    run.resume_saver = ckpt.get('saver')
    rngs = pos.get('rng') or []
    if len(rngs) == acc.num_processes:
        run.resume_rng = rngs[acc.process_index]
    else:
        _logger.warning(f'checkpoint from {len(rngs)} process(es), now {acc.num_processes}: random states are '
                        're-seeded (data order is unchanged)')
    if run.is_main:
        truncate_summary(os.path.join(run.output_dir, SUMMARY_CSV), run.start_epoch)
    _logger.info(f'resumed from {args.resume}: epoch {run.start_epoch}, batch {run.start_batch}, '
                 f'{run.num_updates} optimizer steps')


def _resume_dense(run: Any, ckpt: dict[str, Any]) -> None:
    """The rest of a dense ``--resume`` (weights, optimizer state and masks are in place): position, lr schedule,
    EMA and AMP scaler; the run continues at the checkpoint's next epoch with fresh meters and random states."""
    args, sp = run.args, run.sparsifier
    start = dense_start_epoch(ckpt)
    if start >= run.num_epochs:
        raise user_error(f'--resume {args.resume}: the dense checkpoint is at epoch {start}, at or past the end of '
                          f'--epochs {args.epochs}')
    run.start_epoch, run.start_batch, run.num_updates = start, 0, start * run.updates_per_epoch
    if run.scheduler is not None and start > 0:
        if args.sched_on_updates:
            run.scheduler.step_update(run.num_updates)
        else:
            run.scheduler.step(start)
    if run.ema is not None:
        _restore_ema(run, model_state(ckpt, use_ema=True), None)
    run.resume_scaler = None if args.no_resume_opt else ckpt.get('amp_scaler')
    if run.is_main:
        truncate_summary(os.path.join(run.output_dir, SUMMARY_CSV), run.start_epoch)
    opt = 'a fresh optimizer state' if args.no_resume_opt else 'its optimizer state'
    _logger.info(f'resumed from {args.resume}: a dense checkpoint (no timm-dst state): sparse training starts from '
                 f'its weights with {opt} at epoch {start} (optimizer step {run.num_updates}); initial topology by '
                 f'--mask-init {sp.mask_init}, density {sp.density:.4f}')


def _extend(run: Any, pos: dict[str, Any]) -> None:
    """A resume with another ``--epochs``: the lr schedule and the sparsifier both follow the new length (the
    schedule is rebuilt for it and stepped to the checkpoint's position; the sparsifier already counts the new
    total), or the run is refused when the checkpoint is past the new end."""
    if pos['num_updates'] > run.total_steps:
        raise user_error(f'--resume {run.args.resume}: the run is at optimizer step {pos["num_updates"]}, past '
                          f'the end of --epochs {run.args.epochs} ({run.total_steps} steps)')
    if run.scheduler is not None:
        if run.args.sched_on_updates:
            run.scheduler.step_update(pos['num_updates'])
        else:
            run.scheduler.step(pos['next_epoch'])
    _logger.info(f'resume: {pos["num_epochs"]} -> {run.num_epochs} epochs; the lr schedule and the sparsifier '
                 f'(total {run.total_steps} optimizer steps) follow the new length')


@torch.no_grad()
def _restore_ema(run: Any, plain: dict[str, torch.Tensor], orig: dict[str, torch.Tensor] | None) -> None:
    load_plain_state_dict(run.ema.module, plain)
    own = dict(run.ema.module.named_buffers())
    for name, buf in run.model.named_buffers():  # the EMA's masks are the model's
        if name.endswith('_mask') and name in own:
            own[name].copy_(buf)
    if orig:
        params = dict(run.ema.module.named_parameters())
        for k, v in orig.items():
            if k in params:
                params[k].copy_(v)
