"""How the launcher speaks: its one-line failures (exit status 2), its log lines in train.py's logger, and which
process it is."""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import torch.distributed as dist

__all__ = ['PROG', 'LaunchError', 'logger', 'fail', 'log', 'rank', 'is_primary', 'world_size']

PROG = 'timm-dst-run'
logger = logging.getLogger('train')  # timm's train.py logger: the launcher's lines read like its own


class LaunchError(Exception):
    """A problem with the arguments or the script: reported in one line, exit status 2."""


def fail(msg: str) -> NoReturn:
    """Print ``timm-dst-run: error: MSG`` (one line) and exit with status 2."""
    print(f'{PROG}: error: {msg}', file=sys.stderr, flush=True)
    raise SystemExit(2)


def rank() -> int:
    """This process's rank (from the environment once train.py has destroyed its process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get('RANK', 0))


def is_primary() -> bool:
    """Whether this process reports (rank 0)."""
    return rank() == 0


def world_size() -> int:
    """The number of processes of the run (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def log(msg: str) -> None:
    """A line of train.py's log, on the primary process."""
    if is_primary():
        logger.info(msg)
