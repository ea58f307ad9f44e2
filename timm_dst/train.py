#!/usr/bin/env python3
"""timm-dst-train: timm-style training of sparse models with Dynamic Sparse Training, launched through Accelerate.

Runs as ``timm-dst-train``, ``python -m timm_dst.train`` or ``accelerate launch -m timm_dst.train``::

    timm-dst-train -c recipes/fmnist_mlp_set_itop.yaml --output runs/fmnist

Flags follow timm's train.py (``--model``, ``--opt``, ``--sched``, ``--model-ema``, ``--amp``, ``--grad-accum-steps``,
``--resume`` ...) plus the DST flags (``--dst``, ``--sparsity``, ``--sparse-init``, ``--update-interval`` ...);
``-c`` reads them from YAML. See docs/cli.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from datetime import datetime
from typing import Any

import torch
import torch.nn as nn

from ._checkpoint import (
    BEST,
    LAST,
    link_atomic,
    load_checkpoint,
    rng_state,
    save_atomic,
    save_safetensors_atomic,
    set_rng_state,
)
from ._config import args_to_yaml, dst_kwargs, parse_args
from ._data import DataInfo, create_datasets, create_loader, describe_sizes, in_memory
from ._registry import get_method_info, method_arguments

__all__ = ['main', 'train', 'train_two_phases', 'TrainingDivergedError']

_logger = logging.getLogger('timm_dst.train')

SUMMARY_CSV = 'summary.csv'
DST_SUMMARY = 'dst_summary.json'
RESULTS = 'results.json'
CONFIG_YAML = 'args.yaml'
EXPORT_BEST = 'model_best.safetensors'
EXPORT_LAST = 'model_last.safetensors'
_CKPT_VERSION = 1
DENSE_PHASE_DIR = 'dense'
REWIND_FILE = 'rewind.pth'
_EVAL_BATCH_IN_MEMORY = 1024  # evaluation batch of in-memory data (unless --validation-batch-size)


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN / inf: the run stops and the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------------------------------
# helpers
_file_handler: logging.Handler | None = None


def _setup_logging(is_main: bool, output_dir: str | None = None) -> None:
    """Messages to stdout on the main process (warnings only elsewhere), and to ``<output>/log.txt``."""
    global _file_handler
    root = logging.getLogger()
    if not getattr(root, '_timm_dst_configured', False):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter('%(message)s'))
        root.addHandler(handler)
        root._timm_dst_configured = True  # type: ignore[attr-defined]
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    if _file_handler is not None:
        root.removeHandler(_file_handler)
        _file_handler.close()
        _file_handler = None
    if is_main and output_dir:
        _file_handler = logging.FileHandler(os.path.join(output_dir, 'log.txt'))
        _file_handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
        root.addHandler(_file_handler)


def _is_own_model(name: str) -> bool:
    from timm.models import model_entrypoint
    return model_entrypoint(name).__module__.startswith('timm_dst.')


def model_kwargs(args: argparse.Namespace, info: DataInfo) -> dict[str, Any]:
    """Keyword arguments of ``timm.create_model`` for these flags and data (without pretrained options)."""
    kw: dict[str, Any] = dict(num_classes=info.num_classes, in_chans=info.in_chans)
    if args.drop:
        kw['drop_rate'] = args.drop
    if args.drop_path is not None:
        kw['drop_path_rate'] = args.drop_path
    if _is_own_model(args.model):
        kw['img_size'] = info.img_size
    elif args.img_size:
        kw['img_size'] = args.img_size
    kw.update(args.model_kwargs or {})
    return kw


def pretrained_overlay(file: str, info: DataInfo) -> dict[str, Any]:
    """``pretrained_cfg_overlay`` loading ``file`` into a model built for ``info`` (classifier and stem kept)."""
    return dict(file=os.path.abspath(file), num_classes=info.num_classes,
                input_size=(info.in_chans, *info.img_size), mean=info.mean, std=info.std)


def _output_dir(args: argparse.Namespace) -> str:
    if args.output:
        out = args.output
    elif args.resume:
        out = os.path.dirname(os.path.abspath(args.resume))
    else:
        out = os.path.join('output', 'train', f'{datetime.now().strftime("%Y%m%d-%H%M%S")}-{args.model}')
    if args.experiment:
        out = os.path.join(out, args.experiment)
    return out


def _write_json_atomic(obj: Any, path: str) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _append_summary(path: str, row: dict[str, Any]) -> None:
    write_header = not os.path.isfile(path)
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if write_header:
            writer.writeheader()
        writer.writerow(row)


def _truncate_summary(path: str, completed_epochs: int) -> None:
    """Drop rows of epochs a resumed run will train again (killed after the row, before the checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keep = [r for r in rows if int(r['epoch']) <= completed_epochs]
    if len(keep) != len(rows):
        with open(path, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(keep)


def dst_summary(sparsifier: Any, flops: Any | None = None) -> dict[str, Any]:
    """The ``dst_summary.json`` content: per-tensor density and explored fraction, final R_s, update history, and
    with ``flops`` (a :class:`timm_dst.flops.TrainingFlops`) inference and training FLOPs (docs/flops.md)."""
    out = {
        'method': sparsifier.method_name, 'sparsity': sparsifier.sparsity, 'distribution': sparsifier.distribution,
        'density': sparsifier.density, 'itop_rate': sparsifier.itop_rate, 'step': sparsifier.step,
        'total_steps': sparsifier.total_steps, 'updates': max(len(sparsifier.history) - 1, 0),
    }
    if flops is not None:
        out.update(flops.summary())
    out.update({'tensors': sparsifier.summary(), 'history': sparsifier.history})
    return out


def _fmt_flops(x: float) -> str:
    for unit, scale in (('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(x) >= scale:
            return f'{x / scale:.3g}{unit}'
    return f'{x:.3g}'


def flops_line(summary: dict[str, Any]) -> str:
    """``inference FLOPs ... | training FLOPs ...`` of a :meth:`TrainingFlops.summary`."""
    return (f'inference FLOPs/sample {_fmt_flops(summary["inference_flops"])} '
            f'(dense {_fmt_flops(summary["inference_flops_dense"])}, {summary["inference_flops_ratio"]:.4f}x) | '
            f'training FLOPs {_fmt_flops(summary["train_flops"])} ({summary["train_flops_ratio"]:.4f}x dense)')


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Any, desc: str = 'eval',
             progress: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over ``loader`` (sharded; duplicates from even batches dropped)."""
    from timm.utils import accuracy
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    loss_sum, correct1, correct5, count = 0.0, 0.0, 0.0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        with accelerator.autocast():
            out = model(x)
        out, y = accelerator.gather_for_metrics((out.float(), y))
        n = y.shape[0]
        loss_sum += nn.functional.cross_entropy(out, y, reduction='sum').item()
        k5 = min(5, out.shape[1])
        a1, a5 = accuracy(out, y, topk=(1, k5))
        correct1 += a1.item() * n / 100.0
        correct5 += a5.item() * n / 100.0
        count += n
    model.train(was_training)
    count = max(count, 1)
    return {'loss': loss_sum / count, 'top1': 100.0 * correct1 / count, 'top5': 100.0 * correct5 / count}


# --------------------------------------------------------------------------------------------------------------------
# the run
class _Run:
    """State and steps of one training run (kept together so checkpoints see all of it)."""

    def __init__(self, args: argparse.Namespace, rewind: tuple[int, str] | None = None):
        from accelerate import Accelerator
        from accelerate.utils import broadcast_object_list, set_seed

        self.args = args
        self.rewind = rewind  # (optimizer step, file): save the weights there (a dense phase)
        if args.threads:
            torch.set_num_threads(args.threads)
        mixed = ('bf16' if args.amp_dtype == 'bfloat16' else 'fp16') if args.amp else 'no'
        self.accelerator = acc = Accelerator(
            mixed_precision=mixed, gradient_accumulation_steps=args.grad_accum_steps,
            step_scheduler_with_optimizer=False)
        self.is_main = acc.is_main_process
        out = [_output_dir(args)]
        broadcast_object_list(out)
        self.output_dir = out[0]
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
        acc.wait_for_everyone()
        _setup_logging(self.is_main, self.output_dir)
        self.progress = self.is_main and not args.no_progress

        # the same seed on every rank while the model, masks and EMA are built; seed + rank for training
        set_seed(args.seed)
        self.train_ds, self.val_ds, self.test_ds, self.info = create_datasets(args)
        _logger.info(f'{describe_sizes(self.info)} | {acc.num_processes} process(es) on {acc.device} | '
                     f'output {self.output_dir}')
        if self.is_main:
            with open(os.path.join(self.output_dir, CONFIG_YAML), 'w') as f:
                f.write(args_to_yaml(args))

        self._build_model()
        self._build_training()
        self._maybe_resume()
        self._prepare()
        set_seed(args.seed, device_specific=True)
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng)

    # ------------------------------------------------------------------------------------------------------------
    def _build_model(self) -> None:
        import timm
        from timm.models import load_checkpoint as timm_load_checkpoint
        args, info = self.args, self.info
        self.model_kwargs = model_kwargs(args, info)
        overlay = pretrained_overlay(args.pretrained_path, info) if args.pretrained_path else None
        if overlay is not None:
            # fine-tuning semantics: the file's own classifier / stem are adapted by timm when shapes differ
            overlay = dict(file=overlay['file'])
        model = timm.create_model(args.model, pretrained=args.pretrained, pretrained_cfg_overlay=overlay,
                                  **self.model_kwargs)
        if args.initial_checkpoint:
            timm_load_checkpoint(model, args.initial_checkpoint)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(enable=True)
        model.to(self.accelerator.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        _logger.info(f'model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters')

    def _build_training(self) -> None:
        from timm.loss import LabelSmoothingCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        from ._registry import create_sparsifier
        args, acc = self.args, self.accelerator
        opt_kwargs = dict(args.opt_kwargs or {})
        if args.opt_eps is not None:
            opt_kwargs['eps'] = args.opt_eps
        if args.opt_betas is not None:
            opt_kwargs['betas'] = tuple(args.opt_betas)
        self.optimizer = create_optimizer_v2(
            self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
            layer_decay=args.layer_decay, **opt_kwargs)

        bs_eval = args.validation_batch_size or (
            max(args.batch_size, _EVAL_BATCH_IN_MEMORY) if in_memory(self.train_ds) else args.batch_size)
        self.train_loader = create_loader(self.train_ds, args.batch_size, True, seed=args.seed, workers=args.workers,
                                          pin_memory=args.pin_mem)
        self.train_sampler = self.train_loader.batch_sampler.sampler
        self.val_loader = create_loader(self.val_ds, bs_eval, False, workers=args.workers,
                                        pin_memory=args.pin_mem) if self.val_ds is not None else None
        self.test_loader = create_loader(self.test_ds, bs_eval, False, workers=args.workers,
                                         pin_memory=args.pin_mem) if self.test_ds is not None else None
        batches = math.ceil(len(self.train_ds) / args.batch_size)
        self.batches_per_epoch = math.ceil(batches / acc.num_processes)
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / args.grad_accum_steps)

        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs,
            patience_epochs=args.patience_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_prefix=args.warmup_prefix,
            noise=args.lr_noise, noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
            cycle_mul=args.lr_cycle_mul, cycle_decay=args.lr_cycle_decay, cycle_limit=args.lr_cycle_limit,
            k_decay=args.lr_k_decay, plateau_mode='min' if args.eval_metric == 'loss' else 'max',
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=self.updates_per_epoch)
        if self.scheduler is None or not self.num_epochs:
            self.num_epochs = args.epochs
        self.total_steps = self.num_epochs * self.updates_per_epoch

        kwargs = dst_kwargs(args)
        data_arg = get_method_info(args.dst).init_data_arg
        if data_arg is not None and data_arg not in kwargs:
            # score on the first training batch(es), from the unprepared loader (every rank scores the same batches;
            # on a resume the scores are computed again, then the checkpoint's masks replace them)
            kwargs[data_arg] = self.train_loader
        try:
            self.sparsifier = create_sparsifier(self.model, self.optimizer, method=args.dst,
                                                total_steps=self.total_steps, **kwargs)
        except ValueError as e:
            raise SystemExit(f'timm-dst-train: error: {e}') from e
        _logger.info(f'{self.sparsifier!r} | {self.updates_per_epoch} optimizer steps per epoch, '
                     f'{self.total_steps} in all')
        from .flops import TrainingFlops
        self.flops = TrainingFlops(self.model, (self.info.in_chans, *self.info.img_size), self.sparsifier)

        self.ema = None
        if args.model_ema:
            self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                                  device='cpu' if args.model_ema_force_cpu else None)
        self.criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()
        self.start_epoch, self.start_batch, self.num_updates = 0, 0, 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.meters = {'loss_sum': 0.0, 'count': 0}
        self.resume_rng = None

    def _maybe_resume(self) -> None:
        args = self.args
        if not args.resume:
            return
        ckpt = load_checkpoint(args.resume)
        if ckpt.get('arch') != args.model:
            raise SystemExit(f'timm-dst-train: error: --resume {args.resume}: the checkpoint is of model '
                             f'{ckpt.get("arch")!r}, not --model {args.model!r}')
        self.model.load_state_dict(ckpt['model'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        try:
            self.sparsifier.load_state_dict(ckpt['sparsifier'])
        except ValueError as e:
            raise SystemExit(f'timm-dst-train: error: --resume {args.resume}: {e}') from e
        if self.scheduler is not None and ckpt.get('scheduler') is not None:
            self.scheduler.load_state_dict(ckpt['scheduler'])
        if self.ema is not None:
            if ckpt.get('ema') is None:
                raise SystemExit(f'timm-dst-train: error: --resume {args.resume}: no EMA in the checkpoint '
                                 '(it was trained without --model-ema)')
            self.ema.load_state_dict(ckpt['ema'])
        self.start_epoch, self.start_batch = ckpt['next_epoch'], ckpt['next_batch']
        self.num_updates = ckpt['num_updates']
        if ckpt.get('flops') is not None:
            self.flops.load_state_dict(ckpt['flops'])
        else:
            _logger.warning(f'--resume {args.resume}: no FLOPs count in the checkpoint; training FLOPs count from here')
        self.best_metric, self.best_epoch = ckpt.get('best_metric'), ckpt.get('best_epoch')
        self.meters = dict(ckpt.get('meters') or self.meters)
        self._resume_scaler = ckpt.get('scaler')
        rngs = ckpt.get('rng') or []
        if len(rngs) == self.accelerator.num_processes:
            self.resume_rng = rngs[self.accelerator.process_index]
        else:
            _logger.warning(f'checkpoint from {len(rngs)} process(es), now {self.accelerator.num_processes}: '
                            'random states are re-seeded (data order is unchanged)')
        if self.is_main:
            _truncate_summary(os.path.join(self.output_dir, SUMMARY_CSV), self.start_epoch)
        _logger.info(f'resumed from {args.resume}: epoch {self.start_epoch}, batch {self.start_batch}, '
                     f'{self.num_updates} optimizer steps')

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
        scaler_state = getattr(self, '_resume_scaler', None)
        if scaler_state is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(scaler_state)

    # ------------------------------------------------------------------------------------------------------------
    def _check_finite(self, bad: torch.Tensor, epoch: int) -> None:
        total = self.accelerator.reduce(bad.detach().clone(), reduction='sum')
        if total.item() > 0:
            last = os.path.join(self.output_dir, LAST)
            kept = f'the last good checkpoint is kept at {last}' if os.path.isfile(last) else \
                'no checkpoint had been written yet'
            raise TrainingDivergedError(
                f'non-finite training loss (NaN / inf) in epoch {epoch + 1}, by optimizer step {self.num_updates}: '
                f'stopping; {kept}. Lower --lr, add --clip-grad, or check the data.')

    def save_checkpoint(self, next_epoch: int, next_batch: int) -> str:
        """Write ``last.pth.tar`` atomically (all ranks call this: the RNG states of every rank go in)."""
        from accelerate.utils import gather_object
        acc = self.accelerator
        rngs = gather_object([rng_state()])
        path = os.path.join(self.output_dir, LAST)
        if self.is_main:
            ckpt = {
                'version': _CKPT_VERSION, 'arch': self.args.model, 'args': vars(self.args),
                'next_epoch': next_epoch, 'next_batch': next_batch, 'num_updates': self.num_updates,
                'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scheduler': self.scheduler.state_dict() if self.scheduler is not None else None,
                'ema': self.ema.state_dict() if self.ema is not None else None,
                'sparsifier': self.sparsifier.state_dict(), 'flops': self.flops.state_dict(),
                'scaler': acc.scaler.state_dict() if acc.scaler is not None else None,
                'best_metric': self.best_metric, 'best_epoch': self.best_epoch, 'meters': dict(self.meters),
                'rng': rngs, 'num_processes': acc.num_processes, 'model_kwargs': self.model_kwargs,
            }
            save_atomic(ckpt, path)
        acc.wait_for_everyone()
        return path

    def export(self, path: str, use_ema: bool) -> None:
        """Exported plain timm weights (masks folded, no timm_dst keys) as safetensors."""
        from .reparam import export_state_dict
        if not self.is_main:
            return
        src = self.ema.module if (use_ema and self.ema is not None) else self.model
        meta = {'arch': self.args.model, 'timm_dst_method': self.sparsifier.method_name,
                'density': f'{self.sparsifier.density:.6f}', 'itop_rate': f'{self.sparsifier.itop_rate:.6f}',
                'model_kwargs': json.dumps(self.model_kwargs, default=list)}
        save_safetensors_atomic(export_state_dict(src), path, metadata=meta)

    # ------------------------------------------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """One epoch (or its remainder after a resume); returns train metrics and whether the run stopped inside it
        (``--stop-after-updates``, after writing a mid-epoch checkpoint)."""
        from tqdm import tqdm
        args, acc = self.args, self.accelerator
        self.train_sampler.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        skip = self.start_batch if epoch == self.start_epoch else 0
        loader = acc.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
        if skip == 0:
            self.meters = {'loss_sum': 0.0, 'count': 0}
        self.train_model.train()
        bad = torch.zeros((), device=acc.device)
        loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
        count = 0
        n_batches = len(self.train_loader)
        pbar = tqdm(total=n_batches, initial=skip, desc=f'epoch {epoch + 1}/{self.num_epochs}',
                    disable=not self.progress, leave=False, dynamic_ncols=True)
        stopped_mid = False
        step_samples = 0
        for batch_idx, (x, y) in enumerate(loader, start=skip):
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with acc.accumulate(self.train_model):
                out = self.train_model(x)
                loss = self.criterion(out, y)
                acc.backward(loss)
                if acc.sync_gradients and args.clip_grad is not None:
                    if args.clip_mode == 'norm':
                        acc.clip_grad_norm_(self.model.parameters(), args.clip_grad)
                    else:
                        from timm.utils import dispatch_clip_grad
                        acc.unscale_gradients()
                        dispatch_clip_grad(self.model.parameters(), args.clip_grad, mode=args.clip_mode)
                step_samples += y.shape[0]
                if acc.sync_gradients:
                    # before the step: the sparsifier's post-step hook may change the masks
                    self.flops.step(samples=step_samples * acc.num_processes)
                    step_samples = 0
                self.optimizer_p.step()
                self.optimizer_p.zero_grad(set_to_none=True)
            loss_d = loss.detach()
            bad += (~torch.isfinite(loss_d)).float()
            loss_sum += loss_d.double() * y.shape[0]
            count += y.shape[0]
            pbar.update(1)
            if not acc.sync_gradients:
                continue
            self.num_updates += 1
            if self.rewind is not None and self.num_updates == self.rewind[0]:
                self._save_rewind()
            if self.ema is not None:
                self.ema.update(self.model, step=self.num_updates)
            if self.scheduler is not None:
                self.scheduler.step_update(num_updates=self.num_updates)
            last_batch = batch_idx + 1 == n_batches
            if self.num_updates % args.log_interval == 0:
                self._check_finite(bad, epoch)
                if self.progress:
                    pbar.set_postfix(loss=f'{loss_d.item():.4f}', lr=f'{self._lr():.2e}',
                                     R_s=f'{self.sparsifier.itop_rate:.4f}')
            stop = args.stop_after_updates is not None and self.num_updates >= args.stop_after_updates
            recover = args.recovery_interval and self.num_updates % args.recovery_interval == 0
            if (stop or recover) and not last_batch:
                self._check_finite(bad, epoch)
                self._fold_meters(loss_sum, count)
                loss_sum.zero_()
                count = 0
                self.save_checkpoint(epoch, batch_idx + 1)
                if stop:
                    stopped_mid = True
                    break
        pbar.close()
        self._check_finite(bad, epoch)
        self._fold_meters(loss_sum, count)
        meters = self.meters
        return {'loss': meters['loss_sum'] / max(meters['count'], 1)}, stopped_mid

    def _save_rewind(self) -> None:
        """Save the rewind point of a dense phase (plain timm weights and buffers, CPU) atomically."""
        from .methods import capture_weights
        if self.is_main:
            save_atomic(capture_weights(self.model), self.rewind[1])
            _logger.info(f'dense phase: rewind point at optimizer step {self.num_updates} saved to {self.rewind[1]}')
        self.accelerator.wait_for_everyone()

    def _fold_meters(self, loss_sum: torch.Tensor, count: int) -> None:
        """Add this process's running loss to the all-rank meters kept in checkpoints."""
        acc = self.accelerator
        t = torch.tensor([loss_sum.item(), float(count)], dtype=torch.float64, device=acc.device)
        t = acc.reduce(t, reduction='sum')
        self.meters['loss_sum'] += t[0].item()
        self.meters['count'] += int(t[1].item())

    def _lr(self) -> float:
        lrs = [g['lr'] for g in self.optimizer.param_groups]
        return sum(lrs) / len(lrs)

    # ------------------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        args, acc, sp = self.args, self.accelerator, self.sparsifier
        t_start = time.time()
        summary_path = os.path.join(self.output_dir, SUMMARY_CSV)
        if self.rewind is not None and not os.path.isfile(self.rewind[1]) and self.num_updates >= self.rewind[0]:
            if self.num_updates > self.rewind[0]:
                raise SystemExit(f'timm-dst-train: error: the rewind point (step {self.rewind[0]}) '
                                 f'{self.rewind[1]} is missing and the run is at step {self.num_updates}: '
                                 'start the dense phase again (remove its folder)')
            self._save_rewind()
        better = (lambda a, b: a < b) if args.eval_metric == 'loss' else (lambda a, b: a > b)
        ema_eval = self.ema is not None and not (args.model_ema_force_cpu and acc.device.type != 'cpu')
        for epoch in range(self.start_epoch, self.num_epochs):
            t0 = time.time()
            train_metrics, stopped_mid = self.train_one_epoch(epoch)
            if stopped_mid:
                return self._stopped()
            row: dict[str, Any] = {'epoch': epoch + 1, 'train_loss': train_metrics['loss']}
            metric = None
            if self.val_loader is not None:
                val = evaluate(self.train_model, self.val_loader, acc, 'validate', self.progress)
                row.update({'val_loss': val['loss'], 'val_top1': val['top1'], 'val_top5': val['top5']})
                metric = val[args.eval_metric]
                if ema_eval:
                    val_ema = evaluate(self.ema.module, self.val_loader, acc, 'validate EMA', self.progress)
                    row.update({'ema_val_loss': val_ema['loss'], 'ema_val_top1': val_ema['top1'],
                                'ema_val_top5': val_ema['top5']})
                    metric = val_ema[args.eval_metric]
            row.update({'lr': self._lr(), 'density': sp.density, 'itop_rate': sp.itop_rate,
                        'optimizer_steps': self.num_updates, 'epoch_time': time.time() - t0})
            if self.scheduler is not None:
                self.scheduler.step(epoch + 1, metric)
            improved = metric is not None and (self.best_metric is None or better(metric, self.best_metric))
            if improved:
                self.best_metric, self.best_epoch = metric, epoch + 1
            if self.is_main:
                _append_summary(summary_path, row)
            self.start_batch = 0
            last = self.save_checkpoint(epoch + 1, 0)
            if self.is_main:
                if improved:
                    link_atomic(last, os.path.join(self.output_dir, BEST))
                    self.export(os.path.join(self.output_dir, EXPORT_BEST), use_ema=self.ema is not None)
                _write_json_atomic(dst_summary(sp, self.flops), os.path.join(self.output_dir, DST_SUMMARY))
            acc.wait_for_everyone()
            self._log_epoch(row)
            if args.stop_after_updates is not None and self.num_updates >= args.stop_after_updates \
                    and epoch + 1 < self.num_epochs:
                return self._stopped()
        return self.finish(time.time() - t_start)

    def _stopped(self) -> dict[str, Any]:
        _logger.info(f'stopped after {self.num_updates} optimizer steps (--stop-after-updates); continue with '
                     f'--resume {os.path.join(self.output_dir, LAST)}')
        self.accelerator.end_training()
        return {'stopped': True, 'optimizer_steps': self.num_updates}

    def _log_epoch(self, row: dict[str, Any]) -> None:
        parts = [f'epoch {row["epoch"]}/{self.num_epochs}', f'train loss {row["train_loss"]:.4f}']
        if 'val_top1' in row:
            parts.append(f'val loss {row["val_loss"]:.4f} top1 {row["val_top1"]:.2f} top5 {row["val_top5"]:.2f}')
        if 'ema_val_top1' in row:
            parts.append(f'EMA val top1 {row["ema_val_top1"]:.2f}')
        parts += [f'lr {row["lr"]:.3e}', f'density {row["density"]:.4f}', f'R_s {row["itop_rate"]:.4f}',
                  f'{row["epoch_time"]:.1f}s']
        _logger.info(' | '.join(parts))

    def finish(self, wall: float) -> dict[str, Any]:
        """Export the last weights, test the best and last exported weights in plain timm, write results.json."""
        import timm
        args, acc, sp = self.args, self.accelerator, self.sparsifier
        last_export = os.path.join(self.output_dir, EXPORT_LAST)
        self.export(last_export, use_ema=self.ema is not None)
        best_export = os.path.join(self.output_dir, EXPORT_BEST)
        acc.wait_for_everyone()
        results: dict[str, Any] = {
            'model': args.model, 'dataset': self.info.name, 'method': sp.method_name, 'sparsity': sp.sparsity,
            'density': sp.density, 'itop_rate': sp.itop_rate, 'optimizer_steps': self.num_updates,
            'epochs': self.num_epochs, 'best_epoch': self.best_epoch,
            f'best_val_{args.eval_metric}': self.best_metric, 'train_wall_s': wall,
            'load_with': (f'timm.create_model({args.model!r}, pretrained=True, '
                          f'pretrained_cfg_overlay=dict(file=...), **model_kwargs)'),
            'model_kwargs': self.model_kwargs,
        }
        results.update(self.flops.summary())
        exports = {'last': last_export}
        if os.path.isfile(best_export):
            exports['best'] = best_export
        for tag, path in exports.items():
            plain = timm.create_model(args.model, pretrained=True,
                                      pretrained_cfg_overlay=pretrained_overlay(path, self.info),
                                      **self.model_kwargs).to(acc.device)
            if self.val_loader is not None:
                results[f'val_{tag}'] = evaluate(plain, self.val_loader, acc, f'validate {tag}')
            if self.test_loader is not None:
                results[f'test_{tag}'] = evaluate(plain, self.test_loader, acc, f'test {tag}')
        if args.save_rank_masks:
            torch.save({'masks': {t.name: t.mask.detach().cpu().clone() for t in sp.targets} if sp.targets and
                        sp.method.attaches else {},
                        'itop_rate': sp.itop_rate, 'density': sp.density, 'step': sp.step,
                        'explored': [e.cpu() for e in sp.explored]},
                       os.path.join(self.output_dir, f'masks_rank{acc.process_index}.pt'))
        if self.is_main:
            _write_json_atomic(dst_summary(sp, self.flops), os.path.join(self.output_dir, DST_SUMMARY))
            _write_json_atomic(results, os.path.join(self.output_dir, RESULTS))
        tb = results.get('test_best') or results.get('test_last')
        test = f'test top1 {tb["top1"]:.2f} (best-on-validation weights)' if tb else 'no test split'
        _logger.info(f'done in {wall:.1f}s | best val {args.eval_metric} {self.best_metric:.4g} at epoch '
                     f'{self.best_epoch} | weights {exports.get("best", last_export)}'
                     if self.best_metric is not None else f'done in {wall:.1f}s | weights {last_export}')
        _logger.info(f'{flops_line(self.flops.summary())}')
        _logger.info(f'RESULT {args.model} {sp.method_name} | {test} | density {sp.density:.4f} | '
                     f'R_s {sp.itop_rate:.4f}')
        acc.wait_for_everyone()
        acc.end_training()
        return results


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by parsed ``args``; returns the results (also written to ``results.json``).

    A method with a dense phase (the lottery ticket) whose trained dense weights are not given runs both phases (see
    :func:`train_two_phases`).
    """
    phase = get_method_info(args.dst).dense_phase
    if phase is not None and not getattr(args, phase.trained_state_arg):
        return train_two_phases(args)
    return _Run(args).fit()


# DST flags that mean nothing to a dense phase (reset to their defaults there; the methods' own flags too)
_DENSE_PHASE_RESET = (
    'sparsity', 'distribution', 'mask_init', 'update_interval', 'prune_rate', 'prune_rate_schedule', 'prune_rate_min',
    'update_start', 'update_end', 'update_milestones', 'grow_unexplored_first', 'include', 'exclude',
    'dense_first_layer', 'dense_classifier', 'remask_every_step',
)


def _two_phase_root(args: argparse.Namespace) -> str:
    if args.output:
        return _output_dir(args)
    if args.resume:
        root = os.path.abspath(args.resume)
        root = root if os.path.isdir(root) else os.path.dirname(root)
        return os.path.dirname(root) if os.path.basename(root) == DENSE_PHASE_DIR else root
    return _output_dir(args)


def train_two_phases(args: argparse.Namespace) -> dict[str, Any]:
    """Both phases of a method with a dense phase (the Lottery Ticket Hypothesis) in one command.

    The method's :class:`~timm_dst.methods.DensePhase` names its arguments. Phase 1 trains the model dense (its
    ``dense_method``, same schedule, epochs and seed) in ``<output>/dense`` and saves the rewind point, the weights at
    optimizer step ``rewind_step_arg`` (default 0: the initialisation), to ``<output>/dense/rewind.pth``. Phase 2
    builds the method from the final dense weights (``trained_state_arg``) and the rewind point
    (``rewind_state_arg``): for the lottery ticket it prunes them once, globally by magnitude, rewinds every weight
    and retrains sparse in ``<output>``, whose ``args.yaml`` runs phase 2 alone again (both arguments set).

    ``--resume <output>`` continues in the right phase: phase 1 from ``dense/last.pth.tar`` while
    ``dense/results.json`` is missing, else phase 2 from ``<output>/last.pth.tar`` (a fresh phase 2 when it has none).
    ``--stop-after-updates N`` counts the optimizer steps of both phases together.
    """
    phase = get_method_info(args.dst).dense_phase
    out = _two_phase_root(args)
    dense_dir = os.path.join(out, DENSE_PHASE_DIR)
    rewind_file = os.path.join(dense_dir, REWIND_FILE)
    dense_last = os.path.join(dense_dir, LAST)
    dense_done = os.path.isfile(os.path.join(dense_dir, RESULTS)) and os.path.isfile(dense_last)
    resuming = bool(args.resume)
    rewind_step = getattr(args, phase.rewind_step_arg) or 0

    if not dense_done:
        a1 = argparse.Namespace(**vars(args))
        for dest in _DENSE_PHASE_RESET:
            setattr(a1, dest, None)
        for arg in method_arguments():
            setattr(a1, arg.dest, None)
        a1.dst, a1.dst_kwargs, a1.output, a1.experiment = phase.dense_method, {}, dense_dir, ''
        a1.resume = dense_last if resuming and os.path.isfile(dense_last) else ''
        _logger.info(f'{args.dst} phase 1/2: dense training in {dense_dir} (rewind point: optimizer step '
                     f'{rewind_step})')
        dense = _Run(a1, rewind=(rewind_step, rewind_file)).fit()
        if dense.get('stopped'):
            dense['phase'] = 1
            return dense
        _reset_accelerate_state()
    elif resuming:
        _logger.info(f'{args.dst}: the dense phase in {dense_dir} is complete')
    if not os.path.isfile(rewind_file):
        raise SystemExit(f'timm-dst-train: error: the rewind point {rewind_file} is missing')

    a2 = argparse.Namespace(**vars(args))
    a2.output, a2.experiment = out, ''
    setattr(a2, phase.rewind_step_arg, None)
    setattr(a2, phase.trained_state_arg, dense_last)
    setattr(a2, phase.rewind_state_arg, rewind_file)
    last = os.path.join(out, LAST)
    a2.resume = last if resuming and os.path.isfile(last) else ''
    if args.stop_after_updates is not None:  # counts the steps of both phases
        left = args.stop_after_updates - _dense_steps(dense_last)
        if left <= 0 and not a2.resume:
            _logger.info(f'stopped after the dense phase (--stop-after-updates); continue with --resume {out}')
            return {'stopped': True, 'optimizer_steps': 0, 'phase': 2}
        a2.stop_after_updates = max(left, 1)
    _logger.info(f'{args.dst} phase 2/2: from the dense weights of {dense_last} (sparsity {args.sparsity}, rewind to '
                 f'{rewind_file}, step {rewind_step}), train --dst {args.dst} in {out}')
    results = _Run(a2).fit()
    if results.get('stopped'):
        results['phase'] = 2
        return results
    with open(os.path.join(dense_dir, RESULTS)) as f:
        dense_results = json.load(f)
    both = dense_results.get('train_flops', 0.0) + results['train_flops']
    both_dense = dense_results.get('train_flops_dense', 0.0) + results['train_flops_dense']
    results['dense_phase'] = {
        'dense_dir': dense_dir, 'rewind_state': rewind_file, 'rewind_step': rewind_step,
        'dense_test_last': dense_results.get('test_last'), 'dense_train_flops': dense_results.get('train_flops'),
        'train_flops_both_phases': both,
        # both phases against one dense run of the same length (the real cost of a dense phase: > 1)
        'train_flops_both_phases_ratio': both / results['train_flops_dense'] if results['train_flops_dense'] else None,
        'train_flops_dense_both_phases': both_dense,
    }
    _write_json_atomic(results, os.path.join(out, RESULTS))
    _logger.info(f'{args.dst}: both phases {_fmt_flops(both)} training FLOPs '
                 f'({results["dense_phase"]["train_flops_both_phases_ratio"]:.4f}x one dense run)')
    return results


def _dense_steps(path: str) -> int:
    return int(torch.load(path, map_location='cpu', weights_only=False)['num_updates'])


def _reset_accelerate_state() -> None:
    """Let the next phase build its own Accelerator (the process group, if any, is kept)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``timm-dst-train``."""
    args = parse_args(argv)
    try:
        train(args)
    except TrainingDivergedError as e:
        _logger.error(str(e))
        raise SystemExit(f'timm-dst-train: {e}') from None


if __name__ == '__main__':
    main()
