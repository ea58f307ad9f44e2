"""Evaluating a ``timm-dst-train`` run: validation / test metrics, and the end of a run (the exported weights
tested in plain timm, ``results.json``, the ``RESULT`` line)."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn as nn

from ..integrations.timm.outputs import (
    DST_SUMMARY,
    EXPORT_BEST,
    EXPORT_LAST,
    RESULTS,
    dst_summary,
    flops_line,
    write_json_atomic,
)
from .build import pretrained_overlay

__all__ = ['evaluate', 'finish_run', 'DST_SUMMARY', 'RESULTS', 'EXPORT_BEST', 'EXPORT_LAST']

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


def finish_run(run: Any, wall: float) -> dict[str, Any]:
    """Export the last weights, test the best and last exported weights in plain timm, write results.json."""
    import timm
    args, acc, sp = run.args, run.accelerator, run.sparsifier
    last_export = os.path.join(run.output_dir, EXPORT_LAST)
    run.export(last_export, use_ema=run.ema is not None)
    best_export = os.path.join(run.output_dir, EXPORT_BEST)
    acc.wait_for_everyone()
    results: dict[str, Any] = {
        'model': args.model, 'dataset': run.info.name, 'method': sp.method_name, 'sparsity': sp.sparsity,
        'density': sp.density, 'itop_rate': sp.itop_rate, 'optimizer_steps': run.num_updates,
        'epochs': run.num_epochs, 'best_epoch': run.best_epoch,
        f'best_eval_{args.eval_metric}': run.best_metric, 'train_wall_s': wall,
        'load_with': (f'timm.create_model({args.model!r}, pretrained=True, '
                      f'pretrained_cfg_overlay=dict(file=...), **model_kwargs)'),
        'model_kwargs': run.model_kwargs, 'data_config': {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in run.data_config.items()},
    }
    results.update(run.flops.summary())
    exports = {'last': last_export}
    if run.best_epoch is not None and os.path.isfile(best_export):
        exports['best'] = best_export
    for tag, path in exports.items():
        plain = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=pretrained_overlay(
            path, run.info, run.data_config['input_size']), **run.model_kwargs).to(acc.device)
        if run.val_loader is not None:
            results[f'val_{tag}'] = evaluate(plain, run.val_loader, acc, f'validate {tag}')
        if run.test_loader is not None:
            results[f'test_{tag}'] = evaluate(plain, run.test_loader, acc, f'test {tag}')
    if args.save_rank_masks:
        torch.save({'masks': {t.name: t.mask.detach().cpu().clone() for t in sp.targets} if sp.targets and
                    sp.method.attaches else {},
                    'itop_rate': sp.itop_rate, 'density': sp.density, 'step': sp.step,
                    'explored': [e.cpu() for e in sp.explored]},
                   os.path.join(run.output_dir, f'masks_rank{acc.process_index}.pt'))
    if run.is_main:
        write_json_atomic(dst_summary(sp, run.flops), os.path.join(run.output_dir, DST_SUMMARY))
        write_json_atomic(results, os.path.join(run.output_dir, RESULTS))
    _log_result(run, results, wall, exports)
    acc.wait_for_everyone()
    acc.end_training()
    return results


def _log_result(run: Any, results: dict[str, Any], wall: float, exports: dict[str, str]) -> None:
    args, sp = run.args, run.sparsifier
    if 'test_best' in results:
        test = f'test top1 {results["test_best"]["top1"]:.2f} (best-on-validation weights)'
    elif 'test_last' in results:
        why = 'no validation split' if run.val_loader is None else 'no epoch was validated'
        test = f'test top1 {results["test_last"]["top1"]:.2f} (last weights; {why})'
    else:
        test = 'no test split'
    if run.best_metric is not None:
        _logger.info(f'done in {wall:.1f}s | best eval {args.eval_metric} {run.best_metric:.4g} at epoch '
                     f'{run.best_epoch} | weights {exports.get("best")}')
    else:
        _logger.info(f'done in {wall:.1f}s | weights {exports["last"]}')
    _logger.info(flops_line(run.flops.summary()))
    _logger.info(f'RESULT {args.model} {sp.method_name} | {test} | density {sp.density:.4f} | '
                 f'R_s {sp.itop_rate:.4f}')
