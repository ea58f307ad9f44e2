"""The controller: masks, exact counts, the optimizer step hook, optimizer-state surgery, R_s, rank sync, state."""
from __future__ import annotations

import functools
import logging
import math
import numbers
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..distributed import fsdp as _fsdp
from ..distributed.fsdp import flat_fill_
from ..kernels.sparse_linear import DEFAULT_MAX_DENSITY
from ._seeding import derived_generator
from ._validate import check_bool, check_choice, check_float, check_int, check_patterns
from .distributions import DISTRIBUTIONS, layer_counts
from .masks import DSTMask, attach_masks, effective_weight, has_mask, refresh_weight, unwrap_model
from .method import ShardedMethodError, SparseMethod
from .schedules import PRUNE_RATE_SCHEDULES, UpdateSchedule, prune_rate_at, resolve_step
from .structure import Layout, Structure, check_mask, parse_structure, per_group_topk, quantize_counts, topk_mask
from .targets import SparseTarget, find_targets

__all__ = ['Sparsifier', 'MASK_INITS', 'NonFiniteGradientError', 'unwrap_optimizer']

_logger = logging.getLogger(__name__)

MASK_INITS = ('random', 'magnitude', 'global-magnitude')

# optimizers whose update is exactly zero where weight, gradient and state are zero: masked weights stay zero
# without re-masking every step
_ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)

_STATE_VERSION = 1


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` (Accelerate's ``AcceleratedOptimizer`` lacks step hooks)."""
    while not isinstance(optimizer, torch.optim.Optimizer) or (
            hasattr(optimizer, 'optimizer') and isinstance(optimizer.optimizer, torch.optim.Optimizer)):
        inner = getattr(optimizer, 'optimizer', None)
        if inner is None:
            raise ValueError(f'optimizer: expected a torch.optim.Optimizer (or a wrapper of one), got {optimizer!r}')
        optimizer = inner
    return optimizer


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


class _ParentRefresh:
    """Forward pre-hook on the parent of a sparse module: on copies of the controlled model (timm's EMA), set the
    child's weight to ``orig * mask`` before a parent that reads it directly runs. A class, not a closure, so that
    ``torch.save(model)`` can pickle the model (copies and pickles drop the reference to the controlled parent)."""

    def __init__(self, parent: nn.Module, child: str, param_name: str):
        self.controlled: weakref.ref | None = weakref.ref(parent)
        self.child, self.param_name = child, param_name

    def __getstate__(self) -> dict:
        return {**self.__dict__, 'controlled': None}

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        if self.controlled is not None and module is self.controlled():
            return  # the child's weight is its parameter: nothing to refresh
        sub = module.get_submodule(self.child)  # relative lookup: works in deep copies (timm EMA) too
        if hasattr(sub, self.param_name + '_orig'):  # masks folded: nothing to refresh
            setattr(sub, self.param_name, effective_weight(sub, self.param_name))


class _AfterModelLoad:
    """``load_state_dict`` post-hook on the controlled model: masks loaded with ``model.load_state_dict`` (instead of
    ``Sparsifier.load_state_dict``) are taken over: counts recounted, R_s extended, weights and optimizer state zeroed
    where masked. Copies and pickles of the model drop the reference to the sparsifier."""

    def __init__(self, sparsifier: Sparsifier):
        self.sparsifier: weakref.ref | None = weakref.ref(sparsifier)

    def __getstate__(self) -> dict:
        return {'sparsifier': None}

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        sp = self.sparsifier() if self.sparsifier is not None else None
        if sp is not None and sp.model is module and not sp._detached:
            sp._take_over_masks()


def _all_finite(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether every entry of ``tensors`` is finite (one fused norm per tensor, one device sync). Under
    ``torch.distributed`` the answer is agreed by all ranks (a collective: call it on every rank), so that all ranks
    skip or run the same updates."""
    tensors = [t.to_local() if _fsdp.is_dtensor(t) else t for t in tensors]  # FSDP2 shards: agreed below
    ok = torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all() if tensors else None
    if _dist_world() > 1:
        flag = torch.ones(1, device=device) if ok is None else ok.to(device=device, dtype=torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)
    return True if ok is None else bool(ok)


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class NonFiniteGradientError(RuntimeError):
    """The gradients of the sparse weights stayed non-finite (NaN / inf) for ``max_nonfinite_steps`` checked optimizer
    steps in a row: training has diverged (raised from the optimizer's ``step``)."""


def _count_nonzero(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Non-zero (True) entries of each tensor; a ``DTensor``'s over all its shards (a collective: call it on every
    rank). Meta tensors count 0."""
    out = [0] * len(tensors)
    for sharded in (False, True):
        idx = [i for i, x in enumerate(tensors) if _fsdp.is_dtensor(x) == sharded and not x.is_meta]
        if idx:
            stats = torch.stack([torch.count_nonzero(tensors[i]).to(tensors[idx[0]].device) for i in idx])
            for i, c in zip(idx, _fsdp.full(stats).tolist()):
                out[i] = int(c)
    return out


def _count_nonfinite(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Non-finite (NaN / inf) entries of each tensor (integer tensors count 0; a collective for ``DTensor`` s)."""
    return _count_nonzero([~torch.isfinite(x) for x in tensors])


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _short(x: Any, limit: int = 80) -> str:
    """``x`` in at most ``limit`` characters, for one-line messages."""
    text = ' '.join(str(x).split()) if isinstance(x, BaseException) else ' '.join(repr(x).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _tensors_in(x: Any) -> list[torch.Tensor]:
    """Every tensor in nested mappings, lists and tuples."""
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors_in(v)]
    if isinstance(x, list | tuple):
        return [t for v in x for t in _tensors_in(v)]
    return []


class Sparsifier:
    """Keeps a model sparse while it trains; topology updates run from an optimizer step post-hook.

    Build it with :func:`timm_dst.create_sparsifier`, which resolves a method name and its defaults.

    Copies: ``copy.deepcopy((model, optimizer, sp))`` and a pickle round trip of the three (``torch.save``) give a
    sparsifier that controls the copied model and optimizer and continues exactly as the original would; a sparsifier
    copied alone brings its own copies of both (``sp2.model``, ``sp2.optimizer``); ``copy.copy(sp)`` is refused, and
    so is any copy under FSDP2 (:meth:`__getstate__`). A copy of the model alone (timm's EMA) evaluates ``orig * mask``
    (docs/reliability.md). A model on the meta device is refused before anything is touched: materialise it first.

    Args:
        model: Model to sparsify (DDP / compile wrappers are unwrapped). Attach before ``accelerator.prepare``.
        optimizer: Its optimizer (a torch optimizer or a wrapper such as Accelerate's).
        method: The method object (scores and budgets).
        sparsity: Global fraction of zeros over the sparse tensors, in [0, 1). None = 0.9, or 1 - N/M with an N:M
            ``structure`` (which admits no other value).
        distribution: Per-tensor density rule: ``'erk'``, ``'er'`` or ``'uniform'``.
        update_interval: ΔT, optimizer steps between topology updates.
        total_steps: Optimizer steps of the whole run (needed by fractional ``update_end`` and decaying schedules).
        defer_total_steps: The run's length is given later, through :meth:`set_total_steps` before the first optimizer
            step (timm's train.py knows it only from its scheduler set-up, after the EMA copy and DDP exist).
        prune_rate: Initial fraction P of each tensor's active weights replaced per update.
        prune_rate_schedule: ``'cosine'``, ``'constant'`` or ``'linear'`` decay of the prune rate to
            ``prune_rate_min`` at ``update_end``.
        prune_rate_min: Final prune rate of the decaying schedules.
        update_start: The first update is at this step (int) or fraction of training (float), then one every
                ``update_interval`` steps (0: the first at step ``update_interval``).
        update_end: Topology freezes after this step (int) or fraction of training (float); None = never.
        update_milestones: ``[(from_step, interval), ...]``: ΔT changes during training (DSR's reallocation periods).
        grow_unexplored_first: SET+ (ITOP Appendix F): grow never-activated positions before explored ones.
        mask_init: Initial topology when the method has none of its own: ``'random'`` (exact counts from the
            distribution), ``'magnitude'`` (per-tensor largest |w|, counts from the distribution) or
            ``'global-magnitude'`` (one global top-k of |w|).
        include: Glob patterns selecting the sparse parameters (default: conv / linear weights).
        exclude: Glob patterns removed from the selection.
        dense_first_layer: Keep the first layer dense.
        dense_classifier: Keep the classifier dense.
        remask_every_step: Multiply each weight by its mask after every optimizer step. None = only for optimizers not
            known to keep zeros at zero (anything but SGD / Adam / AdamW / RMSprop / Adagrad).
        seed: Seed of the sparsifier's own generator (identical on all ranks).
        sparse_kernel_density: Plain ``nn.Linear`` layers at or below this density run CSR kernels on CPU in float32
            (forward, input and weight gradients; see :mod:`timm_dst.kernels.sparse_linear`); 0 keeps every layer on the
            dense kernels.
        structure: Structured sparsity kept by every update (docs/structured.md): None (unstructured), ``'N:M'``
            (at most N active in every M consecutive inputs; fixes the sparsity at 1 - N/M), ``'fan-in'`` (every
            output neuron has the same number of active inputs) or ``'RxC'`` (whole R x C blocks). Tensors whose
            shape does not fit stay unstructured, with one warning; :meth:`summary` reports each tensor's.
        max_nonfinite_steps: Stop training (:class:`NonFiniteGradientError` from the optimizer's ``step``) when the
            gradients of the sparse weights are non-finite at this many checked optimizer steps in a row (checked:
            topology update steps and every ``update_interval`` steps, then every step once one was non-finite; one
            device sync each); None never stops. Real steps with NaN / inf gradients (no ``GradScaler`` skipping
            them) make the weights NaN, so the run cannot recover; steps a ``GradScaler`` skips do not count.
    """

    def __init__(
            self,
            model: nn.Module,
            optimizer: Any,
            method: SparseMethod,
            *,
            method_name: str | None = None,
            sparsity: float | None = None,
            distribution: str = 'erk',
            update_interval: int = 100,
            total_steps: int | None = None,
            prune_rate: float = 0.5,
            prune_rate_schedule: str = 'cosine',
            prune_rate_min: float = 0.0,
            update_start: int | float = 0,
            update_end: int | float | None = None,
            update_milestones: Sequence[tuple[int, int]] | None = None,
            grow_unexplored_first: bool = False,
            mask_init: str = 'random',
            include: str | Sequence[str] | None = None,
            exclude: str | Sequence[str] | None = None,
            dense_first_layer: bool = False,
            dense_classifier: bool = False,
            remask_every_step: bool | None = None,
            seed: int = 0,
            sparse_kernel_density: float = DEFAULT_MAX_DENSITY,
            defer_total_steps: bool = False,
            structure: str | Structure | None = None,
            max_nonfinite_steps: int | None = 20,
    ):
        structure = parse_structure(structure)
        if not getattr(method, 'attaches', True):
            structure = None  # nothing is masked: no structure to keep
        if sparsity is None:
            sparsity = 1.0 - structure.density if structure is not None and structure.density is not None else 0.9
        sparsity = check_float('sparsity', sparsity, 0.0, 1.0, high_open=True)
        if structure is not None and structure.density is not None and abs(sparsity - (1 - structure.density)) > 1e-9:
            raise ValueError(
                f'structure={structure.spec!r} fixes sparsity at {1 - structure.density:g} (at most {structure.n} of '
                f'every {structure.m} weights active): give sparsity={1 - structure.density:g} or leave sparsity out '
                f'(got sparsity={sparsity:g})')
        check_choice('distribution', distribution, DISTRIBUTIONS)
        check_choice('mask_init', mask_init, MASK_INITS)
        check_choice('prune_rate_schedule', prune_rate_schedule, PRUNE_RATE_SCHEDULES)
        prune_rate = check_float('prune_rate', prune_rate, 0.0, 1.0)
        prune_rate_min = check_float('prune_rate_min', prune_rate_min, 0.0, 1.0)
        update_interval = check_int('update_interval', update_interval, minimum=1)
        if total_steps is not None:
            total_steps = check_int('total_steps', total_steps, minimum=1)
        seed = check_int('seed', seed)
        if max_nonfinite_steps is not None:
            max_nonfinite_steps = check_int('max_nonfinite_steps', max_nonfinite_steps, minimum=1)
        sparse_kernel_density = check_float('sparse_kernel_density', sparse_kernel_density, 0.0, 1.0)
        for key, value in (('grow_unexplored_first', grow_unexplored_first), ('dense_first_layer', dense_first_layer),
                           ('dense_classifier', dense_classifier)):
            check_bool(key, value)
        check_bool('remask_every_step', remask_every_step, allow_none=True)
        check_patterns('include', include)
        check_patterns('exclude', exclude)
        if not isinstance(model, nn.Module):
            raise ValueError(f'model: expected a torch.nn.Module, got {type(model).__name__}')
        if not isinstance(method, SparseMethod):
            raise ValueError(f'method: expected a SparseMethod instance, got {type(method).__name__}')
        self.model = unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer)
        self.method = method
        self.method_name = method_name or type(method).__name__.lower()
        self.sparsity = float(sparsity) if method.attaches else 0.0
        self.distribution = distribution
        self.total_steps = int(total_steps) if total_steps is not None else None
        self.prune_rate_initial = float(prune_rate)
        self.prune_rate_schedule = prune_rate_schedule
        self.prune_rate_min = float(prune_rate_min)
        self.grow_unexplored_first = bool(grow_unexplored_first)
        self.mask_init = mask_init
        self.seed = int(seed)
        self._update_span = (update_start, update_end)
        self._total_steps_pending = bool(defer_total_steps) and self.total_steps is None
        pending = self._total_steps_pending
        start = resolve_step(update_start if not (pending and isinstance(update_start, float)) else None,
                             self.total_steps, 'update_start') or 0
        end = resolve_step(update_end if not (pending and isinstance(update_end, float)) else None,
                           self.total_steps, 'update_end')
        self._check_span(start, end)
        self.schedule = UpdateSchedule(update_interval, start=start, end=end, milestones=update_milestones,
                                       update_at_end=method.update_at_end)
        self.prune_rate_end = end if end is not None else self.total_steps
        if prune_rate_schedule != 'constant' and self.prune_rate_end is None and method.explores and not pending:
            raise ValueError(
                f'prune_rate_schedule={prune_rate_schedule!r} decays over training: give total_steps or update_end, '
                "or use prune_rate_schedule='constant'")
        # validate the schedule name now rather than at the first update
        prune_rate_at(0, self.prune_rate_initial, 1, prune_rate_schedule)

        self.targets: list[SparseTarget] = find_targets(
            self.model, include=include, exclude=exclude,
            dense_first_layer=dense_first_layer, dense_classifier=dense_classifier)
        if not self.targets:
            raise ValueError(
                'model: nothing to sparsify (no >= 2-D weight of a conv / linear module matched); '
                f'include={include!r}, exclude={exclude!r}: name parameters with include= glob patterns')
        self._check_targets()
        self._check_materialized()
        # FSDP2 (fully_shard): masks sharded like their weights, updates gathered one tensor at a time (_fsdp.py)
        self._sharded = _fsdp.check_sharded_targets(self.targets)
        if self._sharded:
            self._check_sharded_method()
            if structure is not None:
                raise ValueError(f'structure={structure.spec!r}: structured sparsity is not supported on a model '
                                 'sharded with fully_shard (FSDP2) yet; leave structure unset (unstructured masks)')
            sparse_kernel_density = 0.0  # the CSR kernels do not take DTensor shards: the dense kernels run
        self.structure = structure
        self._layouts: list[Layout | None] = [
            structure.layout(t.shape) if structure is not None else None for t in self.targets]
        self.config = {
            'method': self.method_name, 'sparsity': self.sparsity, 'distribution': distribution,
            'targets': [(t.name, list(t.shape)) for t in self.targets],
            'structure': structure.spec if structure is not None else None,
        }
        self._warn_misfits()
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._generators: dict[str, torch.Generator] = {}
        self._dense_grads: list[torch.Tensor | None] = [None] * len(self.targets)
        self._capture_handles: list[Any] = []
        self._step_hook = None
        self._parent_handles: list[Any] = []
        self.total_numel = sum(t.numel for t in self.targets)
        self.sparse_kernel_density = float(sparse_kernel_density)
        self._dst_masks: list[DSTMask] = []  # the attached pruning hook (DSTMask) of each target
        self._grad_marks: list[tuple[int, int] | None] = [None] * len(self.targets)  # .grad after the last capture
        self._update_pending = False  # an update postponed by a non-finite gradient runs at the next real step
        self._detached = False  # set by fold_masks: the masks are gone
        self._warned_state = False
        self._finite_cache: tuple[int, bool] | None = None  # (step, finite) of the last check
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_streak = 0  # checked steps with non-finite gradients in a row
        self._nonfinite_at = -1  # the last step counted in the streak

        if not method.attaches:
            self.counts = [t.numel for t in self.targets]
            self.explored_counts = list(self.counts)
            self.explored: list[torch.Tensor] = []
            return

        self.counts = self.layer_budgets(self.sparsity)
        self._budget_total = sum(self.counts)  # set again from the initial masks below
        empty = [t.name for t, c in zip(self.targets, self.counts) if c == 0]
        if empty:
            warnings.warn(f'timm_dst: {len(empty)} sparse tensor(s) get no active weight at sparsity={self.sparsity} '
                          f'({", ".join(empty[:5])}{" ..." if len(empty) > 5 else ""}): the network is disconnected '
                          "there; lower sparsity, use distribution='erk', or exclude them", stacklevel=3)
        masks = method.init_masks(self)
        if masks is None:
            masks = self._initial_masks()
        if self._sharded:  # each rank keeps its rows; every rank drew the same masks (same generator, gathered weights)
            masks = [m if _fsdp.is_dtensor(m) else _fsdp.shard_like(m, t.param) for m, t in zip(masks, self.targets)]
            # FSDP2 manages every sparse weight (checked before anything is attached)
            _fsdp.adopt_renamed_params(self.model, self.targets, check_only=True)
        else:
            masks = self._broadcast_masks(masks)
        method.prepare(self)
        # every check is done: attach all masks or none
        self._dst_masks = attach_masks([(t.module, t.param_name, m) for t, m in zip(self.targets, masks)])
        for m, layout in zip(self._dst_masks, self._layouts):
            m.controller = weakref.ref(self)
            m.root = weakref.ref(self.model)
            m.structure = layout.spec if layout is not None else None
        if self._sharded:
            for m in self._dst_masks:
                m.sharded = True
            _fsdp.adopt_renamed_params(self.model, self.targets)
            self.generator(self._device())  # in the state from the start: a DCP load fills the state it is given
        self._zero_optimizer_state([t.mask for t in self.targets])
        self.explored = [t.mask.detach().clone() for t in self.targets]
        self._refresh_counts()
        self._budget_total = sum(self.counts)  # the total a structured budget-moving method keeps (in whole units)
        if remask_every_step is None:
            remask_every_step = type(self.optimizer) not in _ZERO_PRESERVING
        self.remask_every_step = bool(remask_every_step)
        self._origs = [t.param for t in self.targets]  # parameters keep their identity across module.to()
        self._step_hook = self.optimizer.register_step_post_hook(self._on_step)
        self._parent_handles.append(self.model.register_load_state_dict_post_hook(_AfterModelLoad(self)))
        # some timm blocks read a child's weight in their own forward (BEiT / EVA / Swin V2 attention:
        # F.linear(x, self.qkv.weight, qkv_bias)), so the child's prune hook never runs. On the controlled model the
        # child's weight is its `_orig` parameter anyway; copies of it (timm's EMA) need `orig * mask` from the parent
        for i, t in enumerate(self.targets):
            owner = self._parent(i)
            if owner is not None:
                self._parent_handles.append(
                    owner[0].register_forward_pre_hook(self._make_refresh_hook(owner[0], owner[1], t.param_name)))
        self._set_capture(self.method.needs_dense_grad(self, 1))
        self._record(prune_rate=0.0)

    # ------------------------------------------------------------------------------------------------------------
    # public read-outs
    @property
    def density(self) -> float:
        """Realised global density of the sparse tensors (exact counts, no device sync)."""
        return sum(self.counts) / self.total_numel

    @property
    def itop_rate(self) -> float:
        """R_s: |union of all masks ever active| / |all sparse-tensor elements|."""
        return sum(self.explored_counts) / self.total_numel

    @property
    def prune_rate(self) -> float:
        """Prune rate in force at the current step."""
        return prune_rate_at(self.step, self.prune_rate_initial, self.prune_rate_end or 0,
                             self.prune_rate_schedule, self.prune_rate_min)

    def summary(self) -> list[dict[str, Any]]:
        """One row per sparse tensor: name, shape, numel, density, explored (per-tensor R_s) and structure (the
        effective structure's spec, None where the tensor is unstructured, by choice or because it does not fit)."""
        return [
            {'name': t.name, 'shape': list(t.shape), 'numel': t.numel, 'density': c / t.numel,
             'explored': e / t.numel, 'structure': layout.spec if layout is not None else None}
            for t, c, e, layout in zip(self.targets, self.counts, self.explored_counts, self._layouts)
        ]

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The sparsifier's generator on ``device``, seeded identically on every rank.

        Its seed is mixed from :attr:`seed` (:func:`~timm_dst.core._seeding.derive_seed`), never :attr:`seed` itself:
        the user seeds torch's global generator with the same integer before building the model, and a replay of that
        stream would select the masks from the initial weights.
        """
        device = torch.device(device)
        key = str(device)
        if key not in self._generators:
            self._generators[key] = derived_generator(self.seed, 'sparsifier', len(self._generators), device=device)
        return self._generators[key]

    def __repr__(self) -> str:
        structure = ''
        if self.structure is not None:
            misfits = self._misfit_names()
            structure = f', structure={self.structure.spec!r}'
            if misfits:
                structure += (f' (unstructured: {", ".join(misfits[:3])}{" ..." if len(misfits) > 3 else ""}; '
                              f'{len(self.targets) - len(misfits)} of {len(self.targets)} structured)')
        return (f'Sparsifier(method={self.method_name!r}, sparsity={self.sparsity}, '
                f'distribution={self.distribution!r}{structure}, tensors={len(self.targets)}, '
                f'density={self.density:.4f}, itop_rate={self.itop_rate:.4f}, step={self.step})')

    # ------------------------------------------------------------------------------------------------------------
    # structure (docs/structured.md): budgets and masks in whole units of each tensor's layout
    def _misfit_names(self) -> list[str]:
        return [t.name for t, layout in zip(self.targets, self._layouts) if layout is None]

    def _warn_misfits(self) -> None:
        if self.structure is None:
            return
        misfits = [(t.name, self.structure.misfit(t.shape)) for t, lay in zip(self.targets, self._layouts)
                   if lay is None]
        if misfits:
            listed = '; '.join(f'{n} ({why})' for n, why in misfits[:5]) + (' ...' if len(misfits) > 5 else '')
            warnings.warn(f'timm_dst: structure={self.structure.spec!r} does not fit {len(misfits)} of '
                          f'{len(self.targets)} sparse tensor(s): {listed}; they stay unstructured at their budget '
                          '(summary() shows each tensor\'s structure; exclude= keeps them dense)', stacklevel=4)

    def _bounds(self, i: int) -> tuple[int, int]:
        """(quantum, cap) of tensor ``i``: the step of its active count and the most it may hold."""
        layout = self._layouts[i]
        if layout is None:
            return 1, self.targets[i].numel
        return layout.quantum, layout.cap

    def layer_budgets(self, sparsity: float) -> list[int]:
        """Active count of each sparse tensor at ``sparsity`` under this sparsifier's distribution and structure.

        Unstructured, these are :func:`~timm_dst.core.distributions.layer_counts` (exact total). With a structure, each
        tensor's count is rounded to whole units of its layout (blocks, or one weight per group), at least one unit
        where the distribution gives any, with the total as close to ``(1 - sparsity) * N`` as the units allow; an N:M
        structure gives every tensor the same density (the distribution does not apply) and its fitting tensors
        exactly N per group at ``sparsity = 1 - N/M``.
        """
        shapes = [t.shape for t in self.targets]
        if self.structure is None:
            return layer_counts(shapes, sparsity, self.distribution)
        nm = self.structure.kind == 'n:m'
        desired = layer_counts(shapes, sparsity, 'uniform' if nm else self.distribution)
        quanta = [self._bounds(i)[0] for i in range(len(shapes))]
        low = [q if d > 0 else 0 for q, d in zip(quanta, desired)]
        high = [t.numel for t in self.targets]
        if nm and abs(sparsity - (1 - self.structure.density)) < 1e-9:  # fitting tensors: exactly N per group
            for i, layout in enumerate(self._layouts):
                if layout is not None:
                    desired[i] = low[i] = high[i] = layout.cap
        counts, _ = quantize_counts(desired, quanta, low, high, sum(desired))
        return counts

    def topk_masks(self, scores: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
        """Per tensor, a mask of ``counts[i]`` active weights at the highest ``scores[i]``, in whole units of the
        structure (blocks by summed score, grouped structures the same number in every group)."""
        masks = []
        for t, layout, score, count in zip(self.targets, self._layouts, scores, counts):
            if layout is not None:
                masks.append(topk_mask(layout, score, count))
                continue
            mask = torch.zeros(t.numel, dtype=torch.bool, device=score.device)
            mask[torch.topk(score.detach().flatten(), count, sorted=False).indices] = True
            masks.append(mask.view(t.shape))
        return masks

    def check_structure(self, masks: list[torch.Tensor] | None = None) -> None:
        """Raise ValueError when a mask (default: the attached ones) breaks its tensor's structure."""
        masks = masks if masks is not None else [t.mask for t in self.targets]
        for t, layout, mask in zip(self.targets, self._layouts, masks):
            why = check_mask(layout, mask) if layout is not None else None
            if why is not None:
                raise ValueError(f'masks: {t.name} breaks structure={layout.spec!r}: {why}')

    # ------------------------------------------------------------------------------------------------------------
    # initial topology
    def _initial_masks(self) -> list[torch.Tensor]:
        cpu_gen = self.generator('cpu')
        if self.mask_init == 'global-magnitude':
            scores = [_fsdp.full(t.param.detach()).abs() for t in self.targets]
            return self.global_topk_masks(scores, sum(self.counts))
        masks = []
        for t, count, layout in zip(self.targets, self.counts, self._layouts):
            p = t.param
            if self.mask_init == 'magnitude':
                score = _fsdp.full(p.detach()).abs().flatten()
            else:
                score = torch.rand(p.numel(), generator=cpu_gen).to(p.device)
            if layout is not None:  # whole units: blocks by summed score, the same count in every group
                masks.append(topk_mask(layout, score.view(t.shape), count))
                continue
            mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            mask[topk_indices(score, count)] = True
            # sharded: each rank keeps its rows at once (one tensor's whole mask at a time)
            masks.append(_fsdp.shard_like(mask, p) if self._sharded else mask.view(t.shape))
        return masks

    def global_topk_masks(self, scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        """Masks keeping the global top-``k`` of per-tensor scores (used by global magnitude, SNIP and LTH)."""
        flat = torch.cat([_fsdp.full(s.detach()).flatten().float() for s in scores])
        if not bool(torch.isfinite(flat).all()):
            raise ValueError('scores of the initial mask are not finite (NaN / inf in the weights or in the gradients '
                             'of the scoring batches): check the weights given (lth_trained_state) or the batches '
                             '(snip_batches)')
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, k, sorted=False).indices] = True
        out, offset = [], 0
        for s in scores:
            out.append(keep[offset:offset + s.numel()].view(s.shape))
            offset += s.numel()
        if self.structure is None:
            return out
        # structured: the global ranking sets each tensor's count (rounded to whole units), the units are then
        # chosen inside each tensor by their pooled score
        desired = [int(c) for c in torch.stack([torch.count_nonzero(m) for m in out]).tolist()]
        bounds = [self._bounds(i) for i in range(len(out))]
        quanta = [q for q, _ in bounds]
        total_cap = sum(cap for _, cap in bounds)
        high = [cap if k <= total_cap else t.numel for (_, cap), t in zip(bounds, self.targets)]
        low = [min(q, h) if d > 0 else 0 for q, d, h in zip(quanta, desired, high)]
        counts, _ = quantize_counts(desired, quanta, low, high, k)
        return self.topk_masks([s.detach().float() for s in scores], counts)

    # ------------------------------------------------------------------------------------------------------------
    # hooks
    def set_total_steps(self, total_steps: int) -> None:
        """Set the optimizer steps of the whole run after attaching (with ``defer_total_steps=True``): fractional
        ``update_start`` / ``update_end`` and the prune-rate decay are resolved against it."""
        self.total_steps = check_int('total_steps', total_steps, minimum=1)
        self._total_steps_pending = False
        start = resolve_step(self._update_span[0], self.total_steps, 'update_start') or 0
        end = resolve_step(self._update_span[1], self.total_steps, 'update_end')
        self._check_span(start, end)
        self.schedule.start, self.schedule.end = start, end
        self.prune_rate_end = end if end is not None else self.total_steps

    def _check_span(self, start: int, end: int | None) -> None:
        if end is not None and end < start:
            update_start, update_end = self._update_span
            raise ValueError(f'update_end={update_end!r} (step {end}) comes before update_start={update_start!r} '
                             f'(step {start}): no update could ever run')

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._total_steps_pending:
            raise RuntimeError('Sparsifier(defer_total_steps=True): call set_total_steps() before the first '
                               'optimizer step')
        self.step += 1
        if self.remask_every_step:
            with torch.no_grad():
                torch._foreach_mul_(self._origs, [t.mask for t in self.targets])  # buffers: looked up fresh
        due = self._update_pending or self.schedule.is_update_step(self.step)
        capturing = bool(self._capture_handles)
        # capture on/off is the same on every rank (the schedule decides), so the agreed check runs on all of them
        if capturing and not _all_finite([g for g in self._dense_grads if g is not None], self._device()):
            self._finite_cache = (self.step, False)
            # never fold a non-finite window into method state (SNFS momentum) or grow from it (RigL)
            if not due:  # on an update step, update() says it
                warnings.warn(f'timm_dst: non-finite gradient at step {self.step}: its dense gradients are dropped',
                              stacklevel=2)
            self.clear_dense_grads()
        self.method.on_step(self)
        if due:
            self.update()
        checked = self._finite_cache if self._finite_cache is not None and self._finite_cache[0] == self.step else None
        if checked is None and (self._nonfinite_streak or self.step % self.schedule.interval == 0):
            # followed step by step once non-finite; else every ΔT, also where no update checks (a static method,
            # before update_start, after update_end)
            checked = (self.step, self._step_finite())
            if not checked[1] and not self._nonfinite_streak:
                limit = self.max_nonfinite_steps
                warnings.warn(f'timm_dst: non-finite gradient at step {self.step}: masked weights are zeroed again'
                              + (f'; training stops after {limit} such steps in a row (max_nonfinite_steps)'
                                 if limit is not None else ''), stacklevel=2)
        # an update postponed by a non-finite gradient runs at the next step, with a fresh capture when it uses one
        capture = self.method.needs_dense_grad(self, self.step + 1) or (self._update_pending and capturing)
        if capture != bool(self._capture_handles):
            self._set_capture(capture)
        self._finite_cache = None  # valid within one step only: an update called by hand checks afresh
        if checked is not None:
            self._note_finite(checked[1])

    @torch.no_grad()
    def _note_finite(self, finite: bool) -> None:
        """Follow the checked optimizer steps whose gradients are non-finite: the masked weights and their optimizer
        state go back to zero (the step wrote NaN there too, since NaN * 0 is NaN), and after ``max_nonfinite_steps``
        of them in a row training stops."""
        if finite:
            self._nonfinite_streak = 0
            return
        if self._nonfinite_at != self.step:
            self._nonfinite_at = self.step
            self._nonfinite_streak += 1
        for t in self.targets:
            t.param.masked_fill_(~t.mask, 0.0)
        self._zero_optimizer_state([t.mask for t in self.targets])
        limit, n = self.max_nonfinite_steps, self._nonfinite_streak
        if limit is not None and n >= limit:
            raise NonFiniteGradientError(
                f'timm_dst: the gradients of the sparse weights were non-finite (NaN / inf) at {n} checked optimizer '
                f'step(s) in a row, the last at step {self.step}: training has diverged and stops here instead of '
                'training on NaN (lower the learning rate, clip gradients, or scale fp16 losses with a GradScaler; '
                f'the bound is max_nonfinite_steps={limit})')

    def _parent(self, i: int) -> tuple[nn.Module, str] | None:
        """The module owning target ``i``'s module, and the child's name relative to it."""
        name = self.targets[i].name.rsplit('.', 1)[0] if '.' in self.targets[i].name else ''
        if not name:
            return None
        parent, _, child = name.rpartition('.')
        return self.model.get_submodule(parent), child

    @staticmethod
    def _make_refresh_hook(parent: nn.Module, child: str, param_name: str) -> _ParentRefresh:
        return _ParentRefresh(parent, child, param_name)

    def _check_materialized(self) -> None:
        """Refuse, before anything is touched, sparse weights on the meta device (a model built under
        ``torch.device('meta')``, e.g. for FSDP2 initialisation).

        Not supported: initial masks are chosen from (magnitude) or written into real tensors, counts are read back,
        and ``to_empty`` would later replace the mask buffers by uninitialised memory and the weights by values that
        are not zero where masked. Materialise the model first, then attach.
        """
        if not self.method.attaches:
            return
        on_meta = [t.name for t in self.targets if t.param.device.type == 'meta']
        if on_meta:
            raise ValueError(
                f'model: {len(on_meta)} sparse weight(s) are on the meta device ({", ".join(on_meta[:5])}'
                f'{" ..." if len(on_meta) > 5 else ""}) and have no values to mask: materialise the model first '
                '(model.to_empty(device=...), then initialise or load its weights), then build the optimizer and call '
                'create_sparsifier')

    # ------------------------------------------------------------------------------------------------------------
    # copies and pickles
    def __copy__(self) -> Sparsifier:
        raise TypeError('Sparsifier: a shallow copy would share the model, optimizer and masks with this sparsifier '
                        'and hook them twice; copy.deepcopy((model, optimizer, sparsifier)) copies all three, or save '
                        'sparsifier.state_dict()')

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` (``torch.save``) copy: the whole controller, and with it its model and
        optimizer (:attr:`model`, :attr:`optimizer`).

        A copy is a working controller of the copied model and optimizer (see :meth:`__setstate__`). Objects copied in
        the same call are shared as usual: ``copy.deepcopy((model, optimizer, sp))`` or ``pickle.dumps((model,
        optimizer, sp))`` gives a model, an optimizer and a sparsifier controlling exactly those two, which continue as
        the originals would (same masks after the same steps on the same data). A sparsifier copied alone carries its
        own copies of the model and optimizer: train ``sp2.model`` with ``sp2.optimizer``. To continue a run in another
        process with a model built there, use :meth:`state_dict` / :meth:`load_state_dict` instead.

        Raises:
            TypeError: The model is sharded with FSDP2 (``fully_shard``): its shards cannot be copied in one process.
        """
        if self._sharded:
            raise TypeError('Sparsifier: a sparsifier of a model sharded with fully_shard (FSDP2) cannot be copied or '
                            'pickled; save sparsifier.state_dict() with torch.distributed.checkpoint and load it into '
                            'a new sparsifier')
        state = dict(self.__dict__)
        # hooks on the optimizer and on tensors are not copied with them (torch drops them): set again on the copy
        state['_step_hook'] = self._step_hook is not None
        state['_capture_handles'] = bool(self._capture_handles)
        state['_grad_marks'] = [None] * len(self.targets)  # weak references to this model's gradients
        state['_finite_cache'] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Take control of the copied model and optimizer: the masks' gradient hooks go on the copy's parameters, the
        step hook on the copy's optimizer, the dense-gradient capture is set as it was, and the copy's own
        load-state-dict and parent hooks (copied with the model) point at this sparsifier. A sparsifier whose hooks
        were removed (:meth:`remove`) or whose masks were folded (:func:`timm_dst.fold_masks`) stays so."""
        hooked, capturing = state.pop('_step_hook'), state.pop('_capture_handles')
        self.__dict__.update(state)
        self._step_hook, self._capture_handles = None, []
        if not self.method.attaches or self._detached:
            return
        for t, dst_mask in zip(self.targets, self._dst_masks):
            dst_mask.adopt(t.module)
            dst_mask.controller = weakref.ref(self)
            dst_mask.root = weakref.ref(self.model)
        owners = {id(m._forward_pre_hooks): m for m in self.model.modules()}
        for handle in self._parent_handles:
            hooks = handle.hooks_dict_ref()
            hook = hooks.get(handle.id) if hooks is not None else None
            if isinstance(hook, _AfterModelLoad):
                hook.sparsifier = weakref.ref(self)
            elif isinstance(hook, _ParentRefresh) and id(hooks) in owners:
                hook.controlled = weakref.ref(owners[id(hooks)])
        if hooked:
            self._step_hook = self.optimizer.register_step_post_hook(self._on_step)
        self._set_capture(capturing)

    def _set_capture(self, on: bool) -> None:
        for h in self._capture_handles:
            h.remove()
        self._capture_handles = []
        for dst_mask in self._dst_masks:  # the dense gradient needs the dense kernels
            dst_mask.dense_grad_wanted = on
        if not on:
            return
        if self._sharded:  # FSDP2: the reduce-scattered shard, taken by the mask's gradient hook before masking
            for i, dst_mask in enumerate(self._dst_masks):
                dst_mask.capture = _fsdp.ShardedCapture(self, i)
                self._capture_handles.append(_fsdp.CaptureHandle(dst_mask))
            return
        # a hook on the parameter itself sees its whole gradient (every use in the graph, the child's forward or a
        # parent reading the child's weight) before it accumulates into .grad and is masked there; a post-accumulate
        # hook (after the masking one) notes which .grad the capture belongs to
        for i, t in enumerate(self.targets):
            self._capture_handles.append(t.param.register_hook(functools.partial(self._accumulate_grad, i)))
            self._capture_handles.append(
                t.param.register_post_accumulate_grad_hook(functools.partial(self._mark_grad, i)))

    def _accumulate_grad(self, i: int, grad: torch.Tensor) -> None:
        """Capture window = lifetime of ``.grad``: the capture sums micro-steps only while ``.grad`` is the tensor the
        last capture accumulated into, unchanged since. Zeroing the gradients (``zero_grad``, set to None or to zero)
        starts a new window, so a backward whose step was skipped (``GradScaler`` after an overflow) leaves no trace.
        """
        g = grad.detach().float()
        held, mark, current = self._dense_grads[i], self._grad_marks[i], self.targets[i].param.grad
        same = (held is not None and mark is not None and current is not None and mark[0]() is current
                and mark[1] == current._version)
        if same:
            held.add_(g)
        else:
            self._dense_grads[i] = g.clone()

    def _mark_grad(self, i: int, param: torch.Tensor) -> None:
        grad = param.grad
        self._grad_marks[i] = (weakref.ref(grad), grad._version) if grad is not None else None

    @property
    def has_dense_grads(self) -> bool:
        """Whether a dense gradient was captured since the last :meth:`clear_dense_grads` (on this rank)."""
        return any(g is not None for g in self._dense_grads)

    def dense_grads(self) -> list[torch.Tensor]:
        """The captured dense gradients of the sparse weights (summed over micro-steps, averaged over ranks).

        The methods' read-only view (zeros where nothing was captured): read the tensors, never modify them in place
        (on one process they are the controller's accumulators, not copies). Collective with several processes: call
        it on every rank.
        """
        grads = [g if g is not None else torch.zeros_like(t.param, dtype=torch.float32)
                 for g, t in zip(self._dense_grads, self.targets)]
        if _dist_world() > 1 and not self._sharded:  # FSDP2's reduce-scatter averaged the shards already
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            flat.div_(_dist_world())
            grads = [c.view(g.shape) for c, g in zip(torch.split(flat, [g.numel() for g in grads]), grads)]
        return grads

    def _like_param(self, x: torch.Tensor, t: SparseTarget) -> torch.Tensor:
        """``x`` (float32, shaped like ``t``'s weight) on its device, sharded like it when the weight is."""
        if self._sharded:
            return x.to(t.param.device) if _fsdp.is_dtensor(x) else _fsdp.shard_like(x.to(t.param.device), t.param)
        return _fsdp.full(x).to(t.param.device)

    def clear_dense_grads(self) -> None:
        """Forget the captured dense gradients (a method that consumes them every step, like SNFS, calls this)."""
        self._dense_grads = [None] * len(self.targets)

    # ------------------------------------------------------------------------------------------------------------
    # topology update
    def _gradients_finite(self) -> bool:
        tensors = [t.param.grad for t in self.targets if t.param.grad is not None]
        tensors += [g for g in self._dense_grads if g is not None]
        return _all_finite(tensors, self._device())

    def _device(self) -> torch.device:
        return self.targets[0].param.device

    def _step_finite(self) -> bool:
        """Whether this step's gradients (of the sparse weights, and the captured dense ones) are finite; one check
        per step."""
        cached = self._finite_cache
        if cached is None or cached[0] != self.step:
            cached = self._finite_cache = (self.step, self._gradients_finite())
        return cached[1]

    def _check_live(self) -> None:
        if self._detached:
            raise RuntimeError('this sparsifier was detached by timm_dst.fold_masks(model): its masks are gone; create '
                               'a new sparsifier to sparsify the model again')

    @torch.no_grad()
    def update(self) -> None:
        """One topology update at the current step (called by the step hook; callable by hand).

        With a non-finite gradient at this step the update is postponed to the next optimizer step (with a warning),
        so a method's schedule is never missed (GMP reaches its target, LTH / SNIP masks are final).
        """
        self._check_live()
        if not self.method.explores:
            return
        if not self._step_finite():
            warnings.warn(f'timm_dst: non-finite gradient at step {self.step}: topology update postponed to the next '
                          'step', stacklevel=2)
            self.clear_dense_grads()
            self._update_pending = True
            return
        self._update_pending = False
        for i, t in enumerate(self.targets):  # the model may have moved since attaching (module.to swaps buffers)
            if self.explored[i].device != t.mask.device:
                self.explored[i] = self.explored[i].to(t.mask.device)
        rate = self.prune_rate
        self.method.before_update(self)
        n_drop = self.method.drop_counts(self, rate)
        if self.structure is not None:
            drops, grows = self._structured_topology(n_drop)
        else:
            drops, kept = zip(*[self._drop_lowest(i, k) for i, k in enumerate(n_drop)]) if n_drop else ((), ())
            n_grow = self.method.grow_counts(self, list(n_drop), list(kept))
            grows = [self._grow_highest(i, k, kept[i], self.counts[i] - d)
                     for i, (k, d) in enumerate(zip(n_grow, n_drop))]
        n = len(self.targets)
        both = self._broadcast_indices(list(drops) + grows)
        self._apply_update(both[:n], both[n:])
        self.clear_dense_grads()
        self.method.after_update(self)
        self._record(prune_rate=rate)

    def _drop_lowest(self, i: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices of the ``k`` lowest-scoring active weights of tensor ``i``, and the mask left after dropping."""
        mask = self.targets[i].mask
        kept = mask.clone()
        if k <= 0:
            return torch.empty(0, dtype=torch.long, device=kept.device), kept
        # sharded (FSDP2): this tensor's mask and scores are gathered, every rank computes the same drop
        active = _fsdp.full(mask).reshape(-1).nonzero().squeeze(1)  # drop candidates: active weights only
        score = _fsdp.full(self.method.drop_score(self, i)).reshape(-1)[active].float()
        drop = active[topk_indices(score.neg_(), k)]
        flat_fill_(kept, drop, False)
        return drop, kept

    def _grow_highest(self, i: int, k: int, kept: torch.Tensor, n_kept: int) -> torch.Tensor:
        """Flat indices of ``k`` positions of tensor ``i`` to grow, all inactive after the drop (``n_kept`` active)."""
        t = self.targets[i]
        if k <= 0:
            return torch.empty(0, dtype=torch.long, device=kept.device)
        excl_dropped = self.method.grow_excludes_dropped
        kept = _fsdp.full(kept)  # sharded (FSDP2): gathered for this tensor only, the same on every rank
        blocked = (kept | _fsdp.full(t.mask)) if excl_dropped else kept
        n_blocked = self.counts[i] if excl_dropped else n_kept
        score = self.method.grow_score(self, i)
        if score is None:
            if not self.grow_unexplored_first:
                return self._sample_free(blocked.reshape(-1), k, t.numel - n_blocked)
            # SET+: never-activated positions first, then the explored ones
            fresh_blocked = (blocked | _fsdp.full(self.explored[i])).reshape(-1)
            n_fresh = fresh_blocked.numel() - int(torch.count_nonzero(fresh_blocked))
            first = self._sample_free(fresh_blocked, min(k, n_fresh), n_fresh)
            if first.numel() == k:
                return first
            rest_blocked = blocked.reshape(-1).clone()
            rest_blocked[first] = True
            rest = self._sample_free(rest_blocked, k - first.numel(), t.numel - n_blocked - first.numel())
            return torch.cat([first, rest])
        score = _fsdp.full(score).float()
        if self.grow_unexplored_first:
            finite = score.masked_fill(blocked, 0.0)
            offset = finite.max() - finite.min() + 1.0
            score = torch.where(_fsdp.full(self.explored[i]), score, score + offset)
        score = score.masked_fill(blocked, -math.inf)
        return topk_indices(score.reshape(-1), k)

    def _structured_topology(self, n_drop: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Drop and grow index sets of one update that keep every tensor's structure (docs/structured.md).

        The method's element counts are taken in whole units: blocks drop the ``round(k / (R C))`` active blocks of
        lowest summed drop score; grouped structures (N:M, fan-in) drop the ``k`` lowest-scoring active weights of
        the tensor. The method's grow counts (given the element counts actually dropped) set each tensor's new
        count, rounded to whole units with the total kept where the units allow (else every tensor keeps its count).
        Blocks then grow the inactive blocks of highest summed grow score; each group grows back to the tensor's new
        per-group count at its highest-scoring inactive weights (uniformly at random where the method's grow score
        is None); a group above that count (a pruning method, or budget moved away) keeps its highest-scoring
        active weights instead and grows nothing.
        """
        n = len(self.targets)
        drops, kept = [], []
        for i, k in enumerate(n_drop):
            layout = self._layouts[i]
            if layout is not None and layout.kind == 'block':
                d, kp = self._drop_lowest_blocks(i, int(math.floor(k / layout.unit_size + 0.5)))
            else:
                d, kp = self._drop_lowest(i, min(int(k), self.counts[i]))
            drops.append(d)
            kept.append(kp)
        dropped = [int(d.numel()) for d in drops]
        n_grow = [int(g) for g in self.method.grow_counts(self, dropped, kept)]
        n_kept = [c - d for c, d in zip(self.counts, dropped)]
        desired = [kp + g for kp, g in zip(n_kept, n_grow)]
        # a method that keeps the total (all but pruning ones) may have its moves rounded across tensors, aiming at
        # the run's budget so that rounding never drifts; a pruning update rounds each tensor on its own
        keeps_total = sum(desired) == sum(self.counts)
        quanta, low, high = [], [], []
        for i in range(n):
            q, cap = self._bounds(i)
            layout = self._layouts[i]
            quanta.append(q)
            grows = keeps_total or n_grow[i] > 0  # nothing regrows where a pruning method grows nothing
            if layout is not None and layout.kind == 'n:m':
                # N:M fixes the density: no budget moves in or out, and pruning (GMP) never goes below N per group
                low.append(self.counts[i] if keeps_total else min(cap, self.counts[i]))
                high.append(self.counts[i])
            elif layout is not None and layout.grouped:  # groups may shrink below what they kept
                low.append(0)
                high.append(max(cap, self.counts[i]) if grows else self.counts[i])
            else:
                room = cap - (dropped[i] if layout is None and self.method.grow_excludes_dropped else 0)
                low.append(n_kept[i])
                high.append(max(room, n_kept[i]) if grows else n_kept[i])
        # pruning rounds each tensor on its own, except that N:M tensors above N per group share the pruning (a
        # global ranking may want some of them below N, others above)
        nm = any(lay is not None and lay.kind == 'n:m' for lay in self._layouts)
        total = self._budget_total if keeps_total else (sum(desired) if nm else None)
        new, _ = quantize_counts(desired, quanta, low, high, total)
        grows = []
        for i in range(n):
            layout = self._layouts[i]
            if layout is None:
                grows.append(self._grow_highest(i, new[i] - n_kept[i], kept[i], n_kept[i]))
            elif layout.kind == 'block':
                grows.append(self._grow_blocks(i, (new[i] - n_kept[i]) // layout.unit_size, kept[i]))
            else:
                drops[i], grow = self._fill_groups(i, new[i] // layout.n_groups, kept[i], drops[i], n_grow[i] > 0)
                grows.append(grow)
        return drops, grows

    def _tiered(self, score: torch.Tensor, blocked: torch.Tensor, avoid: torch.Tensor | None,
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

    def _drop_lowest_blocks(self, i: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` active blocks of tensor ``i`` with the lowest summed drop score, as flat element indices, and the
        mask left after dropping them."""
        t, layout = self.targets[i], self._layouts[i]
        kept = t.mask.clone()
        active = layout.pool_any(t.mask).reshape(-1).nonzero().squeeze(1)
        k = min(k, active.numel())
        if k <= 0:
            return torch.empty(0, dtype=torch.long, device=kept.device), kept
        score = layout.pool(self.method.drop_score(self, i).float()).reshape(-1)[active]
        units = torch.zeros(layout.pool_any(t.mask).numel(), dtype=torch.bool, device=kept.device)
        units[active[topk_indices(score.neg_(), k)]] = True
        drop = layout.expand(units.view(layout.out // layout.structure.rows, -1)).reshape(-1).nonzero().squeeze(1)
        flat_fill_(kept, drop, False)
        return drop, kept

    def _grow_blocks(self, i: int, k: int, kept: torch.Tensor) -> torch.Tensor:
        """Flat element indices of the ``k`` inactive blocks of tensor ``i`` to grow: highest summed grow score, or
        uniformly at random when the method's grow score is None."""
        t, layout = self.targets[i], self._layouts[i]
        if k <= 0:
            return torch.empty(0, dtype=torch.long, device=kept.device)
        kept_u = layout.pool_any(kept).reshape(-1)
        score = self.method.grow_score(self, i)
        if score is None:
            score_u = torch.rand(kept_u.numel(), generator=self.generator(kept.device), device=kept.device)
        else:
            score_u = layout.pool(score.float()).reshape(-1)
        avoid = (layout.pool_any(t.mask).reshape(-1) & ~kept_u) if self.method.grow_excludes_dropped else None
        explored = layout.pool_any(self.explored[i]).reshape(-1) if self.grow_unexplored_first else None
        score_u = self._tiered(score_u, kept_u, avoid, explored)
        units = torch.zeros_like(kept_u)
        units[topk_indices(score_u, k)] = True
        return layout.expand(units.view(layout.out // layout.structure.rows, -1)).reshape(-1).nonzero().squeeze(1)

    def _fill_groups(self, i: int, per_group: int, kept: torch.Tensor, drop: torch.Tensor,
                     grows: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring every group of tensor ``i`` to ``per_group`` active weights: grow the highest-scoring inactive ones
        where a group is below (``grows``: the method grows here), else keep each group's highest-scoring active
        weights of the old mask. Returns the drop and grow index sets."""
        t, layout = self.targets[i], self._layouts[i]
        device = kept.device
        kept_g = layout.to_groups(kept).sum(dim=1)
        empty = torch.empty(0, dtype=torch.long, device=device)
        if grows and per_group >= int(kept_g.max()):
            score = self.method.grow_score(self, i)
            if score is None:
                score = torch.rand(t.shape, generator=self.generator(device), device=device)
            avoid = (t.mask & ~kept) if self.method.grow_excludes_dropped else None
            explored = self.explored[i] if self.grow_unexplored_first else None
            score = self._tiered(score, kept, avoid, explored)
            picked = per_group_topk(layout.to_groups(score), per_group - kept_g)
            return drop, layout.from_groups(picked).reshape(-1).nonzero().squeeze(1)
        if per_group >= int(layout.to_groups(t.mask).sum(dim=1).max()):
            return empty, empty  # nothing to prune to, nothing to grow: the update leaves this tensor as it was
        score = self.method.drop_score(self, i).float().masked_fill(~t.mask, -math.inf)
        keep = per_group_topk(layout.to_groups(score), torch.full_like(kept_g, per_group))
        return (t.mask & ~layout.from_groups(keep)).reshape(-1).nonzero().squeeze(1), empty

    def _sample_free(self, blocked: torch.Tensor, k: int, n_free: int) -> torch.Tensor:
        """``k`` distinct flat positions drawn uniformly at random where ``blocked`` is False (exact, seeded)."""
        device = blocked.device
        if k <= 0:
            return torch.empty(0, dtype=torch.long, device=device)
        gen, n = self.generator(device), blocked.numel()
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

    def _apply_update(self, drops: list[torch.Tensor], grows: list[torch.Tensor]) -> None:
        """Install an update given as flat index sets: O(k) writes to masks, weights and optimizer state."""
        newly = []
        for i, (t, drop, grow) in enumerate(zip(self.targets, drops, grows)):
            flat_fill_(t.mask, drop, False)  # flat_fill_: masks and weights may be channels_last
            flat_fill_(t.mask, grow, True)
            reset = torch.cat([drop, grow])  # dropped weights go to zero; grown ones start at zero
            flat_fill_(t.param.detach(), reset, 0.0)
            for value in self._state_tensors(t):
                flat_fill_(value, reset, 0.0)
            if self._sharded:  # this rank's part; summed over the ranks below
                newly.append((~_fsdp.local_values_at(self.explored[i], grow)).sum())
            else:
                newly.append((~self.explored[i].reshape(-1)[grow]).sum())
            flat_fill_(self.explored[i], grow, True)
            self.counts[i] += grow.numel() - drop.numel()
            refresh_weight(t.module, t.param_name)
        if newly:
            newly = torch.stack(newly)
            if self._sharded and _dist_world() > 1:
                dist.all_reduce(newly)
            for i, c in enumerate(newly.tolist()):
                self.explored_counts[i] += int(c)
        self._place_kernels()

    def _broadcast_indices(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rank 0's index sets on every rank (sizes first, then one concatenated tensor)."""
        if _dist_world() <= 1:
            return indices
        device = self.targets[0].param.device
        sizes = torch.tensor([x.numel() for x in indices], dtype=torch.long, device=device)
        dist.broadcast(sizes, src=0)
        if dist.get_rank() == 0:
            flat = torch.cat([x.to(device) for x in indices])
        else:
            flat = torch.empty(int(sizes.sum()), dtype=torch.long, device=device)
        dist.broadcast(flat, src=0)
        return list(torch.split(flat, sizes.tolist()))

    def _apply_masks(self, new: list[torch.Tensor]) -> None:
        """Install whole new masks (initial topology, baselines): zero what changed and its optimizer state."""
        if self._sharded:
            new = [m if _fsdp.is_dtensor(m) else _fsdp.shard_like(m, t.mask) for m, t in zip(new, self.targets)]
        survivors = []
        for i, (t, m) in enumerate(zip(self.targets, new)):
            survivors.append(t.mask & m)
            t.mask.copy_(m)
            t.param.mul_(survivors[-1])
            refresh_weight(t.module, t.param_name)
            self.explored[i] |= m
        self._zero_optimizer_state(survivors)
        self._refresh_counts()

    def _refresh_counts(self) -> None:
        """Recount active and explored positions (one device sync)."""
        stats = torch.stack([torch.count_nonzero(x) for x in [t.mask for t in self.targets] + self.explored])
        stats = _fsdp.full(stats).tolist()  # sharded: partial counts, summed over the ranks here
        n = len(self.targets)
        self.counts = [int(c) for c in stats[:n]]
        self.explored_counts = [int(c) for c in stats[n:]]
        self._place_kernels()

    def _place_kernels(self) -> None:
        """Sparse kernels on the linear layers whose budget is at most ``sparse_kernel_density``, none elsewhere."""
        for t, dst_mask, count in zip(self.targets, self._dst_masks, self.counts):
            dst_mask.install_sparse_kernels(t.module, self.sparse_kernel_density, count)

    def _state_tensors(self, t: SparseTarget) -> list[torch.Tensor]:
        """Optimizer-state tensors shaped like a sparse weight (momentum, Adam moments, ...).

        State of another shape (Adafactor's factored row / column statistics) cannot be reset at single positions: a
        warning says so once.
        """
        state = self.optimizer.state.get(t.param) or {}
        out = []
        for key, v in state.items():
            if not torch.is_tensor(v) or not v.is_floating_point():
                continue
            if v.shape == t.param.shape:
                out.append(v)
            elif v.dim() >= 1 and not self._warned_state:
                self._warned_state = True
                warnings.warn(
                    f'timm_dst: optimizer state {key!r} of {t.name} (shape {tuple(v.shape)}, weight '
                    f'{tuple(t.param.shape)}) cannot be reset at grown positions ({type(self.optimizer).__name__}): '
                    'grown weights still start at zero and masked weights stay zero, but their second-moment '
                    'statistics carry history', stacklevel=3)
        return out

    def _zero_optimizer_state(self, keep: list[torch.Tensor]) -> None:
        """Zero every optimizer-state tensor shaped like a sparse weight outside ``keep`` (momentum, Adam moments);
        a fill, not a multiply, so NaN there becomes zero too."""
        for t, k in zip(self.targets, keep):
            for value in self._state_tensors(t):
                value.masked_fill_(~k, 0.0)

    def _broadcast_masks(self, masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Make masks bit-identical on all ranks (rank 0's win)."""
        if _dist_world() <= 1:
            return masks
        flat = torch.cat([m.flatten() for m in masks]).to(torch.uint8)
        dist.broadcast(flat, src=0)
        flat = flat.bool()
        return [c.view_as(m) for c, m in zip(torch.split(flat, [m.numel() for m in masks]), masks)]

    def _record(self, prune_rate: float) -> None:
        self.history.append({'step': self.step, 'prune_rate': prune_rate, 'density': self.density,
                             'itop_rate': self.itop_rate})
        _logger.debug('step %d: density %.5f R_s %.5f', self.step, self.density, self.itop_rate)

    # ------------------------------------------------------------------------------------------------------------
    # masks after a mask change made from outside (baselines: LTH rewinding, GMP)
    @torch.no_grad()
    def set_masks(self, masks: list[torch.Tensor], record: bool = True) -> None:
        """Replace the topology (exact masks given), with the same weight / state surgery as an update."""
        self._check_live()
        masks = [m.to(torch.bool) for m in masks]
        self.check_structure(masks)
        self._apply_masks(self._broadcast_masks(masks))
        if record:
            self._record(prune_rate=0.0)

    def remove(self) -> None:
        """Detach every hook the sparsifier added: the optimizer step hook, the gradient-capture hooks and the parents'
        weight-refresh hooks. The masks stay attached; to sparsify the model again, make it plain first with
        :func:`timm_dst.fold_masks` (the zeros stay)."""
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        for h in self._parent_handles:
            h.remove()
        self._parent_handles = []
        self._set_capture(False)

    @torch.no_grad()
    def _take_over_masks(self) -> None:
        """The masks were written from outside (``model.load_state_dict``): make counts, R_s, weights and optimizer
        state agree with them.

        Raises:
            ValueError: The loaded sparse weights are not finite (after taking the masks over; masked positions are
                zero again, NaN included).
        """
        for i, t in enumerate(self.targets):
            t.param.masked_fill_(~t.mask, 0.0)  # a fill, not a multiply: NaN * 0 is NaN
            if self.explored[i].device != t.mask.device:
                self.explored[i] = self.explored[i].to(t.mask.device)
            self.explored[i] |= t.mask
            refresh_weight(t.module, t.param_name)
        self._zero_optimizer_state([t.mask for t in self.targets])
        self._refresh_counts()
        bad = self._nonfinite_weights()
        if bad:
            raise ValueError(f'model.load_state_dict: the loaded sparse weights are not finite ({bad}): training from '
                             'them diverges; load finite weights')

    def _nonfinite_weights(self) -> str:
        """The sparse weights holding NaN / inf values, with their counts ('' when all are finite; a collective under
        FSDP2)."""
        counts = _count_nonfinite([t.param.detach() for t in self.targets])
        bad = [f'{t.name}: {c} value(s)' for t, c in zip(self.targets, counts) if c]
        return ', '.join(bad[:3]) + (f' and {len(bad) - 3} more tensors' if len(bad) > 3 else '')

    def _detach_masks(self) -> None:
        """Called by :func:`timm_dst.fold_masks` before it removes the masks."""
        self.remove()
        self._detached = True

    def _check_sharded_method(self) -> None:
        """Refuse, on an FSDP2-sharded model, what is not supported there (before anything is touched)."""
        if type(self.method).init_masks is not SparseMethod.init_masks:
            raise ShardedMethodError(
                f'method: {self.method_name!r} chooses its initial topology itself (init_masks), which is not '
                'supported on a model sharded with fully_shard (FSDP2)')

    def _check_targets(self) -> None:
        """Refuse, before anything is touched, targets that already carry a mask and (for methods that attach
        masks) sparse weights the optimizer does not train."""
        carrying = [t.name for t in self.targets if has_mask(t.module, t.param_name)]
        if carrying:
            raise ValueError(
                f'model: {", ".join(carrying[:5])}{" ..." if len(carrying) > 5 else ""} already carr'
                f'{"ies" if len(carrying) == 1 else "y"} a mask (the model was sparsified before): continue with that '
                'sparsifier (sp.load_state_dict restores a saved one), or call timm_dst.fold_masks(model) first '
                '(it detaches a live sparsifier and keeps the zeros) to sparsify it again')
        if not self.method.attaches:
            return
        held = {id(p) for group in self.optimizer.param_groups for p in group['params']}
        missing = [t.name for t in self.targets if id(t.param) not in held]
        if missing:
            hint = (' (under FSDP2, build the optimizer after fully_shard: sharding replaces the parameters)'
                    if _fsdp.is_dtensor(self.targets[0].param) else '')
            raise ValueError(
                f'optimizer: does not hold the sparse weight(s) {", ".join(missing[:5])}'
                f'{" ..." if len(missing) > 5 else ""} ({len(missing)} of {len(self.targets)}), so they would never '
                f'train: pass the optimizer of this model, or leave them out with exclude={hint}')

    # ------------------------------------------------------------------------------------------------------------
    # state
    def state_dict(self, dcp: bool | None = None) -> dict[str, Any]:
        """Everything needed to continue exactly: step, masks, explored masks, generator states, method state.

        Args:
            dcp: One structure at every step, as ``torch.distributed.checkpoint`` needs (it loads into the structure it
                is given): the captured dense gradients are tensors (zeros where none is held; ``dense_grads_held``
                says which are real). None: only on a model sharded with FSDP2 (whose masks are ``DTensor`` shards);
                pass True for the template of an unsharded process loading such a checkpoint.
        """
        return {
            'version': _STATE_VERSION,
            'config': dict(self.config),
            'step': self.step,
            'counts': list(self.counts),
            'masks': {t.name: t.mask.detach().cpu().clone() for t in self.targets} if self.method.attaches else {},
            'explored': {t.name: e.cpu().clone() for t, e in zip(self.targets, self.explored)},
            'history': [dict(h) for h in self.history],
            'generators': {k: g.get_state() for k, g in self._generators.items()},
            'dense_grads': self._dense_grads_state(self._sharded if dcp is None else dcp),
            'update_pending': self._update_pending,
            'dense_grads_held': [g is not None for g in self._dense_grads],
            'method': self.method.state_dict(),
            'budget_total': getattr(self, '_budget_total', sum(self.counts)),
        }

    def _dense_grads_state(self, fixed: bool) -> list[torch.Tensor | None]:
        if not fixed:
            return [g.cpu() if g is not None else None for g in self._dense_grads]
        return [g.cpu() if g is not None else torch.zeros_like(t.param, dtype=torch.float32).cpu()
                for g, t in zip(self._dense_grads, self.targets)]

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from a sparsifier of the same configuration.

        The whole state is checked before anything is restored, against its own configuration and this model: masks
        and explored masks (bool, shaped like their weights; every active position explored), counts (those of the
        masks, within the budgets the configuration gives: :meth:`SparseMethod.check_counts`), structure, step,
        generator states, history, captured gradients and method state (finite), and the model's sparse weights
        (finite: NaN at a masked position would stay NaN, since NaN * 0 is NaN). A refused state leaves the model,
        the optimizer and the sparsifier exactly as they were.

        Raises:
            ValueError: What is wrong, in one line: a state of another method, sparsity, distribution, structure or
                set of sparse tensors, a damaged or inconsistent state, or sparse weights that are not finite.
        """
        self._check_live()
        checked = self._check_state(state)
        try:  # first: a method refusing its own state (built-in methods check it before writing) leaves the rest as is
            self.method.load_state_dict(checked['method'])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f'state: the state of method {self.method_name!r} is not accepted ({e})') from None
        self.step = checked['step']
        self._update_pending = checked['update_pending']
        self._finite_cache = None
        self._nonfinite_streak, self._nonfinite_at = 0, -1
        self.history = checked['history']
        for key, g_state in checked['generators'].items():
            self.generator(key).set_state(g_state)
        if self.method.attaches:
            for i, (t, mask, explored) in enumerate(zip(self.targets, checked['masks'], checked['explored'])):
                _fsdp.copy_into_(t.mask, mask)  # a whole tensor or a shard, into either
                t.param.masked_fill_(~t.mask, 0.0)
                refresh_weight(t.module, t.param_name)
                _fsdp.copy_into_(self.explored[i], explored)
            self._zero_optimizer_state([t.mask for t in self.targets])
            self._refresh_counts()
            self._budget_total = checked['budget_total']
        self._dense_grads = [self._like_param(g, t) if g is not None and h else None
                             for g, h, t in zip(checked['dense_grads'], checked['dense_grads_held'], self.targets)]
        if self.method.attaches:
            self._set_capture(self.method.needs_dense_grad(self, self.step + 1) or (
                self._update_pending and self.method.needs_dense_grad(self, self.step)))

    def _check_state(self, state: Any) -> dict[str, Any]:
        """What :meth:`load_state_dict` restores, every part checked (nothing is written here).

        Raises:
            ValueError: Naming the first entry that is wrong.
        """
        if not isinstance(state, Mapping) or 'config' not in state:
            raise ValueError('state: not a timm_dst Sparsifier state_dict (no "config" entry)')
        needed = ['step'] + (['masks', 'explored'] if self.method.attaches else [])
        missing = [k for k in needed if k not in state]
        if missing:
            raise ValueError(f'state: a timm_dst Sparsifier state_dict lacks {", ".join(missing)} (damaged or edited)')
        version = state.get('version', _STATE_VERSION)
        if not _is_int(version) or not 1 <= version <= _STATE_VERSION:
            raise ValueError(f'state: version {version!r} is not one this timm_dst reads (1 to {_STATE_VERSION}): '
                             'a state of a newer timm_dst, or damaged')
        cfg = state['config']
        if not isinstance(cfg, Mapping):
            raise ValueError(f'state: config is a {type(cfg).__name__}, not a mapping (damaged or edited)')
        theirs = cfg.get('structure')
        if theirs != self.config['structure']:
            raise ValueError(f'state: the checkpoint was trained with structure={theirs!r}, this sparsifier keeps '
                             f'structure={self.config["structure"]!r}: give structure={theirs!r} to continue it')
        for key in ('method', 'sparsity', 'distribution', 'targets'):
            mine, theirs = self.config[key], cfg.get(key)
            if key == 'targets':
                try:
                    theirs = [(n, list(s)) for n, s in (theirs or [])]
                except (TypeError, ValueError):
                    raise ValueError('state: targets of the checkpoint are not (name, shape) pairs (damaged or '
                                     'edited)') from None
                mine = [(n, list(s)) for n, s in mine]
            if mine != theirs:
                detail = theirs if key != 'targets' else f'{len(theirs)} tensors'
                accepted = mine if key != 'targets' else f'the {len(mine)} tensors of this model'
                raise ValueError(f'state: {key} of the checkpoint ({detail}) does not match this sparsifier; '
                                 f'accepted: {accepted}')
        step = state['step']
        if not _is_int(step) or step < 0:
            raise ValueError(f'state: step {step!r} is not accepted: expected an integer >= 0 (optimizer steps taken)')
        step = int(step)
        pending = state.get('update_pending', False)
        if not isinstance(pending, bool):
            raise ValueError(f'state: update_pending {pending!r} is not accepted: expected True or False')
        method_state = state.get('method', {})
        method_state = {} if method_state is None else method_state
        if not isinstance(method_state, Mapping):
            raise ValueError(f'state: method state is a {type(method_state).__name__}, not a mapping (damaged or '
                             'edited)')
        out: dict[str, Any] = {
            'step': step, 'update_pending': pending, 'method': dict(method_state),
            'history': self._check_history(state.get('history', []), step),
            'generators': self._check_generators(state.get('generators', {})),
        }
        out['dense_grads'], out['dense_grads_held'] = self._check_dense_grads(state)
        floats = [x for x in _tensors_in(method_state) if x.is_floating_point()]
        if any(_count_nonfinite(floats)):  # a live run never folds a non-finite gradient into method state
            raise ValueError(f'state: the state of method {self.method_name!r} holds non-finite values (NaN / inf): '
                             'damaged')
        if not self.method.attaches:
            return out
        masks = out['masks'] = self._check_masks(state['masks'], 'masks')
        explored = out['explored'] = self._check_masks(state['explored'], 'explored')
        if self.structure is not None:
            try:
                self.check_structure([_fsdp.full(m) for m in masks])
            except ValueError as e:
                raise ValueError(f'state: {e}') from None
        counts = _count_nonzero(masks)
        recorded = state.get('counts')
        if recorded is not None and (not isinstance(recorded, list | tuple) or len(recorded) != len(counts)
                                     or not all(_is_int(c) for c in recorded) or list(recorded) != counts):
            raise ValueError(f'state: counts {_short(recorded)} do not match its masks, which hold {counts} active '
                             'weights (damaged or edited)')
        same = [(m, e) if _fsdp.is_dtensor(m) == _fsdp.is_dtensor(e) else (_fsdp.full(m), _fsdp.full(e))
                for m, e in zip(masks, explored)]
        unexplored = _count_nonzero([m & ~e.to(m.device) for m, e in same])
        for t, n in zip(self.targets, unexplored):
            if n:
                raise ValueError(f'state: explored {t.name} lacks {n} active position(s) of its mask (explored masks '
                                 'hold every position ever active: damaged or edited)')
        why = self.method.check_counts(self, counts, method_state)
        if why:
            raise ValueError(f'state: its masks do not fit its configuration (method {self.method_name!r}, sparsity '
                             f'{self.sparsity:g}, distribution {self.distribution!r}): {why}')
        budget_total = state.get('budget_total', self._budget_total)
        slack = 0 if self.structure is None else max(self._bounds(i)[0] for i in range(len(self.targets)))
        if not _is_int(budget_total) or abs(int(budget_total) - self._budget_total) > slack:
            raise ValueError(f'state: budget_total {budget_total!r} is not the run\'s total budget '
                             f'{self._budget_total} (damaged or edited)')
        out['budget_total'] = int(budget_total)
        bad = self._nonfinite_weights()
        if bad:
            raise ValueError(f'model: the sparse weights are not finite ({bad}): refusing to resume from damaged '
                             'weights (NaN at a masked position stays NaN, since NaN * 0 is NaN); load finite weights')
        return out

    def _check_masks(self, entries: Any, key: str) -> list[torch.Tensor]:
        """The ``masks`` / ``explored`` entry of a state, in target order: one bool tensor per sparse tensor, shaped
        like its weight."""
        if not isinstance(entries, Mapping):
            raise ValueError(f'state: {key} is a {type(entries).__name__}, not a mapping of tensor names to masks '
                             '(damaged or edited)')
        names = [t.name for t in self.targets]
        lacking = [n for n in names if n not in entries]
        extra = [str(k) for k in entries if k not in set(names)]
        if lacking or extra:
            what = (f'lacks {", ".join(lacking[:3])}' if lacking else
                    f'holds tensors this sparsifier does not have: {", ".join(extra[:3])}')
            raise ValueError(f'state: {key} {what}{" ..." if len(lacking or extra) > 3 else ""} (damaged or edited)')
        out = []
        for t in self.targets:
            m = entries[t.name]
            if not torch.is_tensor(m):
                raise ValueError(f'state: {key} {t.name} is a {type(m).__name__}, not a tensor')
            if m.dtype != torch.bool:
                raise ValueError(f'state: {key} {t.name} has dtype {m.dtype}; expected torch.bool')
            if tuple(m.shape) != tuple(t.shape):
                raise ValueError(f'state: {key} {t.name} has shape {tuple(m.shape)}; expected {tuple(t.shape)}, the '
                                 'shape of the weight')
            out.append(m)
        return out

    @staticmethod
    def _check_history(history: Any, step: int) -> list[dict[str, Any]]:
        """The ``history`` entry: records in step order, none past ``step``, densities and rates in [0, 1]."""
        if not isinstance(history, list | tuple):
            raise ValueError(f'state: history is a {type(history).__name__}, not a list (damaged or edited)')
        out, last = [], 0
        for i, h in enumerate(history):
            ok = (isinstance(h, Mapping) and _is_int(h.get('step')) and last <= h['step'] <= step
                  and all(_is_real(h.get(k)) and 0.0 <= h[k] <= 1.0 for k in ('density', 'itop_rate', 'prune_rate'))
                  and h['density'] <= h['itop_rate'])
            if not ok:
                raise ValueError(f'state: history entry {i} {_short(h)} is not accepted: expected steps in order up to '
                                 f'the state\'s step {step}, density <= itop_rate and prune_rate in [0, 1]')
            last = int(h['step'])
            out.append(dict(h))
        return out

    @staticmethod
    def _check_generators(generators: Any) -> dict[str, torch.Tensor]:
        """The ``generators`` entry: generator states of devices this process can make generators on."""
        if not isinstance(generators, Mapping):
            raise ValueError(f'state: generators is a {type(generators).__name__}, not a mapping (damaged or edited)')
        for key, value in generators.items():
            try:
                gen = torch.Generator(device=torch.device(key))
            except (RuntimeError, TypeError, ValueError) as e:
                raise ValueError(f'state: generators {key!r}: no generator of that device here ({_short(e)})') from None
            if not torch.is_tensor(value) or value.dtype != torch.uint8:
                raise ValueError(f'state: generators {key!r}: not a generator state (a uint8 tensor)')
            try:
                gen.set_state(value)
            except (RuntimeError, ValueError, TypeError) as e:
                raise ValueError(f'state: generators {key!r}: not a valid generator state ({_short(e)})') from None
        return dict(generators)

    def _check_dense_grads(self, state: Mapping[str, Any]) -> tuple[list[Any], list[bool]]:
        """The captured dense gradients (one per sparse tensor: None or a finite float tensor shaped like the weight)
        and which of them are held."""
        n = len(self.targets)
        grads = state.get('dense_grads')
        grads = [None] * n if grads is None else grads
        if not isinstance(grads, list | tuple) or len(grads) != n:
            raise ValueError(f'state: dense_grads is not a list of one entry per sparse tensor ({n}) (damaged or '
                             'edited)')
        held = state.get('dense_grads_held')
        held = [g is not None for g in grads] if held is None else held
        if not isinstance(held, list | tuple) or len(held) != n or not all(isinstance(h, bool) for h in held):
            raise ValueError(f'state: dense_grads_held is not a list of {n} booleans (damaged or edited)')
        for t, g, h in zip(self.targets, grads, held):
            if g is None:
                if h:
                    raise ValueError(f'state: dense_grads_held says {t.name} is held, dense_grads has none')
                continue
            if not torch.is_tensor(g) or not g.is_floating_point() or tuple(g.shape) != tuple(t.shape):
                got = f'shape {tuple(g.shape)}, dtype {g.dtype}' if torch.is_tensor(g) else type(g).__name__
                raise ValueError(f'state: dense_grads {t.name} is not a float tensor of shape {tuple(t.shape)} '
                                 f'({got})')
        kept = [(t, g) for t, g, h in zip(self.targets, grads, held) if h]
        for (t, _), bad in zip(kept, _count_nonfinite([g for _, g in kept])):
            if bad:
                raise ValueError(f'state: dense_grads {t.name} holds {bad} non-finite value(s) (NaN / inf): a live '
                                 'run drops such gradients (damaged)')
        return list(grads), list(held)
