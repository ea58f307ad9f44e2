"""GMP, gradual magnitude pruning (Zhu & Gupta 2017): dense (or ``s_i``-sparse) to ``sparsity`` on a cubic schedule.

Sparsity at step t: ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3`` for t in [t0, t1], with t0 =
``update_start``, t1 = ``update_end`` (a step or a fraction of ``total_steps``), magnitude pruning every ΔT =
``update_interval`` steps in (t0, t1] (and once more at t1 when t1 - t0 is not a multiple of ΔT, so the run always
ends at ``sparsity``). Pruned weights never regrow; after t1 the topology is frozen.

Counts are exact integers. Multiplying the formula by a tensor's size n gives active counts
``a_t = a_f + (a_i - a_f) * (1 - frac)^3`` with a_i = n (1 - s_i) and a_f = n (1 - s_f); the controller's exact
integer budgets are used for the end points (a_f = the same per-tensor counts any other method gets at ``sparsity``
with the same ``distribution``) and the schedule is rounded once: ``a_t = a_f + round((a_i - a_f) * (1 - frac)^3)``.

* Per tensor (default, as in Zhu & Gupta, who prune every layer to the same s_t: use ``distribution='uniform'``, the
  registered default of ``gmp``): every tensor follows the schedule between its own end counts, pruning its
  smallest-magnitude active weights. ``distribution='erk'`` / ``'er'`` set the per-tensor end points instead.
* Global (``gmp_global=True``, as in the pruning baselines of Gale et al. 2019 / RigL's comparisons): one schedule for
  the total count, pruning the globally smallest-magnitude active weights; per-tensor densities are free.

The masks start all-True when ``gmp_initial_sparsity`` is 0 (a dense start: the density and R_s start at 1); otherwise
at the largest-magnitude weights (per tensor, or globally) at s_i.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..core._validate import check_bool, check_float
from ..core.controller import Sparsifier
from ..core.method import SparseMethod, _count_slack
from ._registry import register_method

__all__ = ['GMP', 'cubic_sparsity']


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3``, held constant outside [t0, t1]."""
    frac = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3


def _int_list(x: Any, n: int) -> bool:
    return (isinstance(x, list | tuple) and len(x) == n
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in x))


class GMP(SparseMethod):
    """Gradual magnitude pruning on the cubic schedule; pruned weights never regrow.

    Args:
        gmp_initial_sparsity: s_i, the sparsity at t0 (0 = dense start). Must not exceed ``sparsity``.
        gmp_global: Prune by one global magnitude ranking (True) or per tensor (False, default).
    """

    update_at_end = True  # reach s_f exactly at t1 even when t1 - t0 is not a multiple of ΔT

    def __init__(self, gmp_initial_sparsity: float = 0.0, gmp_global: bool = False):
        self.initial_sparsity = check_float('gmp_initial_sparsity', gmp_initial_sparsity, 0.0, 1.0, high_open=True)
        self.global_ = check_bool('gmp_global', gmp_global)
        self.initial_counts: list[int] = []
        self.final_counts: list[int] = []
        self.start = 0
        self.end: int | None = 0  # None until the run's length is known (a fractional update_end, deferred)

    # --- schedule ----------------------------------------------------------------------------------------------
    def _set_span(self, start: int, end: int) -> None:
        self.start, self.end = int(start), int(end)
        if self.end <= self.start:
            raise ValueError(f'gmp: update_end={self.end} must come after update_start={self.start}')

    def decay(self, step: int) -> float:
        """``(1 - (t - t0) / (t1 - t0))^3``, clipped to [0, 1]."""
        return cubic_sparsity(step, 1.0, 0.0, self.start, self.end)

    def target_counts(self, step: int) -> list[int]:
        """Per-tensor active counts at ``step`` (per-tensor mode)."""
        d = self.decay(step)
        return [f + int(round((i - f) * d)) for i, f in zip(self.initial_counts, self.final_counts)]

    def target_total(self, step: int) -> int:
        """Total active count at ``step``."""
        if not self.global_:
            return sum(self.target_counts(step))
        i, f = sum(self.initial_counts), sum(self.final_counts)
        return f + int(round((i - f) * self.decay(step)))

    # --- hooks ---------------------------------------------------------------------------------------------------
    def init_masks(self, sp: Sparsifier) -> list[torch.Tensor]:
        deferred = bool(getattr(sp, '_total_steps_pending', False))  # fractions resolved at set_total_steps
        if sp.schedule.end is None and not deferred:
            raise ValueError('gmp: update_end (t1, the step where pruning reaches sparsity) is required: give a step, '
                             'or a fraction of training with total_steps')
        self.start, self.end = sp.schedule.start, None
        if sp.schedule.end is not None:
            self._set_span(sp.schedule.start, sp.schedule.end)
        if self.initial_sparsity > sp.sparsity:
            raise ValueError(f'gmp_initial_sparsity={self.initial_sparsity} must not exceed sparsity={sp.sparsity}')
        self.final_counts = list(sp.counts)
        numels = [t.numel for t in sp.targets]
        if self.initial_sparsity == 0.0:
            self.initial_counts = numels
            return [torch.ones_like(t.param, dtype=torch.bool) for t in sp.targets]
        if self.global_:
            total = int(round((1.0 - self.initial_sparsity) * sum(numels)))
            masks = sp.global_topk_masks([t.param.detach().abs() for t in sp.targets], total)
            self.initial_counts = [int(torch.count_nonzero(m)) for m in masks]
            return masks
        counts = sp.layer_budgets(self.initial_sparsity)  # in whole units of the structure, if any
        self.initial_counts = [max(c, f) for c, f in zip(counts, self.final_counts)]  # never below the end point
        return sp.topk_masks([t.param.detach().abs() for t in sp.targets], self.initial_counts)

    def drop_counts(self, sp: Sparsifier, rate: float) -> list[int]:
        if self.end is None:  # attached before the run's length was known (defer_total_steps): resolved by now
            self._set_span(sp.schedule.start, sp.schedule.end)
        if not self.global_:
            return [max(0, c - k) for c, k in zip(sp.counts, self.target_counts(sp.step))]
        n_drop = sum(sp.counts) - self.target_total(sp.step)
        if n_drop <= 0:
            return [0] * len(sp.targets)
        scores = torch.cat([
            self.drop_score(sp, i).float().masked_fill(~t.mask, math.inf).flatten()
            for i, t in enumerate(sp.targets)])
        owner = torch.cat([torch.full((t.numel,), i, device=scores.device) for i, t in enumerate(sp.targets)])
        lowest = torch.topk(scores, n_drop, largest=False, sorted=False).indices
        return [int(c) for c in torch.bincount(owner[lowest], minlength=len(sp.targets)).tolist()]

    def grow_counts(self, sp: Sparsifier, dropped: list[int], kept: list[torch.Tensor]) -> list[int]:
        return [0] * len(dropped)

    # --- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {'initial_counts': list(self.initial_counts), 'final_counts': list(self.final_counts),
                'start': self.start, 'end': self.end}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        initial = list(state.get('initial_counts', self.initial_counts))
        final = list(state.get('final_counts', self.final_counts))
        start, end = state.get('start', self.start), state.get('end', self.end)
        n = len(self.final_counts) or len(final)
        if not (_int_list(initial, n) and _int_list(final, n)):
            raise ValueError(f'gmp: initial_counts and final_counts must be {n} integers each')
        if end is None and _int_list([start], 1):  # saved before its first update in a deferred-length run
            self.initial_counts, self.final_counts, self.start, self.end = initial, final, int(start), None
            return
        if not (_int_list([start, end], 2) and 0 <= start < end):
            raise ValueError(f'gmp: start {start!r} and end {end!r} must be integers with 0 <= start < end')
        self.initial_counts, self.final_counts, self.start, self.end = initial, final, int(start), int(end)

    def check_counts(self, sp: Sparsifier, counts: list[int], state: dict[str, Any]) -> str | None:
        """Counts between the checkpoint's end points of the pruning schedule (per tensor, or in total with
        ``gmp_global``), whose final counts are the budgets of ``sparsity``."""
        n = len(sp.targets)
        initial, final = state.get('initial_counts'), state.get('final_counts')
        if not (_int_list(initial, n) and _int_list(final, n)):
            return f'its pruning schedule (initial_counts, final_counts) is not {n} integers each'
        budgets = sp.layer_budgets(sp.sparsity)
        if list(final) != budgets:
            return (f'the schedule ends at {list(final)} active weights, the budgets of sparsity {sp.sparsity:g} '
                    f'are {budgets}')
        if any(not f <= i <= t.numel for t, i, f in zip(sp.targets, initial, final)):
            return (f'the schedule starts at {list(initial)} active weights, not between its end {list(final)} '
                    'and dense')
        if not self.global_:
            for t, c, i, f in zip(sp.targets, counts, initial, final):
                if not f <= c <= i:
                    return f'{t.name} holds {c} active weights, outside its pruning schedule [{f}, {i}]'
            return None
        slack = _count_slack(sp)
        total, lo, hi = sum(counts), sum(final), sum(initial)
        if not lo - slack <= total <= hi + slack:
            return f'the sparse tensors hold {total} active weights in all, outside the pruning schedule [{lo}, {hi}]'
        return None

    def extra_repr(self) -> str:
        return f'gmp_initial_sparsity={self.initial_sparsity}, gmp_global={self.global_}'


register_method('gmp', GMP, description='GMP: gradual magnitude pruning on the cubic schedule, no regrowth',
                distribution='uniform', update_interval=100, update_end=0.75, prune_rate=0.0,
                prune_rate_schedule='constant')
