"""Construction of the controller, before anything is attached: options checked, schedule resolved, targets found.

Every function here reads its arguments and returns values (the controller assigns them); each refusal is a one-line
``ValueError`` raised before the model, the optimizer or the method is touched. This module imports the validators,
schedules, structure, targets, method base and the FSDP2 checks; never the controller.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from ..distributed import fsdp as _fsdp
from ._validate import check_bool, check_choice, check_float, check_int, check_patterns
from .distributions import DISTRIBUTIONS
from .method import ShardedMethodError, SparseMethod
from .options import MASK_INITS
from .schedules import PRUNE_RATE_SCHEDULES, UpdateSchedule, prune_rate_at, resolve_step, schedule_decays
from .structure import Structure, parse_structure
from .targets import SparseTarget, check_materialized, check_trained, check_unmasked, find_targets

__all__ = ['MASK_INITS', 'checked_options', 'resolve_span', 'make_schedule', 'select_targets', 'warn_misfits']



def checked_options(model: Any, method: Any, o: dict[str, Any]) -> dict[str, Any]:
    """The controller's keywords ``o`` checked, in the order of the signature, and normalised (a new dict)."""
    o = dict(o)
    structure = o['structure'] = parse_structure(o['structure'])
    if not getattr(method, 'attaches', True):
        structure = o['structure'] = None  # nothing is masked: no structure to keep
    sparsity = o['sparsity']
    if sparsity is None:
        sparsity = 1.0 - structure.density if structure is not None and structure.density is not None else 0.9
    sparsity = o['sparsity'] = check_float('sparsity', sparsity, 0.0, 1.0, high_open=True)
    if structure is not None and structure.density is not None and abs(sparsity - (1 - structure.density)) > 1e-9:
        raise ValueError(
            f'structure={structure.spec!r} fixes sparsity at {1 - structure.density:g} (at most {structure.n} of '
            f'every {structure.m} weights active): give sparsity={1 - structure.density:g} or leave sparsity out '
            f'(got sparsity={sparsity:g})')
    check_choice('distribution', o['distribution'], DISTRIBUTIONS)
    check_choice('mask_init', o['mask_init'], MASK_INITS)
    check_choice('prune_rate_schedule', o['prune_rate_schedule'], PRUNE_RATE_SCHEDULES)
    o['prune_rate'] = check_float('prune_rate', o['prune_rate'], 0.0, 1.0)
    o['prune_rate_min'] = check_float('prune_rate_min', o['prune_rate_min'], 0.0, 1.0)
    o['update_interval'] = check_int('update_interval', o['update_interval'], minimum=1)
    if o['total_steps'] is not None:
        o['total_steps'] = check_int('total_steps', o['total_steps'], minimum=1)
    o['seed'] = check_int('seed', o['seed'])
    if o['max_nonfinite_steps'] is not None:
        o['max_nonfinite_steps'] = check_int('max_nonfinite_steps', o['max_nonfinite_steps'], minimum=1)
    o['sparse_kernel_density'] = check_float('sparse_kernel_density', o['sparse_kernel_density'], 0.0, 1.0)
    for key in ('grow_unexplored_first', 'dense_first_layer', 'dense_classifier'):
        check_bool(key, o[key])
    check_bool('remask_every_step', o['remask_every_step'], allow_none=True)
    check_patterns('include', o['include'])
    check_patterns('exclude', o['exclude'])
    if not isinstance(model, nn.Module):
        raise ValueError(f'model: expected a torch.nn.Module, got {type(model).__name__}')
    if not isinstance(method, SparseMethod):
        raise ValueError(f'method: expected a SparseMethod instance, got {type(method).__name__}')
    return o


def resolve_span(span: tuple[Any, Any], total_steps: int | None, pending: bool = False) -> tuple[int, int | None]:
    """(first, last) update step of ``update_start`` / ``update_end`` (``span``); fractions wait for the run's length
    while ``pending``."""
    update_start, update_end = span
    start = resolve_step(update_start if not (pending and isinstance(update_start, float)) else None,
                         total_steps, 'update_start') or 0
    end = resolve_step(update_end if not (pending and isinstance(update_end, float)) else None,
                       total_steps, 'update_end')
    if end is not None and end < start:
        raise ValueError(f'update_end={update_end!r} (step {end}) comes before update_start={update_start!r} '
                         f'(step {start}): no update could ever run')
    return start, end


def make_schedule(method: Any, o: dict[str, Any], total_steps: int | None, pending: bool,
                  milestones: Sequence[tuple[int, int]] | None) -> tuple[UpdateSchedule, int | None]:
    """The update schedule and the step the prune rate decays to (checked: a decaying rate needs an end)."""
    start, end = resolve_span((o['update_start'], o['update_end']), total_steps, pending)
    schedule = UpdateSchedule(o['update_interval'], start=start, end=end, milestones=milestones,
                              update_at_end=method.update_at_end)
    prune_rate_end = end if end is not None else total_steps
    rule = o['prune_rate_schedule']
    if schedule_decays(rule) and prune_rate_end is None and method.explores and not pending:
        raise ValueError(f'prune_rate_schedule={rule!r} decays over training: give total_steps or update_end, '
                         "or use prune_rate_schedule='constant'")
    prune_rate_at(0, float(o['prune_rate']), 1, rule)  # validate the schedule name now rather than at the first update
    return schedule, prune_rate_end


def select_targets(model: nn.Module, optimizer: Any, method: Any, method_name: str,
                   o: dict[str, Any]) -> tuple[list[SparseTarget], bool, float]:
    """The sparse tensors, checked before anything is touched; whether they are FSDP2 shards; the kernel density in
    force (0 on shards)."""
    include, exclude = o['include'], o['exclude']
    targets = find_targets(model, include=include, exclude=exclude, dense_first_layer=o['dense_first_layer'],
                           dense_classifier=o['dense_classifier'])
    if not targets:
        raise ValueError(
            'model: nothing to sparsify (no >= 2-D weight of a conv / linear module matched); '
            f'include={include!r}, exclude={exclude!r}: name parameters with include= glob patterns')
    check_unmasked(targets)
    if method.attaches:
        check_trained(targets, optimizer)
        check_materialized(targets)
    structure: Structure | None = o['structure']
    density = float(o['sparse_kernel_density'])
    # FSDP2 (fully_shard): masks sharded like their weights, updates gathered one tensor at a time (fsdp.py)
    sharded = _fsdp.check_sharded_targets(targets)
    if sharded:
        if type(method).init_masks is not SparseMethod.init_masks:
            raise ShardedMethodError(
                f'method: {method_name!r} chooses its initial topology itself (init_masks), which is not '
                'supported on a model sharded with fully_shard (FSDP2)')
        if structure is not None:
            raise ValueError(f'structure={structure.spec!r}: structured sparsity is not supported on a model '
                             'sharded with fully_shard (FSDP2) yet; leave structure unset (unstructured masks)')
        density = 0.0  # the CSR kernels do not take DTensor shards: the dense kernels run
    return targets, sharded, density


def warn_misfits(structure: Structure | None, targets: Sequence[SparseTarget], selectors: Sequence[Any]) -> None:
    """One warning naming the tensors the structure does not fit (they stay unstructured)."""
    if structure is None:
        return
    misfits = [(t.name, structure.misfit(t.shape)) for t, sel in zip(targets, selectors) if sel.layout is None]
    if misfits:
        listed = '; '.join(f'{n} ({why})' for n, why in misfits[:5]) + (' ...' if len(misfits) > 5 else '')
        warnings.warn(f'timm_dst: structure={structure.spec!r} does not fit {len(misfits)} of '
                      f'{len(targets)} sparse tensor(s): {listed}; they stay unstructured at their budget '
                      '(summary() shows each tensor\'s structure; exclude= keeps them dense)', stacklevel=4)
