"""Seeds of timm-dst's own random streams, derived from the user's seed by a mixing function.

A user seeds torch's global generator with ``--seed S`` (or ``torch.manual_seed(S)``) and then builds the model: its
weights are drawn from that stream. A generator of ours seeded with the same integer ``S`` would replay the same
numbers, and a "random" mask taken as the top-k of ``torch.rand`` would keep exactly the largest initial weights of
the first layer drawn (all of them positive for ``nn.Linear``'s uniform init). Every generator of the package is
therefore seeded with :func:`derive_seed` of the user's seed and a name of its own: the same user seed still gives
the same streams (on every rank, after a resume), and no stream of ours starts where the user's does.
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ['derive_seed', 'derived_generator']

_DOMAIN = 'timm_dst'


def derive_seed(seed: int, *keys: str | int) -> int:
    """A 63-bit seed mixed from ``seed`` and ``keys`` (BLAKE2b of their text, domain-separated by ``'timm_dst'``).

    Args:
        seed: The user's seed (any Python int).
        keys: Names the stream apart from every other stream of the package (``'sparsifier', 0``, ``'split'``).

    Returns:
        An integer in ``[0, 2**63)``, a deterministic function of ``(seed, *keys)`` and never ``seed`` itself in
        practice; close seeds give unrelated streams.
    """
    text = '\x1f'.join([_DOMAIN, str(int(seed)), *(str(k) for k in keys)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & ((1 << 63) - 1)


def derived_generator(seed: int, *keys: str | int, device: torch.device | str = 'cpu') -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` ``(seed, *keys)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *keys))
    return g
