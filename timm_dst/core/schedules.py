"""Prune-rate schedules and topology-update timing (ΔT, start, end, ΔT milestones)."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from ._validate import check_int

__all__ = ['PRUNE_RATE_SCHEDULES', 'prune_rate_at', 'resolve_step', 'UpdateSchedule']

PRUNE_RATE_SCHEDULES = ('cosine', 'constant', 'linear')


def prune_rate_at(step: int, initial: float, end_step: int, schedule: str = 'cosine', minimum: float = 0.0) -> float:
    """Fraction of each tensor's active weights replaced at ``step``.

    cosine: ``p_min + (P - p_min) * (1 + cos(pi * t / T_end)) / 2``; linear: from P to p_min over ``[0, T_end]``;
    constant: P.
    """
    if schedule not in PRUNE_RATE_SCHEDULES:
        raise ValueError(f'prune_rate_schedule={schedule!r} is not known; accepted: {", ".join(PRUNE_RATE_SCHEDULES)}')
    if schedule == 'constant' or end_step <= 0:
        return initial
    frac = min(max(step / end_step, 0.0), 1.0)
    if schedule == 'cosine':
        return minimum + (initial - minimum) * (1.0 + math.cos(math.pi * frac)) / 2.0
    return initial + (minimum - initial) * frac


def resolve_step(value: int | float | None, total_steps: int | None, arg: str) -> int | None:
    """An absolute step from an int (step) or a float in (0, 1] (fraction of ``total_steps``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f'{arg}={value!r} is not accepted: give an int (a step) or a float in [0, 1] (a fraction of '
                         'training)')
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f'{arg}={value!r}: a float is a fraction of training in [0, 1]; give an int for a step')
        if total_steps is None:
            raise ValueError(f'{arg}={value!r} is a fraction of training, so total_steps must be given')
        return int(round(value * total_steps))
    if value < 0:
        raise ValueError(f'{arg}={value!r} must be >= 0')
    return int(value)


class UpdateSchedule:
    """When topology updates happen: at ``start``, then every ``interval`` optimizer steps up to ``end`` (both
    included; with ``start`` 0 the first update is at step ``interval``).

    ``milestones`` change the interval from a given step on (DSR: 100, then 200 / 400 / 800 from epochs 25/80/140):
    a sequence of ``(from_step, interval)`` pairs. Updates are counted from the last milestone, so a new period
    starts cleanly where it begins. ``update_at_end`` adds one update at ``end`` when ``end`` is not on the grid
    (a pruning schedule that must reach its final sparsity exactly at ``end``).
    """

    def __init__(
            self,
            interval: int,
            start: int = 0,
            end: int | None = None,
            milestones: Sequence[tuple[int, int]] | None = None,
            update_at_end: bool = False,
    ):
        self.interval = check_int('update_interval', interval, minimum=1)
        self.start = int(start)
        self.end = end
        self.update_at_end = bool(update_at_end)
        bad = ValueError(f'update_milestones={milestones!r} is not accepted: give a list of (from_step, interval) '
                         'pairs of integers, from_step >= 0 and interval >= 1')
        if milestones is not None and (isinstance(milestones, str) or not isinstance(milestones, Sequence)):
            raise bad
        pairs = []
        for pair in milestones or []:
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise bad
            try:
                pairs.append((check_int('update_milestones', pair[0], 0), check_int('update_milestones', pair[1], 1)))
            except ValueError:
                raise bad from None
        self.milestones = sorted(pairs)

    def _period(self, step: int) -> tuple[int, int]:
        origin, interval = self.start, self.interval
        for s, i in self.milestones:
            if step >= s:
                origin, interval = max(s, self.start), i
        return origin, interval

    def is_update_step(self, step: int) -> bool:
        """True when the optimizer step numbered ``step`` (1-based) is followed by a topology update.

        The first update is at ``start`` itself (at ``interval`` when ``start`` is 0: step 0 is never taken), then
        every ``interval`` steps; a milestone ``(from_step, interval)`` updates at ``from_step`` itself, then every
        ``interval`` steps from there. No update after ``end``.
        """
        if step < max(self.start, 1) or (self.end is not None and step > self.end):
            return False
        if self.update_at_end and step == self.end:
            return True
        origin, interval = self._period(step)
        return (step - origin) % interval == 0 and step > 0
