"""Evaluating a ``timm-dst-train`` run: validation / test metrics, the exported weights, and the end of a run (the
exported weights tested in plain timm, ``results.json``, the ``RESULT`` line)."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
import torch.nn as nn

from ..core.masks import export_state_dict
from ..integrations.timm.outputs import (
    DST_SUMMARY,
    EXPORT_BEST,
    EXPORT_LAST,
    RESULTS,
    dst_summary,
    flops_line,
    rank_masks_file,
    save_safetensors_atomic,
    write_json_atomic,
)
from .build import pretrained_overlay
from .outputs import density_text
from .sharded import plain_sharded_model
from .state import RunState

__all__ = ['evaluate', 'validate', 'export_weights', 'finish_run', 'DST_SUMMARY', 'RESULTS', 'EXPORT_BEST',
           'EXPORT_LAST']

_logger = logging.getLogger('timm_dst.train')


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
        if isinstance(out, tuple | list):
            out = out[0]
        out, y = accelerator.gather_for_metrics((out.float(), y))
        n = y.shape[0]
        loss_sum += nn.functional.cross_entropy(out, y, reduction='sum').item()
        a1, a5 = accuracy(out, y, topk=(1, min(5, out.shape[1])))
        correct1 += a1.item() * n / 100.0
        correct5 += a5.item() * n / 100.0
        count += n
    model.train(was_training)
    count = max(count, 1)
    return {'loss': loss_sum / count, 'top1': 100.0 * correct1 / count, 'top5': 100.0 * correct5 / count}


def validate(state: RunState) -> dict[str, float] | None:
    """The metrics that rank checkpoints: the EMA's with ``--model-ema`` (unless kept on the CPU), as timm; None
    without a validation split. BatchNorm statistics are first made equal across ranks (``--dist-bn``)."""
    from timm.utils import distribute_bn
    args, acc, tr = state.setup.args, state.setup.accelerator, state.training
    val_loader, progress = state.data.val_loader, state.setup.progress
    if acc.num_processes > 1 and args.dist_bn in ('broadcast', 'reduce') and not args.sync_bn:
        distribute_bn(tr.model, acc.num_processes, args.dist_bn == 'reduce')
    if val_loader is None:
        return None
    metrics = evaluate(tr.train_model, val_loader, acc, 'validate', progress)
    if tr.ema is not None and not (args.model_ema_force_cpu and acc.device.type != 'cpu'):
        metrics = evaluate(tr.ema.module, val_loader, acc, 'validate EMA', progress)
    return metrics


def export_weights(state: RunState, path: str, use_ema: bool) -> None:
    """Write the plain timm weights (masks folded, no timm_dst keys) as safetensors, on the main process (every rank
    calls it: under ``--fsdp`` the shards are gathered, a collective)."""
    if not state.setup.is_main and not state.setup.args.fsdp:
        return
    tr = state.training
    sp = tr.sparsifier
    src = tr.ema.module if (use_ema and tr.ema is not None) else tr.model
    meta = {'arch': state.setup.args.model, 'timm_dst_method': sp.method_name,
            'density': f'{sp.density:.6f}', 'itop_rate': f'{sp.itop_rate:.6f}',
            'model_kwargs': json.dumps(tr.model_kwargs, default=list)}
    weights = export_state_dict(src, rank0_only=True)  # sharded: gathered one tensor at a time, onto rank 0
    if state.setup.is_main:
        save_safetensors_atomic(weights, path, metadata=meta)


def finish_run(state: RunState, wall: float) -> dict[str, Any]:
    """Export the last weights, test the best and last exported weights in plain timm, write results.json."""
    import timm
    setup, data, tr, out = state.setup, state.data, state.training, state.outputs
    args, acc, sp = setup.args, setup.accelerator, tr.sparsifier
    last_export = os.path.join(setup.output_dir, EXPORT_LAST)
    export_weights(state, last_export, use_ema=tr.ema is not None)
    best_export = os.path.join(setup.output_dir, EXPORT_BEST)
    acc.wait_for_everyone()
    results: dict[str, Any] = {
        'model': args.model, 'dataset': data.info.name, 'method': sp.method_name, 'sparsity': sp.sparsity,
        'density': sp.density, 'model_density': sp.model_density,  # the sparse tensors; all the model's weights
        'itop_rate': sp.itop_rate, 'optimizer_steps': state.position.num_updates,
        'epochs': tr.num_epochs, 'best_epoch': out.best_epoch,
        f'best_eval_{args.eval_metric}': out.best_metric, 'train_wall_s': wall,
        'load_with': (f'timm.create_model({args.model!r}, pretrained=True, '
                      f'pretrained_cfg_overlay=dict(file=...), **model_kwargs)'),
        'model_kwargs': tr.model_kwargs, 'data_config': {k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in data.data_config.items()},
    }
    results.update(tr.flops.summary())
    exports = {'last': last_export}
    if out.best_epoch is not None and os.path.isfile(best_export):
        exports['best'] = best_export
    for tag, path in exports.items():
        if args.fsdp:  # plain timm, sharded like the run (rank 0 reads the file)
            plain = plain_sharded_model(args, acc, path, tr.model_kwargs)
        else:
            plain = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=pretrained_overlay(
                path, data.info, data.data_config['input_size']), **tr.model_kwargs).to(acc.device)
        if data.val_loader is not None:
            results[f'val_{tag}'] = evaluate(plain, data.val_loader, acc, f'validate {tag}')
        if data.test_loader is not None:
            results[f'test_{tag}'] = evaluate(plain, data.test_loader, acc, f'test {tag}')
    if args.save_rank_masks:
        torch.save({'masks': {t.name: t.mask.detach().cpu().clone() for t in sp.targets} if sp.targets and
                    sp.method.attaches else {},
                    'itop_rate': sp.itop_rate, 'density': sp.density, 'step': sp.step,
                    'explored': [e.cpu() for e in sp.explored]},
                   os.path.join(setup.output_dir, rank_masks_file(acc.process_index)))
    if setup.is_main:
        write_json_atomic(dst_summary(sp, tr.flops), os.path.join(setup.output_dir, DST_SUMMARY))
        write_json_atomic(results, os.path.join(setup.output_dir, RESULTS))
    _log_result(state, results, wall, exports)
    end_run(state)
    return results


def end_run(state: RunState) -> None:
    """Leave the process group, once every rank is here (none leaves while another still writes or communicates):
    the end of every run, finished or stopped."""
    state.setup.accelerator.wait_for_everyone()
    state.setup.accelerator.end_training()


def _log_result(state: RunState, results: dict[str, Any], wall: float, exports: dict[str, str]) -> None:
    args, sp, out = state.setup.args, state.training.sparsifier, state.outputs
    if 'test_best' in results:
        test = f'test top1 {results["test_best"]["top1"]:.2f} (best-on-validation weights)'
    elif 'test_last' in results:
        why = 'no validation split' if state.data.val_loader is None else 'no epoch was validated'
        test = f'test top1 {results["test_last"]["top1"]:.2f} (last weights; {why})'
    else:
        test = 'no test split'
    if out.best_metric is not None:
        _logger.info(f'done in {wall:.1f}s | best eval {args.eval_metric} {out.best_metric:.4g} at epoch '
                     f'{out.best_epoch} | weights {exports.get("best")}')
    else:
        _logger.info(f'done in {wall:.1f}s | weights {exports["last"]}')
    _logger.info(flops_line(state.training.flops.summary()))
    _logger.info(f'RESULT {args.model} {sp.method_name} | {test} | density '
                 f'{density_text(sp.density, sp.model_density)} | R_s {sp.itop_rate:.4f}')
