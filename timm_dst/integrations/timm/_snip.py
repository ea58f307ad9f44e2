"""Data-scored methods (SNIP) through the launcher: the batches come from train.py's own training loader.

:func:`wrap_create_loader` records the first training loader train.py builds with ``timm.data.create_loader`` (its
transforms, batch size, sampler and collate: train.py's own preprocessing). When the sparsifier attaches,
:func:`init_data` draws the first ``--snip-num-batches`` batches (default 1) from a separate iterator of that loader,
with every random state the draw could touch saved before and restored after (Python, NumPy, torch CPU and CUDA, the
loader's and its sampler's generators) and the loader's own iterators put back, so train.py's first epoch sees the
same batches in the same order with the same augmentation as a run without SNIP (``tests/test_launcher_methods.py``).
"""
from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ...methods._registry import get_method_info
from ._report import fail, log

__all__ = ['wrap_create_loader', 'init_data', 'draw_batches']


def wrap_create_loader(launcher: Any, orig: Callable) -> Callable:
    """``timm.data.create_loader`` that keeps the first training loader (``is_training=True``) on the launcher, as
    ``launcher.train_loader``."""
    try:
        signature = inspect.signature(orig)
    except (TypeError, ValueError):
        signature = None

    def create_loader(*args: Any, **kwargs: Any) -> Any:
        loader = orig(*args, **kwargs)
        training = kwargs.get('is_training', False)
        if signature is not None:
            with contextlib.suppress(TypeError):
                training = signature.bind_partial(*args, **kwargs).arguments.get('is_training', False)
        if training and getattr(launcher, 'train_loader', None) is None:
            launcher.train_loader = loader
        return loader
    create_loader.__wrapped__ = orig  # type: ignore[attr-defined]
    return create_loader


def _generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a draw from ``loader`` (a DataLoader, or timm's PrefetchLoader around one) may advance."""
    base = getattr(loader, 'loader', loader)
    found: list[torch.Generator] = []
    for owner in (base, getattr(base, 'sampler', None), getattr(base, 'batch_sampler', None),
                  getattr(getattr(base, 'batch_sampler', None), 'sampler', None)):
        g = getattr(owner, 'generator', None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


@contextlib.contextmanager
def _kept_random_states(loader: Any) -> Iterator[None]:
    """Every random state a draw from ``loader`` may touch, and the loader's own iterators, as they were."""
    base = getattr(loader, 'loader', loader)
    gens = _generators(loader)
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(), [g.get_state() for g in gens])
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    iterators = {name: getattr(base, name) for name in ('_iterator', 'iterator') if hasattr(base, name)}
    try:
        yield
    finally:
        for name, value in iterators.items():  # persistent workers / MultiEpochsDataLoader: train.py starts afresh
            if getattr(base, name) is not value:
                _shutdown(getattr(base, name))
                object.__setattr__(base, name, value)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        for g, s in zip(gens, states[3]):
            g.set_state(s)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _shutdown(it: Any) -> None:
    stop = getattr(it, '_shutdown_workers', None)
    if callable(stop):
        stop()


def draw_batches(loader: Any, num_batches: int) -> list[tuple[Any, Any]]:
    """The first ``num_batches`` ``(input, target)`` batches of a fresh pass over ``loader``, leaving the run's random
    states and the loader's iterators as they were (fewer when the loader is shorter)."""
    batches: list[tuple[Any, Any]] = []
    with _kept_random_states(loader):
        it = iter(loader)
        try:
            for batch in it:
                batches.append((batch[0], batch[1]))
                if len(batches) >= num_batches:
                    break
        finally:
            if hasattr(it, 'close'):
                it.close()  # a generator (PrefetchLoader, MultiEpochsDataLoader): its own cleanup runs now
            _shutdown(getattr(it, '_iterator', it))
            del it
    return batches


def _synthetic_batch(launcher: Any, model: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One zero batch of train.py's input size: scores that a resumed DST state replaces (a train.py that builds its
    loader after the sparsifier attaches, e.g. timm 1.0.9, resuming)."""
    from timm.data import resolve_data_config
    args = launcher.train_args
    size = resolve_data_config(vars(args) if args is not None else {}, model=model)['input_size']
    device = next(model.parameters()).device
    return [(torch.zeros(2, *size, device=device), torch.zeros(2, dtype=torch.long, device=device))]


def init_data(launcher: Any, kwargs: dict[str, Any], model: Any, resume_path: str | None = None) -> dict[str, Any]:
    """The keyword of a data-scored method (its ``init_data_arg``, SNIP's ``snip_batches``) when the user gave no
    batches: the first batches of train.py's training loader (``{}`` for other methods or given batches).

    Args:
        launcher: The launcher (its DST flags, train.py's arguments, the captured ``train_loader``).
        kwargs: The sparsifier keywords of the DST flags (:func:`~timm_dst.integrations.timm.sparsifier_kwargs`).
        model: The student model.
        resume_path: The ``--resume`` checkpoint, if any.
    """
    dst = launcher.dst_args.dst
    arg = get_method_info(dst).init_data_arg
    if arg is None or kwargs.get(arg) is not None:
        return {}
    flag = '--' + arg.replace('_', '-')
    count_arg = arg.replace('batches', 'num_batches')  # SNIP's snip_num_batches
    n = int(kwargs.get(count_arg) or 1)
    loader = getattr(launcher, 'train_loader', None)
    if loader is None:
        if resume_path:
            from .checkpoint import read_dst_state
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                if read_dst_state(resume_path) is not None:
                    return {arg: _synthetic_batch(launcher, model)}
        fail(f'--dst {dst}: {launcher.script} had built no training loader (timm.data.create_loader) when the '
             f'sparsifier had to attach (before the EMA copy, DDP, torch.compile or the checkpoint saver): give '
             f'{flag} FILE, batches saved with torch.save')
    batches = draw_batches(loader, n)
    if not batches:
        fail(f'--dst {dst}: the training loader of {launcher.script} yields no batch to score; give {flag} FILE')
    log(f'DST: {dst} scores {len(batches)} batch(es) of {launcher.script}\'s training loader (its data order and '
        'random states are unchanged)')
    return {arg: batches}
