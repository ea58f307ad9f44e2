#!/usr/bin/env python3
"""timm-dst-train: timm's train.py for sparse models with Dynamic Sparse Training, launched through Accelerate.

Runs as ``timm-dst-train``, ``python -m timm_dst.train`` or ``accelerate launch -m timm_dst.train``::

    timm-dst-train -c recipes/fmnist_mlp_set_itop.yaml --output runs/fmnist

Every flag of timm's train.py is accepted with its meaning, or refused with a one-line reason; the DST flags are
:func:`timm_dst.integrations.timm.add_dst_args`'s. See docs/cli.md. The parts of a run live in their own modules:
building (``_train_build``), data (``_data``), outputs and checkpoints (``_train_outputs``, ``_checkpoint``), LTH's two
phases (``_train_lth``); this module holds the run's state and its epoch loop.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from typing import Any

import torch

from ..core.controller import NonFiniteGradientError
from ..core.flops import TrainingFlops
from ..core.masks import export_state_dict
from ..integrations import timm as dst_timm
from ..integrations.timm.checkpoint import LAST, CheckpointError, rng_state, set_rng_state
from ..integrations.timm.outputs import (
    CONFIG_YAML,
    DST_SUMMARY,
    EXPORT_BEST,
    SUMMARY_CSV,
    SUMMARY_PNG,
    OutputWriteError,
    dst_summary,
    flops_line,
    save_safetensors_atomic,
    write_json_atomic,
)
from ..methods import capture_weights
from ..methods._registry import get_method_info
from .build import create_accelerator, create_losses, create_train_model, fsdp_ignored, fsdp_refusal, scale_lr
from .config import args_to_yaml, output_dir, parse_args, synthetic_ignored, user_error
from .data import create_loaders, create_mixup, data_config_args, describe_sizes, open_datasets
from .evaluate import evaluate, finish_run
from .lth import train_two_phases as _train_two_phases
from .outputs import DstCheckpointSaver, plot_summary, setup_logging, train_log_line, write_summary_row
from .resume import dense_start_epoch, load_resume, resume_run

__all__ = ['main', 'train', 'train_two_phases', 'evaluate', 'TrainingDivergedError', 'dst_summary', 'flops_line']

_logger = logging.getLogger('timm_dst.train')

_EVAL_BATCH_IN_MEMORY = 1024  # evaluation batch of in-memory data (unless --validation-batch-size)


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN / inf: the run stops and the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------------------------------
# one run: state, building, resume, the epoch loop
class _Run:
    """One training run: built by ``__init__`` (data, model, optimizer, schedule, sparsifier, EMA, Accelerate, in the
    order docs/design.md section 5 requires), trained by :meth:`fit`, finished by :meth:`finish`."""

    def __init__(self, args: argparse.Namespace, rewind: tuple[int, str] | None = None):
        from accelerate.utils import broadcast_object_list, set_seed
        self.args = args
        self.rewind = rewind  # (optimizer step, file): save the weights there (a dense phase)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.accelerator = acc = create_accelerator(args)
        refusal = fsdp_refusal(acc)
        if refusal:
            raise user_error(refusal)
        self.is_main = acc.is_main_process
        out = [output_dir(args)]
        broadcast_object_list(out)
        self.output_dir = out[0]
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
        acc.wait_for_everyone()
        setup_logging(self.is_main, self.output_dir)
        ignored = fsdp_ignored(acc)
        if ignored:
            _logger.warning(ignored)
        self.progress = self.is_main and not args.no_progress
        # the same seed on every rank while the model, masks and EMA are built; seed + rank for training
        set_seed(args.seed)
        self._build_data_and_model()
        self._build_training()
        self.start_epoch, self.start_batch, self.num_updates = 0, 0, 0
        self.meters = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0}
        self.resume_rng = self.resume_scaler = self.resume_saver = None
        if args.resume:
            resume_run(self)
        self._prepare()
        set_seed(args.seed, device_specific=True)
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng)
        if self.is_main:
            with open(os.path.join(self.output_dir, CONFIG_YAML), 'w') as f:
                f.write(args_to_yaml(args))
        self._init_trackers()

    # ------------------------------------------------------------------------------------------------------------
    # building
    def _build_data_and_model(self) -> None:
        from timm.data import resolve_data_config
        args, acc = self.args, self.accelerator
        try:
            self.splits = open_datasets(args)
            self.info = self.splits.info
            self.model, self.model_kwargs = create_train_model(args, self.info, acc.device)
        except CheckpointError as e:
            raise user_error(str(e)) from None
        if args.sync_bn and acc.num_processes > 1 and acc.device.type == 'cpu':
            raise user_error('--sync-bn: torch\'s SyncBatchNorm runs on GPUs only; on CPU processes use --dist-bn '
                              'reduce (the default) instead')
        if args.sync_bn and acc.num_processes > 1:
            from timm.layers import convert_sync_batchnorm
            self.model = convert_sync_batchnorm(self.model)
        self.data_config = resolve_data_config(data_config_args(args, self.info), model=self.model)
        _logger.info(f'{describe_sizes(self.info)} | input {tuple(self.data_config["input_size"])} | '
                     f'{acc.num_processes} process(es) on {acc.device} | output {self.output_dir}')
        _logger.info(f'model {args.model}: {sum(p.numel() for p in self.model.parameters()):,} parameters')
        if self.info.name == 'synthetic':
            if ignored := synthetic_ignored(args):
                _logger.warning(f'{", ".join(ignored)}: not applied: the synthetic data set is tensors, image '
                                'transforms do not apply to it (mixup / cutmix do)')
        in_memory = self.splits.train.tensors or hasattr(self.splits.train.base, 'gather')
        bs_eval = args.validation_batch_size or (max(args.batch_size, _EVAL_BATCH_IN_MEMORY) if in_memory
                                                 else args.batch_size)
        self.train_loader, self.val_loader, self.test_loader = create_loaders(
            self.splits, self.data_config, args, bs_eval)
        self.mixup = create_mixup(args, self.info.num_classes)
        self.train_loss, self.eval_loss = create_losses(args, self.mixup is not None)
        # timm's create_loader drops the last partial training batch; Accelerate then shards the batches, dropping
        # the batches that would not reach every process (its BatchSamplerShard with drop_last)
        n, p = len(self.train_loader), acc.num_processes
        self.batches_per_epoch = n // p if self.train_loader.drop_last else math.ceil(n / p)
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / args.grad_accum_steps)
        if self.batches_per_epoch < 1:
            raise user_error(f'-b/--batch-size {args.batch_size} is larger than the {self.info.train_size} training '
                              'samples: no full batch to train on')

    def _build_training(self) -> None:
        from timm.optim import create_optimizer_v2, optimizer_kwargs
        from timm.scheduler import create_scheduler_v2, scheduler_kwargs
        from timm.utils import ModelEmaV3

        args, acc = self.args, self.accelerator
        scale_lr(args, args.batch_size * acc.num_processes * args.grad_accum_steps)
        self.optimizer = create_optimizer_v2(self.model, **optimizer_kwargs(cfg=args), **(args.opt_kwargs or {}))
        self.decreasing = args.eval_metric == 'loss' or self.val_loader is None
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, **scheduler_kwargs(args, decreasing_metric=self.decreasing),
            updates_per_epoch=self.updates_per_epoch)
        if self.scheduler is None or not self.num_epochs:
            self.num_epochs = args.epochs
        self.total_steps = self.num_epochs * self.updates_per_epoch
        overrides: dict[str, Any] = {}
        data_arg = get_method_info(args.dst).init_data_arg
        if data_arg is not None and not getattr(args, data_arg, None):
            # score on the first training batch(es), from the unprepared loader (every rank scores the same batches;
            # on a resume the scores are computed again, then the checkpoint's masks replace them)
            overrides = {data_arg: self.train_loader}
        # a dense --resume checkpoint: its weights (and optimizer state) go in first, the topology is drawn from them
        self.resume_ckpt = None
        self.dense_resume = load_resume(self) if args.resume else False
        try:
            self.sparsifier = dst_timm.create_sparsifier_from_args(self.model, self.optimizer, args,
                                                          total_steps=self.total_steps, **overrides)
        except ValueError as e:
            raise user_error(str(e)) from None
        if self.dense_resume:  # topology updates follow the count of steps already done, as under the launcher
            dst_timm.begin_training(self.sparsifier, self.total_steps,
                           start_step=dense_start_epoch(self.resume_ckpt) * self.updates_per_epoch, restore_rng=False)
        _logger.info(f'{self.sparsifier!r} | {self.updates_per_epoch} optimizer steps per epoch, '
                     f'{self.total_steps} in all')
        self.flops = TrainingFlops(self.model, tuple(self.data_config['input_size']), self.sparsifier)
        self.ema = None
        if args.model_ema:
            self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                                  device='cpu' if args.model_ema_force_cpu else None)

    def _init_trackers(self) -> None:
        if not self.args.log_wandb:
            return
        from timm.models import safe_model_name
        init = {'wandb': {'tags': self.args.wandb_tags or None, 'name': os.path.basename(self.output_dir)}}
        if self.args.wandb_resume_id:
            init['wandb'].update(id=self.args.wandb_resume_id, resume='must')
        self.accelerator.init_trackers(self.args.wandb_project or safe_model_name(self.args.model),
                                       config=vars(self.args), init_kwargs=init)

    # ------------------------------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        args, acc = self.args, self.accelerator
        train_model = self.model
        if args.torchcompile:
            train_model = torch.compile(self.model, backend=args.torchcompile, mode=args.torchcompile_mode)
        loaders = [x for x in (self.val_loader, self.test_loader) if x is not None]
        prepared = acc.prepare(train_model, self.optimizer, self.train_loader, *loaders)
        self.train_model, self.optimizer_p, self.train_loader = prepared[:3]
        rest = list(prepared[3:])
        self.val_loader = rest.pop(0) if self.val_loader is not None else None
        self.test_loader = rest.pop(0) if self.test_loader is not None else None
        if len(self.train_loader) != self.batches_per_epoch:
            raise RuntimeError(f'expected {self.batches_per_epoch} batches per process, the loader has '
                               f'{len(self.train_loader)}')
        if self.resume_scaler is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(self.resume_scaler)
        self.saver = None
        if self.is_main:
            self.saver = DstCheckpointSaver(
                self._run_state, self.sparsifier, self.flops, self.scheduler, model=self.model,
                optimizer=self.optimizer, args=self.args, model_ema=self.ema.module if self.ema is not None else None,
                amp_scaler=acc.scaler, checkpoint_dir=self.output_dir, recovery_dir=self.output_dir,
                decreasing=self.decreasing, max_history=args.checkpoint_hist)
            if self.resume_saver:
                self.saver.load_state_dict(self.resume_saver)

    def _run_state(self) -> dict[str, Any]:
        return {'run': dict(self._position, num_updates=self.num_updates, num_epochs=self.num_epochs,
                            meters=dict(self.meters), rng=self._rngs, num_processes=self.accelerator.num_processes,
                            model_kwargs=json.loads(json.dumps(self.model_kwargs, default=list)))}

    def save_checkpoint(self, epoch: int, next_epoch: int, next_batch: int, metric: float | None = None,
                        mode: str = 'epoch') -> None:
        """Checkpoint through the saver on the main process (every rank's random states go in); all ranks call it."""
        from accelerate.utils import gather_object

        self._rngs = gather_object([rng_state()])
        self._position = {'next_epoch': next_epoch, 'next_batch': next_batch}
        if self.is_main:
            if mode == 'recovery':
                self.saver.save_recovery(epoch, batch_idx=next_batch)
            elif mode == 'last':
                self.saver.save_last(epoch)
            else:
                self.saver.save_checkpoint(epoch, metric=metric)
        self.accelerator.wait_for_everyone()

    def export(self, path: str, use_ema: bool) -> None:
        """Exported plain timm weights (masks folded, no timm_dst keys) as safetensors."""
        if not self.is_main:
            return
        src = self.ema.module if (use_ema and self.ema is not None) else self.model
        meta = {'arch': self.args.model, 'timm_dst_method': self.sparsifier.method_name,
                'density': f'{self.sparsifier.density:.6f}', 'itop_rate': f'{self.sparsifier.itop_rate:.6f}',
                'model_kwargs': json.dumps(self.model_kwargs, default=list)}
        save_safetensors_atomic(export_state_dict(src), path, metadata=meta)

    # ------------------------------------------------------------------------------------------------------------
    # the training loop
    def _check_finite(self, bad: torch.Tensor, epoch: int) -> None:
        total = self.accelerator.reduce(bad.detach().clone(), reduction='sum')
        if total.item() > 0:
            last = os.path.join(self.output_dir, LAST)
            kept = f'the last good checkpoint is kept at {last}' if os.path.isfile(last) else \
                'no checkpoint had been written yet'
            raise TrainingDivergedError(
                f'non-finite training loss (NaN / inf) in epoch {epoch}, by optimizer step {self.num_updates}: '
                f'stopping; {kept}. Lower --lr, add --clip-grad, or check the data.')

    def _clip(self) -> None:
        args, acc = self.args, self.accelerator
        if args.clip_grad is None or not acc.sync_gradients:
            return
        if args.clip_mode == 'norm':
            acc.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        else:
            from timm.utils import dispatch_clip_grad
            acc.unscale_gradients()
            dispatch_clip_grad(self.model.parameters(), args.clip_grad, mode=args.clip_mode)

    def train_one_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """One epoch (or its remainder after a resume); returns train metrics and whether the run stopped inside it
        (``--stop-after-updates``, after writing a mid-epoch checkpoint)."""
        from tqdm import tqdm
        args, acc = self.args, self.accelerator
        self.train_loader.set_epoch(epoch)
        if self.mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            self.mixup.mixup_enabled = False
        skip = self.start_batch if epoch == self.start_epoch else 0
        loader = acc.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
        if skip == 0:
            self.meters = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0}
        self.train_model.train()
        bad = torch.zeros((), device=acc.device)
        sums = torch.zeros(2, device=acc.device, dtype=torch.float64)  # loss * n, correct
        count, step_samples = 0, 0
        n_batches = len(self.train_loader)
        pbar = tqdm(total=n_batches, initial=skip, desc=f'epoch {epoch}/{self.num_epochs}',
                    disable=not self.progress, leave=False, dynamic_ncols=True)
        t_update = t_data = time.time()
        times = {'update': [], 'data': []}
        for batch_idx, (x, y) in enumerate(loader, start=skip):
            times['data'].append(time.time() - t_data)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with acc.accumulate(self.train_model):
                out = self.train_model(x)
                loss = self.train_loss(out, y)
                acc.backward(loss)
                self._clip()
                step_samples += y.shape[0]
                if acc.sync_gradients:
                    # before the step: the sparsifier's post-step hook may change the masks
                    self.flops.step(samples=step_samples * acc.num_processes)
                self.optimizer_p.step()
                self.optimizer_p.zero_grad(set_to_none=True)
            loss_d = loss.detach()
            bad += (~torch.isfinite(loss_d)).float()
            hard = y.argmax(-1) if y.ndim > 1 else y
            sums += torch.stack([loss_d.double() * y.shape[0], (out.detach().argmax(-1) == hard).sum().double()])
            count += y.shape[0]
            pbar.update(1)
            if not acc.sync_gradients:
                t_data = time.time()
                continue
            self.num_updates += 1
            if self.rewind is not None and self.num_updates == self.rewind[0]:
                self._save_rewind()
            if self.ema is not None:
                self.ema.update(self.model, step=self.num_updates)
            if args.synchronize_step and acc.device.type == 'cuda':
                torch.cuda.synchronize()
            now = time.time()
            times['update'].append(now - t_update)
            t_update = now
            update_idx = batch_idx // args.grad_accum_steps
            last_batch = batch_idx + 1 == n_batches
            if update_idx % args.log_interval == 0 or last_batch:
                self._check_finite(bad, epoch)
                self._log_progress(epoch, update_idx, loss_d, sums, count, times, step_samples)
                if args.save_images and self.is_main:
                    import torchvision.utils
                    torchvision.utils.save_image(x, os.path.join(self.output_dir, f'train-batch-{batch_idx}.jpg'),
                                                 padding=0, normalize=True)
            if self.scheduler is not None:
                self.scheduler.step_update(num_updates=self.num_updates)
            step_samples = 0
            stop = args.stop_after_updates is not None and self.num_updates >= args.stop_after_updates
            recover = args.recovery_interval and self.num_updates % args.recovery_interval == 0
            if (stop or recover) and not last_batch:
                self._check_finite(bad, epoch)
                self._fold_meters(sums, count)
                sums.zero_()
                count = 0
                self.save_checkpoint(epoch, epoch, batch_idx + 1, mode='last' if stop else 'recovery')
                if stop:
                    pbar.close()
                    return self._epoch_metrics(), True
            t_data = time.time()
        pbar.close()
        self._check_finite(bad, epoch)
        self._fold_meters(sums, count)
        return self._epoch_metrics(), False

    def _epoch_metrics(self) -> dict[str, float]:
        n = max(self.meters['count'], 1)
        return {'loss': self.meters['loss_sum'] / n, 'top1': 100.0 * self.meters['correct'] / n}

    def _log_progress(self, epoch: int, update_idx: int, loss_d: torch.Tensor, sums: torch.Tensor, count: int,
                      times: dict[str, list[float]], samples: int) -> None:
        acc = self.accelerator
        t = torch.tensor([loss_d.item(), sums[0].item(), float(count)], dtype=torch.float64, device=acc.device)
        t = acc.reduce(t, reduction='sum')
        loss_now = t[0].item() / acc.num_processes
        loss_avg = (self.meters['loss_sum'] + t[1].item()) / max(self.meters['count'] + t[2].item(), 1)
        if self.progress:
            from tqdm import tqdm
            tqdm.write('', end='')
        up, da = times['update'] or [0.0], times['data'] or [0.0]
        _logger.info(train_log_line(
            epoch, update_idx, self.updates_per_epoch, loss_now, loss_avg, (up[-1], sum(up) / len(up)),
            samples * acc.num_processes, self._lr(), (da[-1], sum(da) / len(da)), self.sparsifier.density,
            self.sparsifier.itop_rate))

    def _save_rewind(self) -> None:
        """Save the rewind point of a dense phase (plain timm weights and buffers, CPU) atomically."""
        if self.is_main:
            tmp = self.rewind[1] + '.part'
            torch.save(capture_weights(self.model), tmp)
            os.replace(tmp, self.rewind[1])
            _logger.info(f'dense phase: rewind point at optimizer step {self.num_updates} saved to {self.rewind[1]}')
        self.accelerator.wait_for_everyone()

    def _fold_meters(self, sums: torch.Tensor, count: int) -> None:
        """Add this process's running sums to the all-rank meters kept in checkpoints."""
        acc = self.accelerator
        t = torch.cat([sums.double(), torch.tensor([float(count)], dtype=torch.float64, device=acc.device)])
        t = acc.reduce(t, reduction='sum')
        self.meters['loss_sum'] += t[0].item()
        self.meters['correct'] += t[1].item()
        self.meters['count'] += int(t[2].item())

    def _lr(self) -> float:
        lrs = [g['lr'] for g in self.optimizer.param_groups]
        return sum(lrs) / len(lrs)

    # ------------------------------------------------------------------------------------------------------------
    def _validate(self) -> dict[str, float] | None:
        """The metrics that rank checkpoints: the EMA's with ``--model-ema`` (unless kept on the CPU), as timm."""
        from timm.utils import distribute_bn
        args, acc = self.args, self.accelerator
        if acc.num_processes > 1 and args.dist_bn in ('broadcast', 'reduce') and not args.sync_bn:
            distribute_bn(self.model, acc.num_processes, args.dist_bn == 'reduce')
        if self.val_loader is None:
            return None
        metrics = evaluate(self.train_model, self.val_loader, acc, 'validate', self.progress)
        if self.ema is not None and not (args.model_ema_force_cpu and acc.device.type != 'cpu'):
            metrics = evaluate(self.ema.module, self.val_loader, acc, 'validate EMA', self.progress)
        return metrics

    def fit(self) -> dict[str, Any]:
        args, acc, sp = self.args, self.accelerator, self.sparsifier
        t_start = time.time()
        if self.rewind is not None and not os.path.isfile(self.rewind[1]) and self.num_updates >= self.rewind[0]:
            if self.num_updates > self.rewind[0]:
                raise user_error(f'the LTH rewind point (step {self.rewind[0]}) {self.rewind[1]} is missing and the '
                                  f'run is at step {self.num_updates}: start the dense phase again (remove its folder)')
            self._save_rewind()
        self.best_metric = self.best_epoch = None
        if self.resume_saver:
            self.best_metric = self.resume_saver.get('best_metric')
            self.best_epoch = self.resume_saver.get('best_epoch')
        for epoch in range(self.start_epoch, self.num_epochs):
            t0 = time.time()
            train_metrics, stopped_mid = self.train_one_epoch(epoch)
            if stopped_mid:
                return self._stopped()
            eval_metrics = None
            if (epoch + 1) % args.val_interval == 0 or epoch + 1 == self.num_epochs:
                eval_metrics = self._validate()
            metric = eval_metrics[args.eval_metric] if eval_metrics is not None else None
            row: dict[str, Any] = {'epoch': epoch, **{f'train_{k}': v for k, v in train_metrics.items()}}
            row.update({f'eval_{k}': v for k, v in (eval_metrics or {}).items()})
            row.update({'lr': self._lr(), 'density': sp.density, 'itop_rate': sp.itop_rate,
                        'optimizer_steps': self.num_updates, 'epoch_time': time.time() - t0})
            if self.is_main:
                write_summary_row(os.path.join(self.output_dir, SUMMARY_CSV), row)
            if args.log_wandb:
                acc.log(row, step=epoch)
            self.start_batch = 0
            if self.scheduler is not None:  # before the checkpoint, which holds the schedule's state
                self.scheduler.step(epoch + 1, metric)
            self.save_checkpoint(epoch, epoch + 1, 0, metric=metric)
            # the saver's rule (strictly better), on every rank (the metric is the same on all of them)
            improved = metric is not None and (self.best_metric is None or (
                metric < self.best_metric if self.decreasing else metric > self.best_metric))
            if improved:
                self.best_metric, self.best_epoch = metric, epoch
            self._write_epoch_outputs(improved)
            self._log_epoch(row)
            if args.stop_after_updates is not None and self.num_updates >= args.stop_after_updates \
                    and epoch + 1 < self.num_epochs:
                return self._stopped()
        return self.finish(time.time() - t_start)

    def _write_epoch_outputs(self, improved: bool) -> None:
        if self.is_main:
            if improved:
                self.export(os.path.join(self.output_dir, EXPORT_BEST), use_ema=self.ema is not None)
            write_json_atomic(dst_summary(self.sparsifier, self.flops), os.path.join(self.output_dir, DST_SUMMARY))
            plot_summary(os.path.join(self.output_dir, SUMMARY_CSV), os.path.join(self.output_dir, SUMMARY_PNG),
                         f'{self.args.model} {self.sparsifier.method_name}')
        self.accelerator.wait_for_everyone()

    def _stopped(self) -> dict[str, Any]:
        _logger.info(f'stopped after {self.num_updates} optimizer steps (--stop-after-updates); continue with '
                     f'--resume {self.output_dir}')
        self.accelerator.end_training()
        return {'stopped': True, 'optimizer_steps': self.num_updates}

    def _log_epoch(self, row: dict[str, Any]) -> None:
        parts = [f'epoch {row["epoch"]}/{self.num_epochs}', f'train loss {row["train_loss"]:.4f}']
        if 'eval_top1' in row:
            parts.append(f'eval loss {row["eval_loss"]:.4f} top1 {row["eval_top1"]:.2f} top5 {row["eval_top5"]:.2f}')
        parts += [f'lr {row["lr"]:.3e}', f'density {row["density"]:.4f}', f'R_s {row["itop_rate"]:.4f}',
                  f'{row["epoch_time"]:.1f}s']
        _logger.info(' | '.join(parts))

    def finish(self, wall: float) -> dict[str, Any]:
        """Export, test the exported weights in plain timm, write results.json (see :func:`_train_eval.finish_run`)."""
        return finish_run(self, wall)


# --------------------------------------------------------------------------------------------------------------------
def train_two_phases(args: argparse.Namespace) -> dict[str, Any]:
    """Both phases of a method with a dense phase, LTH (see :func:`timm_dst.cli.lth.train_two_phases`)."""
    return _train_two_phases(args, _Run, output_dir)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by parsed ``args``; returns the results (also written to ``results.json``).

    A method with a dense phase (``--dst lth`` / ``lth-set-itop``) without its trained state runs both phases (see
    :func:`train_two_phases`).
    """
    phase = get_method_info(args.dst).dense_phase
    if phase is not None and not getattr(args, phase.trained_state_arg):
        return train_two_phases(args)
    return _Run(args).fit()


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``timm-dst-train``."""
    args = parse_args(argv)
    import errno

    try:
        train(args)
    except (TrainingDivergedError, NonFiniteGradientError) as e:
        _logger.error(str(e))
        raise SystemExit(f'timm-dst-train: {e}') from None
    except OutputWriteError as e:  # a checkpoint not written: the earlier ones are kept
        raise user_error(str(e)) from None
    except OSError as e:  # another output of the run (args.yaml, log, summary) on a full or read-only disk
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise user_error(f'{e.filename or "an output file"} was not written ({e.strerror})') from None


if __name__ == '__main__':
    main()
