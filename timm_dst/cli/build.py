"""Building a ``timm-dst-train`` run.

:func:`build_run` builds a :class:`~timm_dst.cli.state.RunState` in the order docs/design.md section 5 requires:
:func:`build_setup` (the Accelerator, the output folder, logging), :func:`build_data` (data, model, loaders),
:func:`build_training` (optimizer, schedule, sparsifier, EMA), the restore of a ``--resume`` checkpoint, then
:func:`prepare` (Accelerate's wrapping, the checkpoint saver). The parts it is made of (the Accelerator, the model with
its inputs resolved as timm resolves them, the optimizer's lr scaling, the losses) are functions of the parsed
arguments.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any

import torch
import torch.nn as nn

from ..core._seeding import derive_seed
from ..core.flops import TrainingFlops
from ..distributed.shard import UnitsError
from ..integrations import timm as dst_timm
from ..integrations.timm.checkpoint import CheckpointError, load_initial_checkpoint, set_rng_state
from ..integrations.timm.outputs import CONFIG_YAML, atomic_write
from ..methods._registry import get_method_info
from .config import args_to_yaml, output_dir, synthetic_ignored, user_error
from .data import DataInfo, create_loaders, create_mixup, data_config_args, describe_sizes, open_datasets
from .outputs import DstCheckpointSaver, setup_logging
from .resume import dense_start_epoch, load_resume, resume_run
from .sharded import ACCELERATE_FSDP, ShardedCheckpointSaver, build_sharded_model
from .state import RunData, RunResume, RunSetup, RunState, RunTraining, checkpoint_entries

__all__ = ['build_run', 'build_setup', 'build_data', 'build_training', 'prepare', 'create_accelerator',
           'fsdp_refusal', 'fsdp_ignored', 'model_kwargs', 'create_train_model', 'scale_lr', 'create_losses',
           'pretrained_overlay', 'is_own_model']

_logger = logging.getLogger('timm_dst.train')

_EVAL_BATCH_IN_MEMORY = 1024  # evaluation batch of in-memory data (unless --validation-batch-size)


def create_accelerator(args: argparse.Namespace):
    """The run's Accelerator. Precision: ``--amp`` asks for ``--amp-dtype``; without it the launcher's
    ``--mixed_precision`` (or ``ACCELERATE_MIXED_PRECISION``) stays in force. The training order is a seeded
    permutation per epoch, identical on every rank and after a resume, from a seed mixed from ``--seed`` (not
    ``--seed`` itself, which seeded the model's initialisation)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs
    mixed = ('bf16' if args.amp_dtype == 'bfloat16' else 'fp16') if args.amp else None
    return Accelerator(
        cpu=_launched_without_accelerator(), mixed_precision=mixed, gradient_accumulation_steps=args.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=derive_seed(args.seed, 'data-order')),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=not args.no_ddp_bb)],
        log_with='wandb' if args.log_wandb else None)


def _launched_without_accelerator() -> bool:
    """Whether a launcher (torchrun) started several processes on a machine without an accelerator: Accelerate then
    needs ``cpu=True`` to set up the process group (gloo) itself, as ``ACCELERATE_USE_CPU=1`` asks."""
    if int(os.environ.get('WORLD_SIZE', '1') or 1) <= 1:
        return False
    current = getattr(torch, 'accelerator', None)
    return not (current.is_available() if current is not None else torch.cuda.is_available())


def fsdp_refusal(accelerator: Any) -> str | None:
    """Why this CLI cannot train under the launcher's FSDP set-up (FSDP1), or None.

    Under ``accelerate launch --use_fsdp --fsdp_version 2`` the model is sharded by Accelerate's own FSDP2 preparation
    before the optimizer is built and the sparsifier attached (:mod:`~timm_dst.cli.sharded`); FSDP1 (flat parameters)
    cannot carry the sparse reparametrisation.
    """
    from accelerate.utils import DistributedType
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    version = getattr(getattr(accelerator.state, 'fsdp_plugin', None), 'fsdp_version', 1)
    if version == 2:
        return None
    return (f'accelerate launch --use_fsdp --fsdp_version {version}: FSDP{version} (flat parameters) cannot carry the '
            'sparse masks; launch with --fsdp_version 2 (FSDP2), or pass --fsdp to timm-dst-train')


def fsdp_ignored(accelerator: Any) -> str | None:
    """A note when ``accelerate launch --use_fsdp`` asked for FSDP and Accelerate did not set it up (on CPU processes
    Accelerate wraps the model in DDP instead): timm-dst-train then shards the model itself (``--fsdp``)."""
    from accelerate.utils import DistributedType
    if os.environ.get('ACCELERATE_USE_FSDP', 'false').lower() != 'true':
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        return None
    return (f'accelerate launch --use_fsdp: Accelerate does not set up FSDP for {accelerator.distributed_type.value} '
            '(it does so on accelerator devices only); timm-dst-train shards the model itself with FSDP2 (--fsdp)')


def ensure_process_group(accelerator: Any) -> None:
    """A process group for FSDP2 in a single process (Accelerate creates none for one process): one rank, in
    memory."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    backend = 'gloo' if accelerator.device.type == 'cpu' else dist.get_default_backend_for_device(accelerator.device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


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


# --------------------------------------------------------------------------------------------------------------------
# one run, built in order
def build_run(args: argparse.Namespace, rewind: tuple[int, str] | None = None) -> RunState:
    """Build one run: setup, data and model, training, the ``--resume`` restore, Accelerate's ``prepare``; the random
    states for training (``--seed`` per rank, or the checkpoint's); ``args.yaml``; the trackers.

    Args:
        args: The parsed flags.
        rewind: ``(optimizer step, file)``: the dense phase of a method with one saves the weights there.
    """
    from accelerate.utils import set_seed
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = build_setup(args, rewind)
    # the same seed on every rank while the model, masks and EMA are built; seed + rank for training
    set_seed(args.seed)
    data, model, kwargs = build_data(setup)
    training, resume = build_training(setup, data, model, kwargs)
    state = RunState(setup, data, training, resume=resume)
    if args.resume:
        resume_run(state)
    prepare(state)
    set_seed(args.seed, device_specific=True)
    if state.resume.rng is not None:
        set_rng_state(state.resume.rng)
    if setup.is_main:
        with atomic_write(os.path.join(setup.output_dir, CONFIG_YAML), 'w') as f:
            f.write(args_to_yaml(args))
    init_trackers(state)
    return state


def build_setup(args: argparse.Namespace, rewind: tuple[int, str] | None = None) -> RunSetup:
    """The Accelerator (FSDP1 refused), the output folder (the main process's choice, on every rank) and logging."""
    from accelerate.utils import broadcast_object_list
    acc = create_accelerator(args)
    refusal = fsdp_refusal(acc)
    if refusal:
        raise user_error(refusal)
    is_main = acc.is_main_process
    out = [output_dir(args)]
    broadcast_object_list(out)
    if is_main:
        os.makedirs(out[0], exist_ok=True)
    acc.wait_for_everyone()
    setup_logging(is_main, out[0])
    ignored = fsdp_ignored(acc)
    if ignored:
        _logger.info(ignored)
    if args.fsdp:
        from accelerate.utils import DistributedType
        if acc.distributed_type == DistributedType.FSDP:
            args.fsdp = ACCELERATE_FSDP
        ensure_process_group(acc)
    return RunSetup(args=args, accelerator=acc, output_dir=out[0], is_main=is_main,
                    progress=is_main and not args.no_progress, rewind=rewind)


def build_data(setup: RunSetup) -> tuple[RunData, nn.Module, dict[str, Any]]:
    """The data sets, the model (built for them; its inputs decide the data config), the loaders and mixup.

    Returns:
        The data, the model and its ``timm.create_model`` keywords.
    """
    from timm.data import resolve_data_config
    args, acc = setup.args, setup.accelerator
    try:
        splits = open_datasets(args)
        info = splits.info
        if args.fsdp:
            kwargs = model_kwargs(args, info)
            model = build_sharded_model(args, acc, lambda: create_train_model(args, info, acc.device)[0], kwargs)
        else:
            model, kwargs = create_train_model(args, info, acc.device)
    except (CheckpointError, UnitsError) as e:
        raise user_error(str(e)) from None
    if args.sync_bn and acc.num_processes > 1 and acc.device.type == 'cpu':
        raise user_error('--sync-bn: torch\'s SyncBatchNorm runs on GPUs only; on CPU processes use --dist-bn '
                         'reduce (the default) instead')
    if args.sync_bn and acc.num_processes > 1:
        from timm.layers import convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    data_config = resolve_data_config(data_config_args(args, info), model=model)
    _logger.info(f'{describe_sizes(info)} | input {tuple(data_config["input_size"])} | '
                 f'{acc.num_processes} process(es) on {acc.device} | output {setup.output_dir}')
    _logger.info(f'model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters')
    if info.name == 'synthetic':
        if ignored := synthetic_ignored(args):
            _logger.warning(f'{", ".join(ignored)}: not applied: the synthetic data set is tensors, image '
                            'transforms do not apply to it (mixup / cutmix do)')
    in_memory = splits.train.tensors or hasattr(splits.train.base, 'gather')
    bs_eval = args.validation_batch_size or (max(args.batch_size, _EVAL_BATCH_IN_MEMORY) if in_memory
                                             else args.batch_size)
    train_loader, val_loader, test_loader = create_loaders(splits, data_config, args, bs_eval)
    mixup = create_mixup(args, info.num_classes)
    # timm's create_loader drops the last partial training batch; Accelerate then shards the batches, dropping
    # the batches that would not reach every process (its BatchSamplerShard with drop_last)
    n, p = len(train_loader), acc.num_processes
    batches_per_epoch = n // p if train_loader.drop_last else math.ceil(n / p)
    data = RunData(splits=splits, info=info, data_config=data_config, train_loader=train_loader,
                   val_loader=val_loader, test_loader=test_loader, mixup=mixup,
                   batches_per_epoch=batches_per_epoch,
                   updates_per_epoch=math.ceil(batches_per_epoch / args.grad_accum_steps))
    if batches_per_epoch < 1:
        raise user_error(f'-b/--batch-size {args.batch_size} is larger than the {info.train_size} training '
                         'samples: no full batch to train on')
    return data, model, kwargs


def build_training(setup: RunSetup, data: RunData, model: nn.Module,
                   kwargs: dict[str, Any]) -> tuple[RunTraining, RunResume]:
    """The losses, the optimizer (timm's lr scaling), the schedule, the ``--resume`` checkpoint read (a dense one's
    weights loaded, so that the topology is drawn from them), the sparsifier, the FLOPs counter and the EMA.

    Returns:
        The training parts and what the ``--resume`` checkpoint hands on (empty without one).
    """
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import ModelEmaV3

    args, acc = setup.args, setup.accelerator
    train_loss, eval_loss = create_losses(args, data.mixup is not None)
    scale_lr(args, args.batch_size * acc.num_processes * args.grad_accum_steps)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **(args.opt_kwargs or {}))
    decreasing = args.eval_metric == 'loss' or data.val_loader is None
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing), updates_per_epoch=data.updates_per_epoch)
    if scheduler is None or not num_epochs:
        num_epochs = args.epochs
    total_steps = num_epochs * data.updates_per_epoch
    overrides: dict[str, Any] = {}
    data_arg = get_method_info(args.dst).init_data_arg
    if data_arg is not None and not getattr(args, data_arg, None):
        # score on the first training batch(es), from the unprepared loader (every rank scores the same batches;
        # on a resume the scores are computed again, then the checkpoint's masks replace them)
        overrides = {data_arg: data.train_loader}
    # a dense --resume checkpoint: its weights (and optimizer state) go in first, the topology is drawn from them
    resume = load_resume(args, model, optimizer) if args.resume else RunResume()
    try:
        sparsifier = dst_timm.create_sparsifier_from_args(model, optimizer, args, total_steps=total_steps,
                                                          **overrides)
    except ValueError as e:
        raise user_error(str(e)) from None
    if resume.dense:  # topology updates follow the count of steps already done, as under the launcher
        dst_timm.begin_training(sparsifier, total_steps,
                                start_step=dense_start_epoch(resume.ckpt) * data.updates_per_epoch, restore_rng=False)
    _logger.info(f'{sparsifier!r} | {data.updates_per_epoch} optimizer steps per epoch, {total_steps} in all')
    flops = TrainingFlops(model, tuple(data.data_config['input_size']), sparsifier)
    ema = None
    if args.model_ema:
        ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                         device='cpu' if args.model_ema_force_cpu else None)
    training = RunTraining(model=model, model_kwargs=kwargs, train_loss=train_loss, eval_loss=eval_loss,
                           optimizer=optimizer, scheduler=scheduler, num_epochs=num_epochs, total_steps=total_steps,
                           decreasing=decreasing, sparsifier=sparsifier, flops=flops, ema=ema)
    return training, resume


def prepare(state: RunState) -> None:
    """Accelerate's ``prepare`` (``--torchcompile`` first), the AMP scaler of a resume, the checkpoint saver (main
    process; its history and best metric of a resume)."""
    setup, data, tr = state.setup, state.data, state.training
    args, acc = setup.args, setup.accelerator
    train_model = tr.model
    if args.torchcompile:
        train_model = torch.compile(tr.model, backend=args.torchcompile, mode=args.torchcompile_mode)
    loaders = [x for x in (data.val_loader, data.test_loader) if x is not None]
    if args.fsdp and args.fsdp != ACCELERATE_FSDP:  # sharded by --fsdp: the optimizer and loaders only (no DDP)
        prepared = [train_model, *acc.prepare(tr.optimizer, data.train_loader, *loaders)]
    else:  # Accelerate's FSDP2 takes the model with its optimizer; the model is an FSDPModule already, left as it is
        prepared = acc.prepare(train_model, tr.optimizer, data.train_loader, *loaders)
    tr.train_model, tr.optimizer_p, data.train_loader = prepared[:3]
    rest = list(prepared[3:])
    data.val_loader = rest.pop(0) if data.val_loader is not None else None
    data.test_loader = rest.pop(0) if data.test_loader is not None else None
    if len(data.train_loader) != data.batches_per_epoch:
        raise RuntimeError(f'expected {data.batches_per_epoch} batches per process, the loader has '
                           f'{len(data.train_loader)}')
    if state.resume.scaler is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(state.resume.scaler)
    state.outputs.saver = None
    if setup.is_main:
        saver_cls = ShardedCheckpointSaver if args.fsdp else DstCheckpointSaver
        state.outputs.saver = saver_cls(
            lambda: checkpoint_entries(state), tr.sparsifier, tr.flops, tr.scheduler, model=tr.model,
            optimizer=tr.optimizer, args=args, model_ema=tr.ema.module if tr.ema is not None else None,
            amp_scaler=acc.scaler, checkpoint_dir=setup.output_dir, recovery_dir=setup.output_dir,
            decreasing=tr.decreasing, max_history=args.checkpoint_hist)
        if state.resume.saver:
            state.outputs.saver.load_state_dict(state.resume.saver)


def init_trackers(state: RunState) -> None:
    """Accelerate's trackers: Weights & Biases with ``--log-wandb``."""
    args, setup = state.setup.args, state.setup
    if not args.log_wandb:
        return
    from timm.models import safe_model_name
    init = {'wandb': {'tags': args.wandb_tags or None, 'name': os.path.basename(setup.output_dir)}}
    if args.wandb_resume_id:
        init['wandb'].update(id=args.wandb_resume_id, resume='must')
    setup.accelerator.init_trackers(args.wandb_project or safe_model_name(args.model), config=vars(args),
                                    init_kwargs=init)
