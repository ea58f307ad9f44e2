"""Per-tensor densities with exact integer counts: ``uniform``, ``er`` (Erdős-Rényi) and ``erk`` (ER-Kernel)."""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ['DISTRIBUTIONS', 'layer_counts', 'round_exact']

DISTRIBUTIONS = ('erk', 'er', 'uniform')


def _raw_score(shape: Sequence[int], distribution: str) -> float:
    if distribution == 'erk':
        return sum(shape) / math.prod(shape)
    if distribution == 'er':
        n_out, n_in = shape[0], shape[1]
        return (n_in + n_out) / (n_in * n_out)
    return 1.0


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
        distribution: One of ``'erk'``, ``'er'``, ``'uniform'``.

    Returns:
        Active counts, one per tensor.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f'distribution={distribution!r} is not known; accepted: {", ".join(DISTRIBUTIONS)}')
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f'sparsity={sparsity!r} is outside [0, 1)')
    numels = [math.prod(s) for s in shapes]
    total_n = sum(numels)
    target = int(round((1.0 - sparsity) * total_n))
    raw = [_raw_score(s, distribution) for s in shapes]
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
