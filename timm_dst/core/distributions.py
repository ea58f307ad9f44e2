"""Per-tensor densities with exact integer counts, from a registry of distributions: ``erk`` (ER-Kernel), ``er``
(Erdős-Rényi) and ``uniform`` are built in; :func:`register_distribution` (or an entry point of the group
``timm_dst.distributions``) adds one.

A distribution is a score per tensor shape: each tensor's density is proportional to its score (the same constant
for all tensors, solved so that the total is exact; a tensor whose density would exceed 1 is made dense and the
constant solved again). Uniform scores every tensor 1, ER ``(n_in + n_out) / (n_in * n_out)``, ERK the sum of the
dimensions over their product.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .registry import Registry

__all__ = ['DISTRIBUTIONS', 'DISTRIBUTION_ENTRY_POINT_GROUP', 'Distribution', 'register_distribution',
           'get_distribution', 'layer_counts', 'round_exact']

DISTRIBUTION_ENTRY_POINT_GROUP = 'timm_dst.distributions'


@dataclass(frozen=True)
class Distribution:
    """A registered distribution.

    Attributes:
        name: The name (``distribution=`` value, ``--distribution`` choice).
        score: ``score(shape) -> float``: the tensor's density is proportional to it (>= 0).
        description: One line for listings.
    """

    name: str
    score: Callable[[Sequence[int]], float]
    description: str = ''


_registry: Registry[Distribution] = Registry('distribution', DISTRIBUTION_ENTRY_POINT_GROUP)
#: The registered names (a live view: later registrations and plugins are in it).
DISTRIBUTIONS = _registry.view()


def register_distribution(name: str, score: Callable[[Sequence[int]], float], *, description: str = '') -> Distribution:
    """Register a per-tensor density distribution.

    Args:
        name: Its name: lower-case letters, digits, ``-``, ``_``, ``.``.
        score: ``score(shape) -> float``, the tensor's relative density (>= 0); the densities are the scores times one
            constant chosen so that the active weights total exactly ``(1 - sparsity) * N`` (capped at 1 per tensor).
        description: One line for listings.

    Returns:
        The registry entry.

    Raises:
        ValueError: When ``name`` is malformed or taken, or ``score`` is not callable.
    """
    if not callable(score):
        raise ValueError(f'distribution {name!r}: score={score!r} is not callable')
    return _registry.register(name, Distribution(name, score, description))


def get_distribution(name: str) -> Distribution:
    """The entry of a registered distribution.

    Raises:
        ValueError: ``distribution=<name> is not known; accepted: ...``.
    """
    return _registry.get(name)


def _erk(shape: Sequence[int]) -> float:
    return sum(shape) / math.prod(shape)


def _er(shape: Sequence[int]) -> float:
    n_out, n_in = shape[0], shape[1]
    return (n_in + n_out) / (n_in * n_out)


def _uniform(shape: Sequence[int]) -> float:
    return 1.0


register_distribution('erk', _erk, description='Erdős-Rényi-Kernel: density proportional to sum(shape) / numel')
register_distribution('er', _er, description='Erdős-Rényi: density proportional to (n_in + n_out) / (n_in * n_out)')
register_distribution('uniform', _uniform, description='the same density for every tensor')


def round_exact(values: Sequence[float], total: int, capacity: Sequence[int]) -> list[int]:
    """Round non-negative reals to integers that sum to ``total`` exactly, each within ``[0, capacity]``.

    Largest-remainder rounding; whatever a capped entry cannot take goes to the others, by their share.

    Args:
        values: Desired (real) amounts, one per entry.
        total: Exact integer sum wanted; must not exceed ``sum(capacity)``.
        capacity: Upper bound per entry.

    Returns:
        Integer amounts.
    """
    n = len(values)
    if total > sum(capacity):
        raise ValueError(f'cannot place {total} items in capacity {sum(capacity)}')
    counts = [0] * n
    open_idx = [i for i in range(n) if capacity[i] > 0]
    remaining = total
    weights = [max(float(v), 0.0) for v in values]
    while remaining > 0 and open_idx:
        w_sum = sum(weights[i] for i in open_idx)
        share = {i: (weights[i] / w_sum if w_sum > 0 else 1.0 / len(open_idx)) * remaining for i in open_idx}
        floor = {i: min(int(math.floor(share[i])), capacity[i] - counts[i]) for i in open_idx}
        for i in open_idx:
            counts[i] += floor[i]
        remaining -= sum(floor.values())
        # hand out what rounding left, largest remainder first, one each
        if remaining > 0:
            order = sorted(open_idx, key=lambda i: (share[i] - floor[i], -i), reverse=True)
            for i in order:
                if remaining == 0:
                    break
                if counts[i] < capacity[i] and share[i] - floor[i] > 0:
                    counts[i] += 1
                    remaining -= 1
        new_open = [i for i in open_idx if counts[i] < capacity[i]]
        if new_open == open_idx and remaining > 0 and all(share[i] - floor[i] <= 0 for i in open_idx):
            # all shares were integers yet some are left (can only happen with zero weights): spread evenly
            for i in new_open:
                if remaining == 0:
                    break
                counts[i] += 1
                remaining -= 1
        open_idx = [i for i in open_idx if counts[i] < capacity[i]]
    return counts


def layer_counts(shapes: Sequence[Sequence[int]], sparsity: float, distribution: str = 'erk') -> list[int]:
    """Active-weight count per tensor so that the total is exactly ``round((1 - sparsity) * N)``.

    ER / ERK: density_l = eps * raw_l with eps solved for the total; while some density would exceed 1, the tensors
    with the largest raw score are made dense and eps is solved again.

    Args:
        shapes: Shapes of the sparse tensors.
        sparsity: Global target sparsity in [0, 1).
        distribution: A registered distribution (``'erk'``, ``'er'``, ``'uniform'``, ...).

    Returns:
        Active counts, one per tensor.
    """
    score = get_distribution(distribution).score
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f'sparsity={sparsity!r} is outside [0, 1)')
    numels = [math.prod(s) for s in shapes]
    total_n = sum(numels)
    target = int(round((1.0 - sparsity) * total_n))
    raw = [float(score(s)) for s in shapes]
    dense: set[int] = set()
    while True:
        budget = target - sum(numels[i] for i in dense)
        denom = sum(raw[i] * numels[i] for i in range(len(shapes)) if i not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = [i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            break
        top = max(raw[i] for i in over)
        dense.update(i for i in over if raw[i] == top)
    desired = [float(numels[i]) if i in dense else eps * raw[i] * numels[i] for i in range(len(shapes))]
    counts = round_exact(desired, target, numels)
    # keep at least one active weight per tensor where the total allows it (a fully empty layer kills the signal)
    for i, c in enumerate(counts):
        if c == 0 and target >= len(shapes):
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] = 1
    return counts
