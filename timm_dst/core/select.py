"""Selection: which active weights an update drops and which inactive positions it grows, per tensor.

A selector is chosen once per sparse tensor, from its layout (docs/structured.md): :class:`ElementSelector` (single
weights: unstructured, or a tensor the structure does not fit), :class:`GroupSelector` (constant fan-in: the same
count in every row), :class:`NMSelector` (N:M: at most N in every M consecutive inputs) or :class:`BlockSelector`
(whole R x C blocks). A plan, chosen once per controller, runs one update over all tensors: :class:`ElementPlan`
without a structure, :class:`StructuredPlan` with one (counts rounded to whole units across tensors, then each
tensor's selector). Selectors and plans read the controller (targets, counts, explored masks, the method's scores,
the generator) and return flat index sets; they write nothing but the transient masks they build.

This module imports the structure helpers and the FSDP2 gather (``full``); never the controller.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..distributed.fsdp import flat_fill_, full
from .structure import Layout, check_mask, per_group_topk, quantize_counts, topk_mask

__all__ = ['topk_indices', 'sample_free', 'drop_lowest', 'grow_highest', 'make_selector', 'ElementSelector',
           'GroupSelector', 'NMSelector', 'BlockSelector', 'ElementPlan', 'StructuredPlan', 'Selector']

_PREFILTER_MIN = 1 << 18  # tensors smaller than this use a plain topk


def topk_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of a 1-D ``score``: an exact top-k, faster than ``torch.topk`` on large
    tensors with small ``k``.

    A threshold is read off a strided sample so that about ``2k`` entries pass it; ``topk`` then runs on those
    candidates only. Every entry of the true top-k passes a threshold that at least ``k`` entries pass, so the result is
    exact; when fewer than ``k`` pass, it falls back to a full ``topk``.
    """
    n = score.numel()
    if n < _PREFILTER_MIN or 8 * k > n:
        return torch.topk(score, k, sorted=False).indices
    sample = score[:: max(1, n // 16384)]
    rank = max(1, min(sample.numel(), int(sample.numel() * (1.0 - 2.0 * k / n))))
    threshold = torch.kthvalue(sample, rank).values
    candidates = (score >= threshold).nonzero().squeeze(1)
    if candidates.numel() < k:
        return torch.topk(score, k, sorted=False).indices
    return candidates[torch.topk(score[candidates], k, sorted=False).indices]


def _empty(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device=device)


def sample_free(blocked: torch.Tensor, k: int, n_free: int, gen: Any) -> torch.Tensor:
    """``k`` distinct flat positions drawn uniformly at random where ``blocked`` is False (exact, seeded by ``gen``,
    a callable giving the generator of a device)."""
    device = blocked.device
    if k <= 0:
        return _empty(device)
    gen, n = gen(device), blocked.numel()
    if n < 4096 or 4 * k > n_free:  # rejection sampling would draw too often: score the free positions
        free = (~blocked).nonzero().squeeze(1)
        return free[topk_indices(torch.rand(free.numel(), generator=gen, device=device), k)]
    picked = torch.empty(0, dtype=torch.long, device=device)
    while picked.numel() < k:
        # draw with replacement, reject blocked positions, keep the distinct ones
        m = int((k - picked.numel()) * n / n_free * 1.3) + 64
        draws = torch.randint(n, (m,), generator=gen, device=device)
        picked = torch.unique(torch.cat([picked, draws[~blocked[draws]]]))
    # every free position is equally likely to be among the distinct draws, so a uniform k-subset of them is a
    # uniform k-subset of the free positions
    if picked.numel() > k:
        picked = picked[torch.randperm(picked.numel(), generator=gen, device=device)[:k]]
    return picked


def _tiered(score: torch.Tensor, blocked: torch.Tensor, avoid: torch.Tensor | None,
            explored: torch.Tensor | None) -> torch.Tensor:
    """Grow scores with ``-inf`` where ``blocked``; never-explored positions first (SET+, ``explored`` given),
    positions in ``avoid`` (just dropped, for methods that bar them) last."""
    score = score.float()
    if avoid is not None or explored is not None:
        finite = score.masked_fill(blocked, 0.0)
        span = finite.max() - finite.min() + 1.0
        if explored is not None:
            score = torch.where(explored, score, score + span)
        if avoid is not None:
            score = torch.where(avoid, score - 2.0 * span, score)
    return score.masked_fill(blocked, -math.inf)


def drop_lowest(sp: Any, i: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the ``k`` lowest-scoring active weights of tensor ``i``, and the mask left after dropping."""
    mask = sp.targets[i].mask
    kept = mask.clone()
    if k <= 0:
        return _empty(kept.device), kept
    # sharded (FSDP2): this tensor's mask and scores are gathered, every rank computes the same drop
    active = full(mask).reshape(-1).nonzero().squeeze(1)  # drop candidates: active weights only
    score = full(sp.method.drop_score(sp, i)).reshape(-1)[active].float()
    drop = active[topk_indices(score.neg_(), k)]
    flat_fill_(kept, drop, False)
    return drop, kept


def grow_highest(sp: Any, i: int, k: int, kept: torch.Tensor, n_kept: int) -> torch.Tensor:
    """Flat indices of ``k`` positions of tensor ``i`` to grow, all inactive after the drop (``n_kept`` active)."""
    t = sp.targets[i]
    if k <= 0:
        return _empty(kept.device)
    excl_dropped = sp.method.grow_excludes_dropped
    kept = full(kept)  # sharded (FSDP2): gathered for this tensor only, the same on every rank
    blocked = (kept | full(t.mask)) if excl_dropped else kept
    n_blocked = sp.counts[i] if excl_dropped else n_kept
    score = sp.method.grow_score(sp, i)
    if score is None:
        if not sp.grow_unexplored_first:
            return sample_free(blocked.reshape(-1), k, t.numel - n_blocked, sp.generator)
        # SET+: never-activated positions first, then the explored ones
        fresh_blocked = (blocked | full(sp.explored[i])).reshape(-1)
        n_fresh = fresh_blocked.numel() - int(torch.count_nonzero(fresh_blocked))
        first = sample_free(fresh_blocked, min(k, n_fresh), n_fresh, sp.generator)
        if first.numel() == k:
            return first
        rest_blocked = blocked.reshape(-1).clone()
        rest_blocked[first] = True
        rest = sample_free(rest_blocked, k - first.numel(), t.numel - n_blocked - first.numel(), sp.generator)
        return torch.cat([first, rest])
    score = full(score).float()
    if sp.grow_unexplored_first:
        finite = score.masked_fill(blocked, 0.0)
        offset = finite.max() - finite.min() + 1.0
        score = torch.where(full(sp.explored[i]), score, score + offset)
    score = score.masked_fill(blocked, -math.inf)
    return topk_indices(score.reshape(-1), k)


class ElementSelector:
    """Single weights: an unstructured tensor (or one the structure does not fit)."""

    layout: Layout | None = None
    nm = False  # an N:M tensor (its density is fixed)

    def __init__(self, i: int, numel: int):
        self.i, self.quantum, self.cap = i, 1, numel

    @property
    def spec(self) -> str | None:
        """The structure this tensor keeps (None: unstructured)."""
        return self.layout.spec if self.layout is not None else None

    def topk_mask(self, score: torch.Tensor, count: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A mask of ``count`` active weights at the highest ``score``, in whole units."""
        mask = torch.zeros(math.prod(shape), dtype=torch.bool, device=score.device)
        mask[torch.topk(score.detach().flatten(), count, sorted=False).indices] = True
        return mask.view(shape)

    def check(self, mask: torch.Tensor) -> str | None:
        """Why ``mask`` breaks this tensor's structure (None when it keeps it)."""
        return None

    def drop(self, sp: Any, k: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A structured update's drop of about ``k`` elements: (flat indices dropped, mask left)."""
        return drop_lowest(sp, self.i, min(int(k), sp.counts[self.i]))

    def limits(self, count: int, n_kept: int, dropped: int, keeps_total: bool, grows: bool,
               excludes_dropped: bool) -> tuple[int, int]:
        """(low, high) of this tensor's new count in a structured update."""
        room = self.cap - (dropped if excludes_dropped else 0)
        return n_kept, (max(room, n_kept) if grows else n_kept)

    def grow(self, sp: Any, new: int, n_kept: int, kept: torch.Tensor, drop: torch.Tensor,
             grows: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A structured update's (drop, grow) index sets bringing the tensor from ``n_kept`` to ``new`` active."""
        return drop, grow_highest(sp, self.i, new - n_kept, kept, n_kept)


class _LayoutSelector(ElementSelector):
    """A tensor that fits the structure: counts in whole units of its layout."""

    def __init__(self, i: int, layout: Layout):
        self.i, self.layout, self.quantum, self.cap = i, layout, layout.quantum, layout.cap

    def topk_mask(self, score: torch.Tensor, count: int, shape: tuple[int, ...]) -> torch.Tensor:
        return topk_mask(self.layout, score, count)

    def check(self, mask: torch.Tensor) -> str | None:
        return check_mask(self.layout, mask)


class BlockSelector(_LayoutSelector):
    """Whole R x C blocks, by summed score."""

    def drop(self, sp: Any, k: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``round(k / (R C))`` active blocks with the lowest summed drop score, as flat element indices, and the
        mask left after dropping them."""
        t, layout, i = sp.targets[self.i], self.layout, self.i
        k = int(math.floor(k / layout.unit_size + 0.5))
        kept = t.mask.clone()
        active = layout.pool_any(t.mask).reshape(-1).nonzero().squeeze(1)
        k = min(k, active.numel())
        if k <= 0:
            return _empty(kept.device), kept
        score = layout.pool(sp.method.drop_score(sp, i).float()).reshape(-1)[active]
        units = torch.zeros(layout.pool_any(t.mask).numel(), dtype=torch.bool, device=kept.device)
        units[active[topk_indices(score.neg_(), k)]] = True
        drop = layout.expand(units.view(layout.out // layout.structure.rows, -1)).reshape(-1).nonzero().squeeze(1)
        flat_fill_(kept, drop, False)
        return drop, kept

    def limits(self, count: int, n_kept: int, dropped: int, keeps_total: bool, grows: bool,
               excludes_dropped: bool) -> tuple[int, int]:
        return n_kept, (max(self.cap, n_kept) if grows else n_kept)

    def grow(self, sp: Any, new: int, n_kept: int, kept: torch.Tensor, drop: torch.Tensor,
             grows: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Grow the ``(new - n_kept) / (R C)`` inactive blocks of highest summed grow score, or uniformly at random
        when the method's grow score is None."""
        t, layout, i = sp.targets[self.i], self.layout, self.i
        k = (new - n_kept) // layout.unit_size
        if k <= 0:
            return drop, _empty(kept.device)
        kept_u = layout.pool_any(kept).reshape(-1)
        score = sp.method.grow_score(sp, i)
        if score is None:
            score_u = torch.rand(kept_u.numel(), generator=sp.generator(kept.device), device=kept.device)
        else:
            score_u = layout.pool(score.float()).reshape(-1)
        avoid = (layout.pool_any(t.mask).reshape(-1) & ~kept_u) if sp.method.grow_excludes_dropped else None
        explored = layout.pool_any(sp.explored[i]).reshape(-1) if sp.grow_unexplored_first else None
        score_u = _tiered(score_u, kept_u, avoid, explored)
        units = torch.zeros_like(kept_u)
        units[topk_indices(score_u, k)] = True
        return drop, layout.expand(units.view(layout.out // layout.structure.rows, -1)).reshape(-1).nonzero().squeeze(1)


class GroupSelector(_LayoutSelector):
    """The same number of active weights in every group (constant fan-in: a row per output neuron)."""

    def drop(self, sp: Any, k: float) -> tuple[torch.Tensor, torch.Tensor]:
        return drop_lowest(sp, self.i, min(int(k), sp.counts[self.i]))

    def limits(self, count: int, n_kept: int, dropped: int, keeps_total: bool, grows: bool,
               excludes_dropped: bool) -> tuple[int, int]:
        return 0, (max(self.cap, count) if grows else count)  # groups may shrink below what they kept

    def grow(self, sp: Any, new: int, n_kept: int, kept: torch.Tensor, drop: torch.Tensor,
             grows: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring every group to ``new / groups`` active weights: grow the highest-scoring inactive ones where a group
        is below (``grows``: the method grows here), else keep each group's highest-scoring active weights of the old
        mask. Returns the drop and grow index sets."""
        t, layout, i = sp.targets[self.i], self.layout, self.i
        per_group = new // layout.n_groups
        device = kept.device
        kept_g = layout.to_groups(kept).sum(dim=1)
        empty = _empty(device)
        if grows and per_group >= int(kept_g.max()):
            score = sp.method.grow_score(sp, i)
            if score is None:
                score = torch.rand(t.shape, generator=sp.generator(device), device=device)
            avoid = (t.mask & ~kept) if sp.method.grow_excludes_dropped else None
            explored = sp.explored[i] if sp.grow_unexplored_first else None
            score = _tiered(score, kept, avoid, explored)
            picked = per_group_topk(layout.to_groups(score), per_group - kept_g)
            return drop, layout.from_groups(picked).reshape(-1).nonzero().squeeze(1)
        if per_group >= int(layout.to_groups(t.mask).sum(dim=1).max()):
            return empty, empty  # nothing to prune to, nothing to grow: the update leaves this tensor as it was
        score = sp.method.drop_score(sp, i).float().masked_fill(~t.mask, -math.inf)
        keep = per_group_topk(layout.to_groups(score), torch.full_like(kept_g, per_group))
        return (t.mask & ~layout.from_groups(keep)).reshape(-1).nonzero().squeeze(1), empty


class NMSelector(GroupSelector):
    """N:M: at most N active in every M consecutive inputs; the density is fixed, so no budget moves in or out."""

    nm = True

    def limits(self, count: int, n_kept: int, dropped: int, keeps_total: bool, grows: bool,
               excludes_dropped: bool) -> tuple[int, int]:
        # pruning (GMP) never goes below N per group
        return (count if keeps_total else min(self.cap, count)), count


Selector = ElementSelector  # the interface every selector has


def make_selector(i: int, layout: Layout | None, numel: int) -> ElementSelector:
    """The selector of tensor ``i``, chosen once from its layout (None: unstructured)."""
    if layout is None:
        return ElementSelector(i, numel)
    if layout.kind == 'block':
        return BlockSelector(i, layout)
    if layout.kind == 'n:m':
        return NMSelector(i, layout)
    return GroupSelector(i, layout)


class ElementPlan:
    """One unstructured update: each tensor drops its ``k`` lowest and grows the method's count at its highest."""

    def topology(self, sp: Any, n_drop: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The drop and grow index sets of one update."""
        drops, kept = zip(*[drop_lowest(sp, i, k) for i, k in enumerate(n_drop)]) if n_drop else ((), ())
        n_grow = sp.method.grow_counts(sp, list(n_drop), list(kept))
        grows = [grow_highest(sp, i, k, kept[i], sp.counts[i] - d) for i, (k, d) in enumerate(zip(n_grow, n_drop))]
        return list(drops), grows


class StructuredPlan:
    """One update that keeps every tensor's structure (docs/structured.md).

    The method's element counts are taken in whole units: blocks drop the ``round(k / (R C))`` active blocks of
    lowest summed drop score; grouped structures (N:M, fan-in) drop the ``k`` lowest-scoring active weights of the
    tensor. The method's grow counts (given the element counts actually dropped) set each tensor's new count, rounded
    to whole units with the total kept where the units allow (else every tensor keeps its count). Blocks then grow the
    inactive blocks of highest summed grow score; each group grows back to the tensor's new per-group count at its
    highest-scoring inactive weights (uniformly at random where the method's grow score is None); a group above that
    count (a pruning method, or budget moved away) keeps its highest-scoring active weights instead and grows nothing.
    """

    def topology(self, sp: Any, n_drop: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The drop and grow index sets of one update."""
        selectors = sp._selectors
        drops, kept = [], []
        for sel, k in zip(selectors, n_drop):
            d, kp = sel.drop(sp, k)
            drops.append(d)
            kept.append(kp)
        dropped = [int(d.numel()) for d in drops]
        n_grow = [int(g) for g in sp.method.grow_counts(sp, dropped, kept)]
        n_kept = [c - d for c, d in zip(sp.counts, dropped)]
        new = self._counts(sp, selectors, dropped, n_grow, n_kept)
        grows = []
        for i, sel in enumerate(selectors):
            drops[i], grow = sel.grow(sp, new[i], n_kept[i], kept[i], drops[i], n_grow[i] > 0)
            grows.append(grow)
        return drops, grows

    @staticmethod
    def _counts(sp: Any, selectors: list[ElementSelector], dropped: list[int], n_grow: list[int],
                n_kept: list[int]) -> list[int]:
        """Each tensor's new count in whole units."""
        desired = [kp + g for kp, g in zip(n_kept, n_grow)]
        # a method that keeps the total (all but pruning ones) may have its moves rounded across tensors, aiming at
        # the run's budget so that rounding never drifts; a pruning update rounds each tensor on its own
        keeps_total = sum(desired) == sum(sp.counts)
        excludes = sp.method.grow_excludes_dropped
        quanta, low, high = [], [], []
        for i, sel in enumerate(selectors):
            quanta.append(sel.quantum)
            grows = keeps_total or n_grow[i] > 0  # nothing regrows where a pruning method grows nothing
            lo, hi = sel.limits(sp.counts[i], n_kept[i], dropped[i], keeps_total, grows, excludes)
            low.append(lo)
            high.append(hi)
        # pruning rounds each tensor on its own, except that N:M tensors above N per group share the pruning (a
        # global ranking may want some of them below N, others above)
        nm = any(sel.nm for sel in selectors)
        total = sp._budget_total if keeps_total else (sum(desired) if nm else None)
        new, _ = quantize_counts(desired, quanta, low, high, total)
        return new
