"""``dense`` (no masks at all: the baseline) and ``static`` (a fixed random sparse topology)."""
from __future__ import annotations

from ..core.method import SparseMethod
from ._registry import register_method

__all__ = ['Dense', 'Static']


class Dense(SparseMethod):
    """No-op: nothing is masked. Reports density 1 and R_s 1, so dense baselines share the same reports."""

    attaches = False
    explores = False


class Static(SparseMethod):
    """Static sparse training: the initial topology never changes (R_s stays at the density)."""

    explores = False


register_method('dense', Dense, description='dense baseline: no masks (density and R_s 1)',
                prune_rate_schedule='constant')
register_method('static', Static, description='static sparse training: a fixed random topology',
                prune_rate_schedule='constant')
