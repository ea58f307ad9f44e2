"""SET (Mocanu et al. 2018): drop the smallest-magnitude active weights, grow uniformly at random.

``set-itop`` is SET exploring for the whole run with the ITOP paper's settings (Table 4: ΔT 1500, P 0.5 cosine);
``grow_unexplored_first=True`` is SET+ (ITOP Appendix F).
"""
from __future__ import annotations

from ..core.method import SparseMethod
from ._registry import register_method

__all__ = ['SET']


class SET(SparseMethod):
    """Magnitude drop, random growth, the same count per tensor: exactly the base method's behaviour."""


register_method('set', SET, description='SET: magnitude drop, uniform random growth',
                update_interval=100, prune_rate=0.5, prune_rate_schedule='cosine')
register_method('set-itop', SET, description='SET exploring to the end with the ITOP settings (ΔT 1500, P 0.5)',
                update_interval=1500, prune_rate=0.5, prune_rate_schedule='cosine')
