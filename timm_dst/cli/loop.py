"""The epoch loop of a ``timm-dst-train`` run: :func:`fit` trains a built :class:`~timm_dst.cli.state.RunState`
epoch by epoch (:func:`train_one_epoch`, validation, ``summary.csv``, checkpoints through :func:`save_checkpoint`,
the exported best weights) and ends it with :func:`~timm_dst.cli.evaluate.finish_run`."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..integrations.timm.checkpoint import LAST, rng_state
from ..integrations.timm.outputs import (
    DST_SUMMARY,
    EXPORT_BEST,
    SUMMARY_CSV,
    SUMMARY_PNG,
    atomic_path,
    dst_summary,
    write_json_atomic,
)
from ..methods import capture_weights
from .config import user_error
from .evaluate import end_run, export_weights, finish_run, validate
from .outputs import density_text, plot_summary, train_log_line, write_summary_row
from .sharded import prune_sharded, save_sharded
from .state import RunState, fresh_meters

__all__ = ['TrainingDivergedError', 'fit', 'train_one_epoch', 'save_checkpoint', 'save_rewind']

_logger = logging.getLogger('timm_dst.train')


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN / inf: the run stops and the last good checkpoint is kept."""


@dataclass(slots=True)
class _Tally:
    """This process's running sums within an epoch (since its start or the last mid-epoch checkpoint).

    Attributes:
        bad: The number of non-finite losses.
        sums: Loss times batch size, and correct predictions (float64).
        count: Samples seen.
        step_samples: Samples of the optimizer step in progress (all its accumulated batches).
        times: Durations of each optimizer step (``update``) and of each wait for data (``data``), in seconds.
        t_update: When the last optimizer step ended.
    """

    bad: torch.Tensor
    sums: torch.Tensor
    count: int = 0
    step_samples: int = 0
    times: dict[str, list[float]] = field(default_factory=lambda: {'update': [], 'data': []})
    t_update: float = 0.0

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        """Count one batch: its (detached) loss, and its predictions against the hard labels."""
        self.bad += (~torch.isfinite(loss)).float()
        hard = y.argmax(-1) if y.ndim > 1 else y
        self.sums += torch.stack([loss.double() * y.shape[0], (out.detach().argmax(-1) == hard).sum().double()])
        self.count += y.shape[0]


# --------------------------------------------------------------------------------------------------------------------
# epochs
def fit(state: RunState) -> dict[str, Any]:
    """Train the run from its position to its last epoch, then finish it (:func:`~timm_dst.cli.evaluate.finish_run`).

    Returns:
        The results (also in ``results.json``), or ``{'stopped': True, 'optimizer_steps': N}`` after a
        ``--stop-after-updates`` stop.
    """
    setup, tr, pos, out = state.setup, state.training, state.position, state.outputs
    args, acc, sp = setup.args, setup.accelerator, tr.sparsifier
    t_start = time.time()
    rewind = setup.rewind
    if rewind is not None and not os.path.isfile(rewind[1]) and pos.num_updates >= rewind[0]:
        if pos.num_updates > rewind[0]:
            raise user_error(f'the LTH rewind point (step {rewind[0]}) {rewind[1]} is missing and the '
                             f'run is at step {pos.num_updates}: start the dense phase again (remove its folder)')
        save_rewind(state)
    out.best_metric = out.best_epoch = None
    if state.resume.saver:
        out.best_metric = state.resume.saver.get('best_metric')
        out.best_epoch = state.resume.saver.get('best_epoch')
    for epoch in range(pos.start_epoch, tr.num_epochs):
        t0 = time.time()
        train_metrics, stopped_mid = train_one_epoch(state, epoch)
        if stopped_mid:
            return _stopped(state)
        eval_metrics = None
        if (epoch + 1) % args.val_interval == 0 or epoch + 1 == tr.num_epochs:
            eval_metrics = validate(state)
        metric = eval_metrics[args.eval_metric] if eval_metrics is not None else None
        # timm's update_summary columns in timm's order (epoch, train_loss, eval_*, lr), then timm-dst's own
        row: dict[str, Any] = {'epoch': epoch, 'train_loss': train_metrics['loss']}
        row.update({f'eval_{k}': v for k, v in (eval_metrics or {}).items()})
        row.update({'lr': _lr(state), **{f'train_{k}': v for k, v in train_metrics.items() if k != 'loss'},
                    'density': sp.density, 'model_density': sp.model_density, 'itop_rate': sp.itop_rate,
                    'optimizer_steps': pos.num_updates, 'epoch_time': time.time() - t0})
        if setup.is_main:
            write_summary_row(os.path.join(setup.output_dir, SUMMARY_CSV), row)
        if args.log_wandb:
            acc.log(row, step=epoch)
        pos.start_batch = 0
        if tr.scheduler is not None:  # before the checkpoint, which holds the schedule's state
            tr.scheduler.step(epoch + 1, metric)
        save_checkpoint(state, epoch, epoch + 1, 0, metric=metric)
        # the saver's rule (strictly better), on every rank (the metric is the same on all of them)
        improved = metric is not None and (out.best_metric is None or (
            metric < out.best_metric if tr.decreasing else metric > out.best_metric))
        if improved:
            out.best_metric, out.best_epoch = metric, epoch
        _write_epoch_outputs(state, improved)
        _log_epoch(state, row)
        if args.stop_after_updates is not None and pos.num_updates >= args.stop_after_updates \
                and epoch + 1 < tr.num_epochs:
            return _stopped(state)
    return finish_run(state, time.time() - t_start)


def _write_epoch_outputs(state: RunState, improved: bool) -> None:
    setup, tr = state.setup, state.training
    if improved:  # a collective under --fsdp (the shards are gathered)
        export_weights(state, os.path.join(setup.output_dir, EXPORT_BEST), use_ema=tr.ema is not None)
    if setup.is_main:
        write_json_atomic(dst_summary(tr.sparsifier, tr.flops), os.path.join(setup.output_dir, DST_SUMMARY))
        plot_summary(os.path.join(setup.output_dir, SUMMARY_CSV), os.path.join(setup.output_dir, SUMMARY_PNG),
                     f'{setup.args.model} {tr.sparsifier.method_name}')
    setup.accelerator.wait_for_everyone()


def _stopped(state: RunState) -> dict[str, Any]:
    _logger.info(f'stopped after {state.position.num_updates} optimizer steps (--stop-after-updates); continue with '
                 f'--resume {state.setup.output_dir}')
    end_run(state)
    return {'stopped': True, 'optimizer_steps': state.position.num_updates}


def _log_epoch(state: RunState, row: dict[str, Any]) -> None:
    parts = [f'epoch {row["epoch"]}/{state.training.num_epochs}', f'train loss {row["train_loss"]:.4f}']
    if 'eval_top1' in row:
        parts.append(f'eval loss {row["eval_loss"]:.4f} top1 {row["eval_top1"]:.2f} top5 {row["eval_top5"]:.2f}')
    parts += [f'lr {row["lr"]:.3e}', f'density {density_text(row["density"], row["model_density"])}',
              f'R_s {row["itop_rate"]:.4f}',
              f'{row["epoch_time"]:.1f}s']
    _logger.info(' | '.join(parts))


# --------------------------------------------------------------------------------------------------------------------
# one epoch
def train_one_epoch(state: RunState, epoch: int) -> tuple[dict[str, float], bool]:
    """One epoch (or its remainder after a resume).

    Returns:
        The epoch's training metrics, and whether the run stopped inside it (``--stop-after-updates``, after writing
        a mid-epoch checkpoint).
    """
    from tqdm import tqdm
    setup, data, tr, pos = state.setup, state.data, state.training, state.position
    args, acc = setup.args, setup.accelerator
    data.train_loader.set_epoch(epoch)
    if data.mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        data.mixup.mixup_enabled = False
    skip = pos.start_batch if epoch == pos.start_epoch else 0
    loader = acc.skip_first_batches(data.train_loader, skip) if skip else data.train_loader
    if skip == 0:
        pos.meters = fresh_meters()
    tr.train_model.train()
    tally = _Tally(bad=torch.zeros((), device=acc.device),
                   sums=torch.zeros(2, device=acc.device, dtype=torch.float64))  # loss * n, correct
    n_batches = len(data.train_loader)
    pbar = tqdm(total=n_batches, initial=skip, desc=f'epoch {epoch}/{tr.num_epochs}',
                disable=not setup.progress, leave=False, dynamic_ncols=True)
    tally.t_update = t_data = time.time()
    for batch_idx, (x, y) in enumerate(loader, start=skip):
        tally.times['data'].append(time.time() - t_data)
        x, y, out, loss = _train_step(state, x, y, tally)
        loss_d = loss.detach()
        tally.add(loss_d, out, y)
        pbar.update(1)
        if not acc.sync_gradients:
            t_data = time.time()
            continue
        if _after_update(state, epoch, batch_idx, batch_idx + 1 == n_batches, x, loss_d, tally):
            pbar.close()
            return _epoch_metrics(state), True
        t_data = time.time()
    pbar.close()
    _check_finite(state, tally.bad, epoch)
    _fold_meters(state, tally.sums, tally.count)
    return _epoch_metrics(state), False


def _train_step(state: RunState, x: torch.Tensor, y: torch.Tensor,
                tally: _Tally) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, backward, clipping and the optimizer's step of one batch (a step only at the end of gradient
    accumulation); returns the batch as trained on (mixup, channels-last), the output and the loss."""
    data, tr = state.data, state.training
    args, acc = state.setup.args, state.setup.accelerator
    if data.mixup is not None:
        x, y = data.mixup(x, y)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with acc.accumulate(tr.train_model):
        out = tr.train_model(x)
        loss = tr.train_loss(out, y)
        acc.backward(loss)
        _clip(state)
        tally.step_samples += y.shape[0]
        if acc.sync_gradients:
            # before the step: the sparsifier's post-step hook may change the masks
            tr.flops.step(samples=tally.step_samples * acc.num_processes)
        tr.optimizer_p.step()
        tr.optimizer_p.zero_grad(set_to_none=True)
    return x, y, out, loss


def _after_update(state: RunState, epoch: int, batch_idx: int, last_batch: bool, x: torch.Tensor,
                  loss_d: torch.Tensor, tally: _Tally) -> bool:
    """The bookkeeping of an optimizer step: the step count, the rewind point, the EMA, the progress line, the lr
    schedule, a mid-epoch checkpoint (``--recovery-interval``, ``--stop-after-updates``). Returns whether the run
    stops here."""
    setup, tr, pos = state.setup, state.training, state.position
    args, acc = setup.args, setup.accelerator
    pos.num_updates += 1
    if setup.rewind is not None and pos.num_updates == setup.rewind[0]:
        save_rewind(state)
    if tr.ema is not None:
        tr.ema.update(tr.model, step=pos.num_updates)
    if args.synchronize_step and acc.device.type == 'cuda':
        torch.cuda.synchronize()
    now = time.time()
    tally.times['update'].append(now - tally.t_update)
    tally.t_update = now
    update_idx = batch_idx // args.grad_accum_steps
    if update_idx % args.log_interval == 0 or last_batch:
        _check_finite(state, tally.bad, epoch)
        _log_progress(state, epoch, update_idx, loss_d, tally)
        if args.save_images and setup.is_main:
            import torchvision.utils
            torchvision.utils.save_image(x, os.path.join(setup.output_dir, f'train-batch-{batch_idx}.jpg'),
                                         padding=0, normalize=True)
    if tr.scheduler is not None:
        tr.scheduler.step_update(num_updates=pos.num_updates)
    tally.step_samples = 0
    stop = args.stop_after_updates is not None and pos.num_updates >= args.stop_after_updates
    recover = args.recovery_interval and pos.num_updates % args.recovery_interval == 0
    if (stop or recover) and not last_batch:
        _check_finite(state, tally.bad, epoch)
        _fold_meters(state, tally.sums, tally.count)
        tally.sums.zero_()
        tally.count = 0
        save_checkpoint(state, epoch, epoch, batch_idx + 1, mode='last' if stop else 'recovery')
        return stop
    return False


def _clip(state: RunState) -> None:
    args, acc = state.setup.args, state.setup.accelerator
    if args.clip_grad is None or not acc.sync_gradients:
        return
    if args.clip_mode == 'norm':
        acc.clip_grad_norm_(state.training.model.parameters(), args.clip_grad)
    else:
        from timm.utils import dispatch_clip_grad
        acc.unscale_gradients()
        dispatch_clip_grad(state.training.model.parameters(), args.clip_grad, mode=args.clip_mode)


def _check_finite(state: RunState, bad: torch.Tensor, epoch: int) -> None:
    total = state.setup.accelerator.reduce(bad.detach().clone(), reduction='sum')
    if total.item() > 0:
        last = os.path.join(state.setup.output_dir, LAST)
        kept = f'the last good checkpoint is kept at {last}' if os.path.isfile(last) else \
            'no checkpoint had been written yet'
        raise TrainingDivergedError(
            f'non-finite training loss (NaN / inf) in epoch {epoch}, by optimizer step {state.position.num_updates}: '
            f'stopping; {kept}. Lower --lr, add --clip-grad, or check the data.')


def _log_progress(state: RunState, epoch: int, update_idx: int, loss_d: torch.Tensor, tally: _Tally) -> None:
    acc, meters, sp = state.setup.accelerator, state.position.meters, state.training.sparsifier
    t = torch.tensor([loss_d.item(), tally.sums[0].item(), float(tally.count)], dtype=torch.float64,
                     device=acc.device)
    t = acc.reduce(t, reduction='sum')
    loss_now = t[0].item() / acc.num_processes
    loss_avg = (meters['loss_sum'] + t[1].item()) / max(meters['count'] + t[2].item(), 1)
    if state.setup.progress:
        from tqdm import tqdm
        tqdm.write('', end='')
    up, da = tally.times['update'] or [0.0], tally.times['data'] or [0.0]
    _logger.info(train_log_line(
        epoch, update_idx, state.data.updates_per_epoch, loss_now, loss_avg, (up[-1], sum(up) / len(up)),
        tally.step_samples * acc.num_processes, _lr(state), (da[-1], sum(da) / len(da)), sp.density, sp.itop_rate,
        sp.model_density))


def _fold_meters(state: RunState, sums: torch.Tensor, count: int) -> None:
    """Add this process's running sums to the all-rank meters kept in checkpoints."""
    acc, meters = state.setup.accelerator, state.position.meters
    t = torch.cat([sums.double(), torch.tensor([float(count)], dtype=torch.float64, device=acc.device)])
    t = acc.reduce(t, reduction='sum')
    meters['loss_sum'] += t[0].item()
    meters['correct'] += t[1].item()
    meters['count'] += int(t[2].item())


def _epoch_metrics(state: RunState) -> dict[str, float]:
    meters = state.position.meters
    n = max(meters['count'], 1)
    return {'loss': meters['loss_sum'] / n, 'top1': 100.0 * meters['correct'] / n}


def _lr(state: RunState) -> float:
    lrs = [g['lr'] for g in state.training.optimizer.param_groups]
    return sum(lrs) / len(lrs)


# --------------------------------------------------------------------------------------------------------------------
# checkpoints
def save_checkpoint(state: RunState, epoch: int, next_epoch: int, next_batch: int, metric: float | None = None,
                    mode: str = 'epoch') -> None:
    """Checkpoint through the saver on the main process (every rank's random states go in); all ranks call it.

    Args:
        state: The run.
        epoch: The epoch the checkpoint is saved in.
        next_epoch: The epoch a resume continues at.
        next_batch: The batch of ``next_epoch`` a resume continues at.
        metric: The epoch's ``--eval-metric`` (ranks the checkpoint).
        mode: ``epoch`` (the end of an epoch), ``recovery`` (a ``recovery-E-B`` file) or ``last`` (``last`` only).
    """
    from accelerate.utils import gather_object

    out = state.outputs
    out.rngs = gather_object([rng_state()])
    out.next_position = {'next_epoch': next_epoch, 'next_batch': next_batch}
    sharded = bool(state.setup.args.fsdp)
    if sharded:  # the tensors first, every rank its shards; the saver's file names the folder
        tag = f'step-{state.position.num_updates}'
        save_sharded(state, tag)
        if state.setup.is_main:
            out.saver.dcp_tag = tag
    if state.setup.is_main:
        if mode == 'recovery':
            out.saver.save_recovery(epoch, batch_idx=next_batch)
        elif mode == 'last':
            out.saver.save_last(epoch)
        else:
            out.saver.save_checkpoint(epoch, metric=metric)
        if sharded:
            prune_sharded(state.setup.output_dir)
    state.setup.accelerator.wait_for_everyone()


def save_rewind(state: RunState) -> None:
    """Save the rewind point of a dense phase (plain timm weights and buffers, CPU) atomically."""
    setup = state.setup
    if setup.is_main:
        path = setup.rewind[1]
        with atomic_path(path) as tmp:
            torch.save(capture_weights(state.training.model), tmp)
        _logger.info(f'dense phase: rewind point at optimizer step {state.position.num_updates} saved to {path}')
    setup.accelerator.wait_for_everyone()
