"""FSDP2 in ``timm-dst-train`` (``--fsdp``, or ``accelerate launch --use_fsdp --fsdp_version 2``).

The model is sharded before the optimizer is built and the sparsifier attached (docs/distributed.md): on the meta
device and materialised shard by shard where the model allows it (:func:`~timm_dst.distributed.shard.
build_meta_sharded`), else built whole and sharded. Checkpoints go through ``torch.distributed.checkpoint`` (DCP): each
rank writes its shards of the weights, the optimizer state and the sparsifier's state into ``<output>/dcp/<tag>``; the
checkpoint files of timm's saver (``last.pth.tar``, ``checkpoint-N``, ``recovery-E-B``, ``model_best``) stay, small,
with everything else (position, schedule, every rank's random states, the saver's history) and the name of their DCP
folder. A folder no checkpoint file names any more is removed.
"""
from __future__ import annotations

import argparse
import functools
import glob
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ..distributed.shard import MetaInitError, build_meta_sharded, shard_model, shard_units
from ..integrations.timm.checkpoint import DST_KEY, CheckpointError
from ..integrations.timm.outputs import CHECKPOINT_EXT, atomic_path
from ..integrations.timm.saver import DstCheckpointSaver

__all__ = ['DCP_DIR', 'SHARDED_FORMAT', 'ACCELERATE_FSDP', 'build_sharded_model', 'is_sharded_checkpoint',
           'save_sharded', 'load_sharded', 'prune_sharded', 'ShardedCheckpointSaver', 'accelerate_fsdp_version',
           'plain_sharded_model']

_logger = logging.getLogger('timm_dst.train')

DCP_DIR = 'dcp'  # <output>/dcp/<tag>: one DCP checkpoint per saved position
SHARDED_FORMAT = 1
ACCELERATE_FSDP = 'accelerate'  # args.fsdp when Accelerate's own FSDP2 set-up shards the model (GPUs)


def accelerate_fsdp_version() -> int | None:
    """The FSDP version ``accelerate launch --use_fsdp`` asked for (``--fsdp_version``), or None without
    ``--use_fsdp``."""
    if os.environ.get('ACCELERATE_USE_FSDP', 'false').lower() != 'true':
        return None
    return int(os.environ.get('FSDP_VERSION', '1') or 1)


# --------------------------------------------------------------------------------------------------------------------
# the model
def _mesh(accelerator: Any) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    return DeviceMesh.from_group(dist.group.WORLD, accelerator.device.type)


def _whole_reason(args: argparse.Namespace) -> str | None:
    """Why the model must be built whole before sharding (its weights come from a file), or None."""
    for dest in ('pretrained', 'pretrained_path', 'initial_checkpoint', 'head_init_scale', 'head_init_bias'):
        value = getattr(args, dest)
        if value not in (None, False, ''):
            return f'--{dest.replace("_", "-")} is given'
    return None


def build_sharded_model(args: argparse.Namespace, accelerator: Any, create_whole: Any, kwargs: dict[str, Any]
                        ) -> nn.Module:
    """The model, sharded with FSDP2 on every rank (a collective).

    Args:
        args: The parsed flags (``--fsdp-modules``; ``args.fsdp`` is :data:`ACCELERATE_FSDP` when Accelerate's FSDP2
            plugin shards the model).
        accelerator: The run's Accelerator.
        create_whole: Builds the whole model as without ``--fsdp`` (weights loaded, head initialised), on the device.
        kwargs: The model's ``timm.create_model`` keywords.

    Raises:
        UnitsError: ``--fsdp-modules`` matches no module.
    """
    world = accelerator.num_processes
    if args.fsdp == ACCELERATE_FSDP:  # Accelerate's own FSDP2 preparation (its wrap policy, precision, offload)
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model
        model = fsdp2_prepare_model(accelerator, create_whole())
        _log_sharded(model, world, "Accelerate's FSDP2 plugin")
        return model
    model, how = _meta_or_whole(args, accelerator, kwargs, create_whole, _whole_reason(args))
    _log_sharded(model, world, how)
    return model


def plain_sharded_model(args: argparse.Namespace, accelerator: Any, path: str, kwargs: dict[str, Any]) -> nn.Module:
    """The exported weights ``path`` in a plain timm model (no masks), sharded like the run's model: rank 0 reads the
    file and the entries are scattered to the shards (a collective), so no other rank holds the whole model."""
    import timm
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    model, _ = _meta_or_whole(args, accelerator, kwargs,
                              lambda: timm.create_model(args.model, **kwargs).to(accelerator.device))
    weights = load_file(path, device='cpu') if accelerator.is_main_process else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                  strict=True))
    return model


def _meta_or_whole(args: argparse.Namespace, accelerator: Any, kwargs: dict[str, Any], create_whole: Any,
                   whole_reason: str | None = None) -> tuple[nn.Module, str]:
    """The model sharded over the run's ranks: built on the meta device and initialised shard by shard, or (when
    ``whole_reason`` is given or the model does not allow it) built whole by ``create_whole`` and then sharded.
    Returns the model and how it was built, for the log."""
    import timm
    units = functools.partial(shard_units, patterns=args.fsdp_modules)
    how = whole_reason
    if how is None:
        try:
            model = build_meta_sharded(functools.partial(timm.create_model, args.model, **kwargs), accelerator.device,
                                       units, mesh=_mesh(accelerator))
            if args.grad_checkpointing:
                model.set_grad_checkpointing(enable=True)
            return model, 'built on the meta device, initialised shard by shard'
        except MetaInitError as e:
            how = str(e)
    model = create_whole()
    shard_model(model, units(model), mesh=_mesh(accelerator))
    return model, f'built whole on every rank, then sharded: {how}'


def _log_sharded(model: nn.Module, world: int, how: str) -> None:
    from ..distributed.fsdp import fsdp_modules
    names = {id(m): n for n, m in model.named_modules()}
    units = [names[id(m)] or '(root)' for m in fsdp_modules(model)]
    inner = [u for u in units if u != '(root)']
    shown = ', '.join(inner[:2] + (['...'] if len(inner) > 3 else []) + inner[max(2, len(inner) - 1):])
    _logger.info(f'FSDP2: {len(inner)} module(s) sharded ({shown or "none"}), then the root, over {world} rank(s); '
                 f'{how}')


# --------------------------------------------------------------------------------------------------------------------
# checkpoints
def is_sharded_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """Whether a checkpoint file is the small part of a ``--fsdp`` checkpoint (its tensors in a DCP folder)."""
    dst = ckpt.get(DST_KEY)
    return isinstance(dst, Mapping) and 'dcp' in dst


def _state(state: Any, optimizer: bool = True) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    tr = state.training
    if optimizer:
        model_sd, optim_sd = get_state_dict(tr.model, tr.optimizer)
        out = {'model': model_sd, 'optim': optim_sd}
    else:
        out = {'model': get_model_state_dict(tr.model)}
    out['sparsifier'] = tr.sparsifier.state_dict(dcp=True)
    return out


def save_sharded(state: Any, tag: str) -> None:
    """Write the run's weights, optimizer state and sparsifier state to ``<output>/dcp/<tag>`` (every rank its
    shards; a collective). The folder appears whole or not at all (written under ``<tag>.part``, then renamed)."""
    import torch.distributed.checkpoint as dcp
    setup = state.setup
    acc = setup.accelerator
    final = os.path.join(setup.output_dir, DCP_DIR, tag)
    tmp = final + '.part'
    if setup.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.dirname(final), exist_ok=True)
    acc.wait_for_everyone()
    dcp.save(_state(state), checkpoint_id=tmp)
    acc.wait_for_everyone()
    if setup.is_main:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    acc.wait_for_everyone()


def load_sharded(state: Any, ckpt: Mapping[str, Any], path: str, optimizer: bool = True) -> None:
    """Load the DCP folder that the checkpoint file ``path`` names into the run (weights, optimizer state unless
    ``optimizer`` is False, sparsifier state), on any number of ranks; a collective.

    Raises:
        CheckpointError: The folder is missing, or does not fit this run.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
    tr = state.training
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), DCP_DIR, ckpt[DST_KEY]['dcp'])
    if not os.path.isdir(folder):
        raise CheckpointError(f'--resume {path}: its sharded state {folder} is missing')
    loaded = _state(state, optimizer=optimizer)
    try:
        dcp.load(loaded, checkpoint_id=folder)
        tr.sparsifier.load_state_dict(loaded['sparsifier'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f'--resume {path}: its sharded state {folder} does not fit this run '
                              f'({str(e).splitlines()[0][:200]})') from None
    if optimizer:
        set_state_dict(tr.model, tr.optimizer, model_state_dict=loaded['model'], optim_state_dict=loaded['optim'])
    else:
        set_model_state_dict(tr.model, loaded['model'])
    flops = ckpt[DST_KEY].get('flops')
    if flops is not None:
        tr.flops.load_state_dict(flops)


def prune_sharded(output_dir: str) -> None:
    """Remove the DCP folders of ``output_dir`` that no checkpoint file names any more, and those of interrupted writes
    (main process, after a checkpoint is written on every rank)."""
    from ..integrations.timm.checkpoint import read_checkpoint_file
    root = os.path.join(output_dir, DCP_DIR)
    if not os.path.isdir(root):
        return
    named = set()
    for file in glob.glob(os.path.join(output_dir, '*' + CHECKPOINT_EXT)):
        try:
            ckpt = read_checkpoint_file(file, '--resume')
        except CheckpointError:
            continue
        if is_sharded_checkpoint(ckpt):
            named.add(ckpt[DST_KEY]['dcp'])
    for entry in os.listdir(root):  # a .part folder is a write that was interrupted (none is in progress here)
        if entry not in named:
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


class ShardedCheckpointSaver(DstCheckpointSaver):
    """The checkpoint saver of a ``--fsdp`` run: timm's bookkeeping (``last``, ``model_best``, the ``checkpoint-N``
    history, ``recovery-E-B``) over small checkpoint files, each naming the DCP folder that holds its tensors (set
    :attr:`dcp_tag` before each save; :func:`save_sharded` writes the folder first, on every rank)."""

    dcp_tag: str = ''

    def _save(self, save_path: str, epoch: int, metric: float | None = None) -> None:
        sp = self.sparsifier
        dst = {'format': SHARDED_FORMAT, 'dcp': self.dcp_tag, 'method': sp.method_name, 'sparsity': sp.sparsity,
               'density': sp.density, 'itop_rate': sp.itop_rate, 'step': sp.step, 'total_steps': sp.total_steps,
               'flops': self.flops.state_dict() if self.flops is not None else None}
        dst.update(self.state_fn() if self.state_fn is not None else {})
        ckpt = {'epoch': epoch, 'arch': self.args.model, 'args': self.args, 'version': 2,
                'saver': self.state_dict(epoch, metric), DST_KEY: dst}
        if metric is not None:
            ckpt['metric'] = metric
        if self.scheduler is not None:
            ckpt['scheduler'] = self.scheduler.state_dict()
        if self.amp_scaler is not None:
            ckpt[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        try:
            with atomic_path(save_path) as tmp:
                torch.save(ckpt, tmp)
        except (OSError, RuntimeError) as e:
            self._write_failed(save_path, epoch, e)
