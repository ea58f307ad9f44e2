"""Building a ``timm-dst-train`` run: the Accelerator, the model (inputs resolved as timm resolves them), the data
config and loaders, the optimizer with timm's lr scaling, the schedule, the losses. Each is one function of the
parsed arguments."""
from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any

import torch
import torch.nn as nn

from ..core._seeding import derive_seed
from ..integrations.timm.checkpoint import load_initial_checkpoint
from .data import DataInfo

__all__ = ['create_accelerator', 'fsdp_refusal', 'fsdp_ignored', 'model_kwargs', 'create_train_model', 'scale_lr',
           'create_losses', 'pretrained_overlay', 'is_own_model']

_logger = logging.getLogger('timm_dst.train')


def create_accelerator(args: argparse.Namespace):
    """The run's Accelerator. Precision: ``--amp`` asks for ``--amp-dtype``; without it the launcher's
    ``--mixed_precision`` (or ``ACCELERATE_MIXED_PRECISION``) stays in force. The training order is a seeded
    permutation per epoch, identical on every rank and after a resume, from a seed mixed from ``--seed`` (not
    ``--seed`` itself, which seeded the model's initialisation)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs
    mixed = ('bf16' if args.amp_dtype == 'bfloat16' else 'fp16') if args.amp else None
    return Accelerator(
        mixed_precision=mixed, gradient_accumulation_steps=args.grad_accum_steps, step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=derive_seed(args.seed, 'data-order')),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=not args.no_ddp_bb)],
        log_with='wandb' if args.log_wandb else None)


def fsdp_refusal(accelerator: Any) -> str | None:
    """Why this CLI cannot train under the launcher's FSDP set-up, or None when it is not FSDP.

    ``timm-dst-train`` attaches the sparsifier before ``accelerator.prepare`` and saves whole checkpoints from the main
    process; FSDP shards the model inside ``prepare``. DST under FSDP2 runs from the library (docs/distributed.md).
    """
    from accelerate.utils import DistributedType
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    version = getattr(getattr(accelerator.state, 'fsdp_plugin', None), 'fsdp_version', 1)
    return (f'accelerate launch --use_fsdp (FSDP{version}) is not supported by timm-dst-train: it builds the '
            'sparsifier before accelerator.prepare shards the model and saves whole checkpoints from one process; '
            'train FSDP2 models from the library (fully_shard, optimizer, create_sparsifier; examples/fsdp_train.py, '
            'docs/distributed.md), or launch without --use_fsdp (DDP)')


def fsdp_ignored(accelerator: Any) -> str | None:
    """A warning when ``accelerate launch --use_fsdp`` asked for FSDP and Accelerate did not set it up (on CPU
    processes Accelerate 1.15 wraps the model in DDP instead), else None."""
    from accelerate.utils import DistributedType
    if os.environ.get('ACCELERATE_USE_FSDP', 'false').lower() != 'true':
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        return None
    return (f'accelerate launch --use_fsdp: Accelerate did not set up FSDP for {accelerator.distributed_type.value} '
            '(it does so on accelerator devices only); this run trains under DDP, each rank holding the whole model')


def is_own_model(name: str) -> bool:
    from timm.models import model_entrypoint
    return model_entrypoint(name).__module__.startswith('timm_dst.')


def _requested_input(args: argparse.Namespace, info: DataInfo) -> dict[str, Any]:
    """The input request of the flags (``--in-chans``, ``--img-size``, ``--input-size``), with the data set's channels
    where no flag gives them, and for the papers' models (whose layer sizes follow the input) the data's size."""
    chans = args.in_chans or (args.input_size[0] if args.input_size else info.in_chans)
    req: dict[str, Any] = {'in_chans': chans}
    if args.input_size:
        req['input_size'] = tuple(args.input_size)
    elif args.img_size:
        req['img_size'] = args.img_size
    elif is_own_model(args.model) or info.name == 'synthetic':
        req['input_size'] = (chans, *info.img_size)
    return req


def model_kwargs(args: argparse.Namespace, info: DataInfo) -> dict[str, Any]:
    """Keyword arguments of ``timm.create_model`` for these flags and data: timm train.py's set, with ``img_size``
    passed only to models that take it (``timm.models.resolve_model_input_args``)."""
    from timm.models import resolve_model_input_args
    kw: dict[str, Any] = dict(
        num_classes=info.num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block, global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps)
    kw.update(args.model_kwargs or {})
    req = _requested_input(args, info)
    resolved = resolve_model_input_args(args.model, req, **kw)
    out = {k: v for k, v in resolved.items() if k not in ('model_name', 'pretrained_cfg') and v is not None}
    if 'img_size' in out and isinstance(out['img_size'], list | tuple) and len(set(out['img_size'])) == 1:
        out['img_size'] = int(out['img_size'][0])
    return out


def pretrained_overlay(file: str, info: DataInfo, input_size: tuple[int, int, int]) -> dict[str, Any]:
    """``pretrained_cfg_overlay`` loading ``file`` into a model built for ``info`` (classifier and stem kept)."""
    return dict(file=os.path.abspath(file), num_classes=info.num_classes, input_size=tuple(input_size))


def create_train_model(args: argparse.Namespace, info: DataInfo, device: torch.device) -> tuple[nn.Module, dict]:
    """The model as timm's train.py builds it (``--pretrained`` / ``--pretrained-path`` with head adaptation,
    ``--initial-checkpoint`` loaded strictly, ``--head-init-*``, ``--grad-checkpointing``, ``--sync-bn``,
    ``--channels-last``), on ``device``. Returns the model and its ``create_model`` keywords."""
    import timm
    kwargs = model_kwargs(args, info)
    overlay = dict(file=os.path.abspath(args.pretrained_path), num_classes=-1) if args.pretrained_path else None
    model = timm.create_model(args.model, pretrained=args.pretrained, pretrained_cfg_overlay=overlay, **kwargs)
    if args.initial_checkpoint:
        load_initial_checkpoint(model, args.initial_checkpoint)
    if args.head_init_scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, kwargs


def scale_lr(args: argparse.Namespace, global_batch_size: int) -> None:
    """timm's rule when ``--lr`` is not given: ``--lr-base`` scaled by the global batch size over ``--lr-base-size``
    (linear, or square root for Ada* / LAMB optimizers unless ``--lr-base-scale`` says otherwise)."""
    if args.lr:
        return
    ratio = global_batch_size / args.lr_base_size
    mode = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    if mode == 'sqrt':
        ratio = math.sqrt(ratio)
    args.lr = args.lr_base * ratio
    _logger.info(f'learning rate {args.lr:.4g} from --lr-base {args.lr_base} and the global batch size '
                 f'{global_batch_size} ({mode} scaling)')


def create_losses(args: argparse.Namespace, mixup_active: bool) -> tuple[nn.Module, nn.Module]:
    """Training and validation losses as timm's train.py chooses them: soft-target cross-entropy (or BCE) with
    mixup / cutmix, label smoothing (or BCE with smoothing), else cross-entropy."""
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if mixup_active:
        train_loss: nn.Module = BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    elif args.smoothing or args.bce_loss:
        train_loss = BinaryCrossEntropy(smoothing=args.smoothing, **bce) if args.bce_loss else \
            LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss = nn.CrossEntropyLoss()
    return train_loss, nn.CrossEntropyLoss()
