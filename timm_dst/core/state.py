"""Saved-state checks: what :meth:`Sparsifier.load_state_dict` restores, every part checked before anything is written.

Each check raises a one-line ``ValueError`` naming the first entry that is wrong (docs/design.md, invariant 8). The
checks read the controller (its configuration, targets, method and budgets) and write nothing. This module imports
rank sync (counts over shards) and the FSDP2 helpers; never the controller.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from ..distributed import fsdp as _fsdp
from ..distributed.sync import count_nonfinite, count_nonzero
from .capture import like_param

__all__ = ['STATE_VERSION', 'check_state', 'check_masks', 'check_history', 'check_generators', 'check_dense_grads',
           'nonfinite_weights', 'make_state', 'restore']

STATE_VERSION = 1


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _short(x: Any, limit: int = 80) -> str:
    """``x`` in at most ``limit`` characters, for one-line messages."""
    text = ' '.join(str(x).split()) if isinstance(x, BaseException) else ' '.join(repr(x).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _tensors_in(x: Any) -> list[torch.Tensor]:
    """Every tensor in nested mappings, lists and tuples."""
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors_in(v)]
    if isinstance(x, list | tuple):
        return [t for v in x for t in _tensors_in(v)]
    return []


def check_state(sp: Any, state: Any) -> dict[str, Any]:
    """What :meth:`Sparsifier.load_state_dict` restores, every part checked (nothing is written here).

    Raises:
        ValueError: Naming the first entry that is wrong.
    """
    _check_header(sp, state)
    step = state['step']
    if not _is_int(step) or step < 0:
        raise ValueError(f'state: step {step!r} is not accepted: expected an integer >= 0 (optimizer steps taken)')
    step = int(step)
    pending = state.get('update_pending', False)
    if not isinstance(pending, bool):
        raise ValueError(f'state: update_pending {pending!r} is not accepted: expected True or False')
    method_state = state.get('method', {})
    method_state = {} if method_state is None else method_state
    if not isinstance(method_state, Mapping):
        raise ValueError(f'state: method state is a {type(method_state).__name__}, not a mapping (damaged or '
                         'edited)')
    out: dict[str, Any] = {
        'step': step, 'update_pending': pending, 'method': dict(method_state),
        'history': check_history(state.get('history', []), step),
        'generators': check_generators(state.get('generators', {})),
    }
    out['dense_grads'], out['dense_grads_held'] = check_dense_grads(sp, state)
    floats = [x for x in _tensors_in(method_state) if x.is_floating_point()]
    if any(count_nonfinite(floats)):  # a live run never folds a non-finite gradient into method state
        raise ValueError(f'state: the state of method {sp.method_name!r} holds non-finite values (NaN / inf): '
                         'damaged')
    if sp.method.attaches:
        out.update(_check_topology(sp, state, method_state))
    return out


def _check_header(sp: Any, state: Any) -> None:
    """The state's kind, version and configuration (method, sparsity, distribution, structure, sparse tensors)."""
    if not isinstance(state, Mapping) or 'config' not in state:
        raise ValueError('state: not a timm_dst Sparsifier state_dict (no "config" entry)')
    needed = ['step'] + (['masks', 'explored'] if sp.method.attaches else [])
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f'state: a timm_dst Sparsifier state_dict lacks {", ".join(missing)} (damaged or edited)')
    version = state.get('version', STATE_VERSION)
    if not _is_int(version) or not 1 <= version <= STATE_VERSION:
        raise ValueError(f'state: version {version!r} is not one this timm_dst reads (1 to {STATE_VERSION}): '
                         'a state of a newer timm_dst, or damaged')
    cfg = state['config']
    if not isinstance(cfg, Mapping):
        raise ValueError(f'state: config is a {type(cfg).__name__}, not a mapping (damaged or edited)')
    theirs = cfg.get('structure')
    if theirs != sp.config['structure']:
        raise ValueError(f'state: the checkpoint was trained with structure={theirs!r}, this sparsifier keeps '
                         f'structure={sp.config["structure"]!r}: give structure={theirs!r} to continue it')
    for key in ('method', 'sparsity', 'distribution', 'targets'):
        mine, theirs = sp.config[key], cfg.get(key)
        if key == 'targets':
            try:
                theirs = [(n, list(s)) for n, s in (theirs or [])]
            except (TypeError, ValueError):
                raise ValueError('state: targets of the checkpoint are not (name, shape) pairs (damaged or '
                                 'edited)') from None
            mine = [(n, list(s)) for n, s in mine]
        if mine != theirs:
            detail = theirs if key != 'targets' else f'{len(theirs)} tensors'
            accepted = mine if key != 'targets' else f'the {len(mine)} tensors of this model'
            raise ValueError(f'state: {key} of the checkpoint ({detail}) does not match this sparsifier; '
                             f'accepted: {accepted}')


def _check_topology(sp: Any, state: Mapping[str, Any], method_state: Mapping[str, Any]) -> dict[str, Any]:
    """Masks, explored masks, counts and budget total of a state (methods that attach masks), and the model's sparse
    weights."""
    out = {}
    masks = out['masks'] = check_masks(sp, state['masks'], 'masks')
    explored = out['explored'] = check_masks(sp, state['explored'], 'explored')
    if sp.structure is not None:
        try:
            sp.check_structure([_fsdp.full(m) for m in masks])
        except ValueError as e:
            raise ValueError(f'state: {e}') from None
    counts = count_nonzero(masks)
    recorded = state.get('counts')
    if recorded is not None and (not isinstance(recorded, list | tuple) or len(recorded) != len(counts)
                                 or not all(_is_int(c) for c in recorded) or list(recorded) != counts):
        raise ValueError(f'state: counts {_short(recorded)} do not match its masks, which hold {counts} active '
                         'weights (damaged or edited)')
    same = [(m, e) if _fsdp.is_dtensor(m) == _fsdp.is_dtensor(e) else (_fsdp.full(m), _fsdp.full(e))
            for m, e in zip(masks, explored)]
    unexplored = count_nonzero([m & ~e.to(m.device) for m, e in same])
    for t, n in zip(sp.targets, unexplored):
        if n:
            raise ValueError(f'state: explored {t.name} lacks {n} active position(s) of its mask (explored masks '
                             'hold every position ever active: damaged or edited)')
    why = sp.method.check_counts(sp, counts, method_state)
    if why:
        raise ValueError(f'state: its masks do not fit its configuration (method {sp.method_name!r}, sparsity '
                         f'{sp.sparsity:g}, distribution {sp.distribution!r}): {why}')
    budget_total = state.get('budget_total', sp._budget_total)
    slack = 0 if sp.structure is None else max(sel.quantum for sel in sp._selectors)
    if not _is_int(budget_total) or abs(int(budget_total) - sp._budget_total) > slack:
        raise ValueError(f'state: budget_total {budget_total!r} is not the run\'s total budget '
                         f'{sp._budget_total} (damaged or edited)')
    out['budget_total'] = int(budget_total)
    bad = nonfinite_weights(sp.targets)
    if bad:
        raise ValueError(f'model: the sparse weights are not finite ({bad}): refusing to resume from damaged '
                         'weights (NaN at a masked position stays NaN, since NaN * 0 is NaN); load finite weights')
    return out


def check_masks(sp: Any, entries: Any, key: str) -> list[torch.Tensor]:
    """The ``masks`` / ``explored`` entry of a state, in target order: one bool tensor per sparse tensor, shaped
    like its weight."""
    if not isinstance(entries, Mapping):
        raise ValueError(f'state: {key} is a {type(entries).__name__}, not a mapping of tensor names to masks '
                         '(damaged or edited)')
    names = [t.name for t in sp.targets]
    lacking = [n for n in names if n not in entries]
    extra = [str(k) for k in entries if k not in set(names)]
    if lacking or extra:
        what = (f'lacks {", ".join(lacking[:3])}' if lacking else
                f'holds tensors this sparsifier does not have: {", ".join(extra[:3])}')
        raise ValueError(f'state: {key} {what}{" ..." if len(lacking or extra) > 3 else ""} (damaged or edited)')
    out = []
    for t in sp.targets:
        m = entries[t.name]
        if not torch.is_tensor(m):
            raise ValueError(f'state: {key} {t.name} is a {type(m).__name__}, not a tensor')
        if m.dtype != torch.bool:
            raise ValueError(f'state: {key} {t.name} has dtype {m.dtype}; expected torch.bool')
        if tuple(m.shape) != tuple(t.shape):
            raise ValueError(f'state: {key} {t.name} has shape {tuple(m.shape)}; expected {tuple(t.shape)}, the '
                             'shape of the weight')
        out.append(m)
    return out


def check_history(history: Any, step: int) -> list[dict[str, Any]]:
    """The ``history`` entry: records in step order, none past ``step``, densities and rates in [0, 1]."""
    if not isinstance(history, list | tuple):
        raise ValueError(f'state: history is a {type(history).__name__}, not a list (damaged or edited)')
    out, last = [], 0
    for i, h in enumerate(history):
        ok = (isinstance(h, Mapping) and _is_int(h.get('step')) and last <= h['step'] <= step
              and all(_is_real(h.get(k)) and 0.0 <= h[k] <= 1.0 for k in ('density', 'itop_rate', 'prune_rate'))
              and h['density'] <= h['itop_rate'])
        if not ok:
            raise ValueError(f'state: history entry {i} {_short(h)} is not accepted: expected steps in order up to '
                             f'the state\'s step {step}, density <= itop_rate and prune_rate in [0, 1]')
        last = int(h['step'])
        out.append(dict(h))
    return out


def check_generators(generators: Any) -> dict[str, torch.Tensor]:
    """The ``generators`` entry: generator states of devices this process can make generators on."""
    if not isinstance(generators, Mapping):
        raise ValueError(f'state: generators is a {type(generators).__name__}, not a mapping (damaged or edited)')
    for key, value in generators.items():
        try:
            gen = torch.Generator(device=torch.device(key))
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f'state: generators {key!r}: no generator of that device here ({_short(e)})') from None
        if not torch.is_tensor(value) or value.dtype != torch.uint8:
            raise ValueError(f'state: generators {key!r}: not a generator state (a uint8 tensor)')
        try:
            gen.set_state(value)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f'state: generators {key!r}: not a valid generator state ({_short(e)})') from None
    return dict(generators)


def check_dense_grads(sp: Any, state: Mapping[str, Any]) -> tuple[list[Any], list[bool]]:
    """The captured dense gradients (one per sparse tensor: None or a finite float tensor shaped like the weight)
    and which of them are held."""
    n = len(sp.targets)
    grads = state.get('dense_grads')
    grads = [None] * n if grads is None else grads
    if not isinstance(grads, list | tuple) or len(grads) != n:
        raise ValueError(f'state: dense_grads is not a list of one entry per sparse tensor ({n}) (damaged or '
                         'edited)')
    held = state.get('dense_grads_held')
    held = [g is not None for g in grads] if held is None else held
    if not isinstance(held, list | tuple) or len(held) != n or not all(isinstance(h, bool) for h in held):
        raise ValueError(f'state: dense_grads_held is not a list of {n} booleans (damaged or edited)')
    for t, g, h in zip(sp.targets, grads, held):
        if g is None:
            if h:
                raise ValueError(f'state: dense_grads_held says {t.name} is held, dense_grads has none')
            continue
        if not torch.is_tensor(g) or not g.is_floating_point() or tuple(g.shape) != tuple(t.shape):
            got = f'shape {tuple(g.shape)}, dtype {g.dtype}' if torch.is_tensor(g) else type(g).__name__
            raise ValueError(f'state: dense_grads {t.name} is not a float tensor of shape {tuple(t.shape)} '
                             f'({got})')
    kept = [(t, g) for t, g, h in zip(sp.targets, grads, held) if h]
    for (t, _), bad in zip(kept, count_nonfinite([g for _, g in kept])):
        if bad:
            raise ValueError(f'state: dense_grads {t.name} holds {bad} non-finite value(s) (NaN / inf): a live '
                             'run drops such gradients (damaged)')
    return list(grads), list(held)


def nonfinite_weights(targets: list[Any]) -> str:
    """The sparse weights holding NaN / inf values, with their counts ('' when all are finite; a collective under
    FSDP2)."""
    counts = count_nonfinite([t.param.detach() for t in targets])
    bad = [f'{t.name}: {c} value(s)' for t, c in zip(targets, counts) if c]
    return ', '.join(bad[:3]) + (f' and {len(bad) - 3} more tensors' if len(bad) > 3 else '')


def make_state(sp: Any, fixed: bool) -> dict[str, Any]:
    """The body of ``Sparsifier.state_dict`` (``fixed``: captured gradients as tensors, zeros where none is held, for
    the methods that read dense gradients; the others never hold one)."""
    grads = sp._capture.grads
    return {
        'version': STATE_VERSION,
        'config': dict(sp.config),
        'step': sp.step,
        'counts': list(sp.counts),
        'masks': {t.name: t.mask.detach().cpu().clone() for t in sp.targets} if sp.method.attaches else {},
        'explored': {t.name: e.cpu().clone() for t, e in zip(sp.targets, sp.explored)},
        'history': [dict(h) for h in sp.history],
        'generators': {k: g.get_state() for k, g in sp._generators.items()},
        'dense_grads': [g.cpu() if g is not None else (torch.zeros_like(t.param, dtype=torch.float32).cpu()
                                                        if fixed and sp.method.uses_dense_grads else None)
                        for g, t in zip(grads, sp.targets)],
        'update_pending': sp._update_pending,
        'dense_grads_held': [g is not None for g in grads],
        'method': sp.method.state_dict(),
        'budget_total': getattr(sp, '_budget_total', sum(sp.counts)),
    }


def restore(sp: Any, checked: dict[str, Any]) -> None:
    """Write a checked state (:func:`check_state`) into the controller: the body of ``Sparsifier.load_state_dict``.

    Raises:
        ValueError: The method refuses its own state (nothing is written then).
    """
    try:  # first: a method refusing its own state (built-in methods check it before writing) leaves the rest as is
        sp.method.load_state_dict(checked['method'])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f'state: the state of method {sp.method_name!r} is not accepted ({e})') from None
    sp.step = checked['step']
    sp._update_pending = checked['update_pending']
    sp._guard.reset()
    sp.history = checked['history']
    for key, g_state in checked['generators'].items():
        sp.generator(key).set_state(g_state)
    if sp.method.attaches:
        sp._writer.restore(sp.optimizer, sp.targets, sp.explored, checked['masks'], checked['explored'])
        sp._refresh_counts()
        sp._budget_total = checked['budget_total']
    sp._capture.load([like_param(g, t.param, sp._sharded) if g is not None and h else None
                      for g, h, t in zip(checked['dense_grads'], checked['dense_grads_held'], sp.targets)])
    if sp.method.attaches:
        sp._set_capture(sp.method.needs_dense_grad(sp, sp.step + 1) or (
            sp._update_pending and sp.method.needs_dense_grad(sp, sp.step)))
