"""Prune-rate schedules (a registry: ``cosine``, ``constant`` and ``linear`` built in, more through
:func:`register_prune_rate_schedule` or an entry point of the group ``timm_dst.prune_rate_schedules``) and
topology-update timing (ΔT, start, end, ΔT milestones)."""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._validate import check_int
from .registry import Registry

__all__ = ['PRUNE_RATE_SCHEDULES', 'PRUNE_RATE_SCHEDULE_ENTRY_POINT_GROUP', 'PruneRateSchedule',
           'register_prune_rate_schedule', 'get_prune_rate_schedule', 'schedule_decays', 'prune_rate_at',
           'resolve_step', 'UpdateSchedule']

PRUNE_RATE_SCHEDULE_ENTRY_POINT_GROUP = 'timm_dst.prune_rate_schedules'


@dataclass(frozen=True)
class PruneRateSchedule:
    """A registered prune-rate schedule.

    Attributes:
        name: The name (``prune_rate_schedule=`` value, ``--prune-rate-schedule`` choice).
        rate: ``rate(fraction, initial, minimum) -> float``: the prune rate at ``fraction`` in [0, 1] of the span
            from step 0 to the schedule's end (``update_end``, else ``total_steps``), from the initial rate P and the
            final rate ``prune_rate_min``.
        decays: The rate changes over training, so the controller needs the span's end (``total_steps`` or
            ``update_end``); False: ``rate`` is never called and the rate stays P.
        description: One line for listings.
    """

    name: str
    rate: Callable[[float, float, float], float]
    decays: bool = True
    description: str = ''


_registry: Registry[PruneRateSchedule] = Registry('prune_rate_schedule', PRUNE_RATE_SCHEDULE_ENTRY_POINT_GROUP)
#: The registered names (a live view: later registrations and plugins are in it).
PRUNE_RATE_SCHEDULES = _registry.view()


def register_prune_rate_schedule(name: str, rate: Callable[[float, float, float], float], *, decays: bool = True,
                                 description: str = '') -> PruneRateSchedule:
    """Register a prune-rate schedule.

    Args:
        name: Its name: lower-case letters, digits, ``-``, ``_``, ``.``.
        rate: ``rate(fraction, initial, minimum) -> float``, the prune rate at ``fraction`` (in [0, 1]) of the span
            to the schedule's end, given the initial rate P and ``prune_rate_min``.
        decays: The rate changes over training (the controller then needs ``total_steps`` or ``update_end``).
        description: One line for listings.

    Returns:
        The registry entry.

    Raises:
        ValueError: When ``name`` is malformed or taken, or ``rate`` is not callable.
    """
    if not callable(rate):
        raise ValueError(f'prune_rate_schedule {name!r}: rate={rate!r} is not callable')
    return _registry.register(name, PruneRateSchedule(name, rate, bool(decays), description))


def get_prune_rate_schedule(name: str) -> PruneRateSchedule:
    """The entry of a registered prune-rate schedule.

    Raises:
        ValueError: ``prune_rate_schedule=<name> is not known; accepted: ...``.
    """
    return _registry.get(name)


def schedule_decays(name: str) -> bool:
    """Whether the prune-rate schedule ``name`` changes the rate over training (and so needs the span's end)."""
    return get_prune_rate_schedule(name).decays


def _cosine(frac: float, initial: float, minimum: float) -> float:
    return minimum + (initial - minimum) * (1.0 + math.cos(math.pi * frac)) / 2.0


def _linear(frac: float, initial: float, minimum: float) -> float:
    return initial + (minimum - initial) * frac


def _constant(frac: float, initial: float, minimum: float) -> float:
    return initial


register_prune_rate_schedule('cosine', _cosine, description='cosine decay from P to prune_rate_min (RigL)')
register_prune_rate_schedule('constant', _constant, decays=False, description='P throughout')
register_prune_rate_schedule('linear', _linear, description='linear decay from P to prune_rate_min')


def prune_rate_at(step: int, initial: float, end_step: int, schedule: str = 'cosine', minimum: float = 0.0) -> float:
    """Fraction of each tensor's active weights replaced at ``step``.

    cosine: ``p_min + (P - p_min) * (1 + cos(pi * t / T_end)) / 2``; linear: from P to p_min over ``[0, T_end]``;
    constant: P; a registered schedule: its ``rate(min(t / T_end, 1), P, p_min)``.
    """
    entry = get_prune_rate_schedule(schedule)
    if not entry.decays or end_step <= 0:
        return initial
    frac = min(max(step / end_step, 0.0), 1.0)
    return entry.rate(frac, initial, minimum)


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
