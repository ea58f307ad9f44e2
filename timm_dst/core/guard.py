"""The non-finite guard: which optimizer steps had NaN / inf gradients, and when training stops (invariant 7).

The controller asks :class:`NonFiniteGuard` once per step whether this step's gradients are finite (one agreed,
cached check) and tells it the answer of every checked step; the guard counts checked non-finite steps in a row and
raises :class:`NonFiniteGradientError` at ``max_nonfinite_steps``. Zeroing the masked weights again is the writer's
job; the guard only keeps the count.
"""
from __future__ import annotations

from collections.abc import Callable

__all__ = ['NonFiniteGradientError', 'NonFiniteGuard']


class NonFiniteGradientError(RuntimeError):
    """The gradients of the sparse weights stayed non-finite (NaN / inf) for ``max_nonfinite_steps`` checked optimizer
    steps in a row: training has diverged (raised from the optimizer's ``step``)."""


class NonFiniteGuard:
    """Counts checked optimizer steps whose gradients are non-finite.

    Attributes:
        limit: ``max_nonfinite_steps``: stop after this many checked non-finite steps in a row (None: never).
        streak: Checked steps with non-finite gradients in a row.
        at: The last step counted in the streak.
        cache: ``(step, finite)`` of the last check, valid within that step only.
    """

    def __init__(self, limit: int | None):
        self.limit = limit
        self.streak = 0
        self.at = -1
        self.cache: tuple[int, bool] | None = None

    def reset(self) -> None:
        """Forget the streak and the cached check (a restored state)."""
        self.cache = None
        self.streak, self.at = 0, -1

    def cached(self, step: int) -> tuple[int, bool] | None:
        """The check of ``step`` when one was made in it, else None."""
        return self.cache if self.cache is not None and self.cache[0] == step else None

    def step_finite(self, step: int, check: Callable[[], bool]) -> bool:
        """Whether ``step``'s gradients are finite: ``check()`` once per step, cached."""
        cached = self.cache
        if cached is None or cached[0] != step:
            cached = self.cache = (step, check())
        return cached[1]

    def note(self, step: int, finite: bool) -> bool:
        """Count a checked step; True when it was non-finite (the caller zeroes the masked weights again, then calls
        :meth:`raise_if_over`)."""
        if finite:
            self.streak = 0
            return False
        if self.at != step:
            self.at = step
            self.streak += 1
        return True

    def raise_if_over(self, step: int) -> None:
        """Raise :class:`NonFiniteGradientError` once the streak reaches the limit."""
        limit, n = self.limit, self.streak
        if limit is not None and n >= limit:
            raise NonFiniteGradientError(
                f'timm_dst: the gradients of the sparse weights were non-finite (NaN / inf) at {n} checked optimizer '
                f'step(s) in a row, the last at step {step}: training has diverged and stops here instead of '
                'training on NaN (lower the learning rate, clip gradients, or scale fp16 losses with a GradScaler; '
                f'the bound is max_nonfinite_steps={limit})')
