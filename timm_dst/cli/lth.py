"""Methods with a dense phase (the Lottery Ticket Hypothesis) in one ``timm-dst-train`` command: the dense phase,
then the sparse phase, named by the method's registered :class:`~timm_dst.methods.DensePhase`."""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from ..integrations.timm.checkpoint import DST_KEY, LAST, read_checkpoint
from ..integrations.timm.outputs import DENSE_PHASE_DIR, RESULTS, REWIND_FILE, fmt_flops, write_json_atomic
from ..methods._registry import get_method_info, method_arguments

__all__ = ['train_two_phases']

_logger = logging.getLogger('timm_dst.train')

# DST flags that mean nothing to the dense phase (reset to their defaults there; the method flags too)
_DENSE_PHASE_RESET = (
    'sparsity', 'distribution', 'mask_init', 'update_interval', 'prune_rate', 'prune_rate_schedule',
    'prune_rate_min', 'update_start', 'update_end', 'update_milestones', 'grow_unexplored_first', 'include',
    'exclude', 'dense_first_layer', 'dense_classifier', 'remask_every_step',
)


def _two_phase_root(args: argparse.Namespace, output_dir: Callable[[argparse.Namespace], str]) -> str:
    if args.output or not args.resume:
        return output_dir(args)
    root = os.path.abspath(args.resume)
    root = root if os.path.isdir(root) else os.path.dirname(root)
    return os.path.dirname(root) if os.path.basename(root) == DENSE_PHASE_DIR else root


def _dense_steps(path: str) -> int:
    return int(read_checkpoint(path, mmap=False)[DST_KEY]['run']['num_updates'])


def _reset_accelerate_state() -> None:
    """Let the next phase build its own Accelerator (the process group, if any, is kept)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def train_two_phases(args: argparse.Namespace, run_cls: Callable[..., Any],
                     output_dir: Callable[[argparse.Namespace], str]) -> dict[str, Any]:
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

    Args:
        args: The parsed flags.
        run_cls: The class of one run (``train._Run``): ``run_cls(args, rewind=...)`` builds it, ``.fit()`` trains it.
        output_dir: The function resolving a run's output folder.
    """
    phase = get_method_info(args.dst).dense_phase
    out = _two_phase_root(args, output_dir)
    dense_dir = os.path.join(out, DENSE_PHASE_DIR)
    rewind_file = os.path.join(dense_dir, REWIND_FILE)
    dense_last = os.path.join(dense_dir, LAST)
    dense_done = os.path.isfile(os.path.join(dense_dir, RESULTS)) and os.path.isfile(dense_last)
    resuming = bool(args.resume)
    rewind_step = getattr(args, phase.rewind_step_arg) or 0

    if not dense_done:
        a1 = argparse.Namespace(**vars(args))
        for dest in (*_DENSE_PHASE_RESET, *(a.dest for a in method_arguments())):
            setattr(a1, dest, None)
        a1.dst, a1.dst_kwargs, a1.output, a1.experiment = phase.dense_method, {}, dense_dir, ''
        a1.resume = dense_last if resuming and os.path.isfile(dense_last) else ''
        _logger.info(f'{args.dst} phase 1/2: dense training in {dense_dir} (rewind point: optimizer step '
                     f'{rewind_step})')
        dense = run_cls(a1, rewind=(rewind_step, rewind_file)).fit()
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
    results = run_cls(a2).fit()
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
    write_json_atomic(results, os.path.join(out, RESULTS))
    _logger.info(f'{args.dst}: both phases {fmt_flops(both)} training FLOPs '
                 f'({results["dense_phase"]["train_flops_both_phases_ratio"]:.4f}x one dense run)')
    return results
