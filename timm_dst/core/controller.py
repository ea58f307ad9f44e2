"""The controller: lifecycle, hooks, read-outs, update orchestration and state of a sparse model.

``Sparsifier`` keeps a model sparse while an ordinary loop trains it. It orchestrates parts it calls (docs/design.md,
"The controller's parts"): construction checks (:mod:`~timm_dst.core._setup`), the dense-gradient capture
(:mod:`~timm_dst.core.capture`; FSDP2's in :mod:`~timm_dst.distributed.fsdp`), the selectors chosen once per tensor
(:mod:`~timm_dst.core.select`), budgets and initial masks (:mod:`~timm_dst.core.budgets`), the writer of masks, weights
and optimizer state (:mod:`~timm_dst.core.writer`), rank sync (:mod:`~timm_dst.distributed.sync`), the non-finite
guard (:mod:`~timm_dst.core.guard`), saved-state checks (:mod:`~timm_dst.core.state`) and its hooks and copies
(:mod:`~timm_dst.core.hooks`).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ..distributed import fsdp as _fsdp
from ..distributed import sync as _sync
from ..kernels.sparse_linear import DEFAULT_MAX_DENSITY
from . import _setup
from . import budgets as _budgets
from . import hooks as _hooks
from ._setup import MASK_INITS
from ._validate import check_int
from .capture import GradCapture, LocalCapture
from .guard import NonFiniteGradientError, NonFiniteGuard
from .hooks import _AfterModelLoad, _ParentRefresh  # noqa: F401  (old pickles name them here)
from .masks import DSTMask, unwrap_model
from .method import SparseMethod
from .schedules import prune_rate_at
from .select import ElementPlan, ElementSelector, StructuredPlan, drop_lowest, make_selector, topk_indices
from .state import STATE_VERSION, check_state, make_state, restore
from .structure import Structure
from .surface import MethodSurface
from .targets import SparseTarget
from .writer import Writer

__all__ = ['Sparsifier', 'MASK_INITS', 'NonFiniteGradientError', 'unwrap_optimizer', 'topk_indices']

_logger = logging.getLogger(__name__)

_STATE_VERSION = STATE_VERSION


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` (Accelerate's ``AcceleratedOptimizer`` lacks step hooks)."""
    while not isinstance(optimizer, torch.optim.Optimizer) or (
            hasattr(optimizer, 'optimizer') and isinstance(optimizer.optimizer, torch.optim.Optimizer)):
        inner = getattr(optimizer, 'optimizer', None)
        if inner is None:
            raise ValueError(f'optimizer: expected a torch.optim.Optimizer (or a wrapper of one), got {optimizer!r}')
        optimizer = inner
    return optimizer


class Sparsifier(MethodSurface):
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
        distribution: Per-tensor density rule: a registered distribution (built in: ``'erk'``, ``'er'``,
            ``'uniform'``; :func:`timm_dst.register_distribution` adds more).
        update_interval: ΔT, optimizer steps between topology updates.
        total_steps: Optimizer steps of the whole run (needed by fractional ``update_end`` and decaying schedules).
        defer_total_steps: The run's length is given later, through :meth:`set_total_steps` before the first optimizer
            step (timm's train.py knows it only from its scheduler set-up, after the EMA copy and DDP exist).
        prune_rate: Initial fraction P of each tensor's active weights replaced per update.
        prune_rate_schedule: A registered prune-rate schedule, decaying the prune rate to ``prune_rate_min`` at
            ``update_end`` (built in: ``'cosine'``, ``'linear'``, ``'constant'``;
            :func:`timm_dst.register_prune_rate_schedule` adds more).
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
            self, model: nn.Module, optimizer: Any, method: SparseMethod, *,
            method_name: str | None = None, sparsity: float | None = None, distribution: str = 'erk',
            update_interval: int = 100, total_steps: int | None = None, prune_rate: float = 0.5,
            prune_rate_schedule: str = 'cosine', prune_rate_min: float = 0.0, update_start: int | float = 0,
            update_end: int | float | None = None, update_milestones: Sequence[tuple[int, int]] | None = None,
            grow_unexplored_first: bool = False, mask_init: str = 'random', include: str | Sequence[str] | None = None,
            exclude: str | Sequence[str] | None = None, dense_first_layer: bool = False,
            dense_classifier: bool = False, remask_every_step: bool | None = None, seed: int = 0,
            sparse_kernel_density: float = DEFAULT_MAX_DENSITY, defer_total_steps: bool = False,
            structure: str | Structure | None = None, max_nonfinite_steps: int | None = 20,
    ):
        o = _setup.checked_options(model, method, {k: v for k, v in locals().items()
                                                   if k not in ('self', 'model', 'method', 'optimizer')})
        self.model, self.optimizer, self.method = unwrap_model(model), unwrap_optimizer(optimizer), method
        self.method_name = method_name or type(method).__name__.lower()
        self.sparsity = float(o['sparsity']) if method.attaches else 0.0
        self.distribution, self.mask_init, self.seed = distribution, mask_init, int(o['seed'])
        self.total_steps = int(o['total_steps']) if o['total_steps'] is not None else None
        self.prune_rate_initial, self.prune_rate_schedule = float(o['prune_rate']), prune_rate_schedule
        self.prune_rate_min = float(o['prune_rate_min'])
        self.grow_unexplored_first = bool(grow_unexplored_first)
        self._update_span = (update_start, update_end)
        self._total_steps_pending = bool(defer_total_steps) and self.total_steps is None
        self.schedule, self.prune_rate_end = _setup.make_schedule(method, o, self.total_steps,
                                                                  self._total_steps_pending, update_milestones)
        self.targets: list[SparseTarget]
        self.targets, self._sharded, self.sparse_kernel_density = _setup.select_targets(
            self.model, self.optimizer, method, self.method_name, o)
        self.structure: Structure | None = o['structure']
        self._init_parts(o['max_nonfinite_steps'])
        _setup.warn_misfits(self.structure, self.targets, self._selectors)
        if not method.attaches:
            self.counts = [t.numel for t in self.targets]
            self.explored_counts = list(self.counts)
            self.explored: list[torch.Tensor] = []
            return
        _hooks.attach(self, self._choose_masks())
        _hooks.install(self, remask_every_step)

    # ------------------------------------------------------------------------------------------------------------
    # construction, in steps
    def _init_parts(self, max_nonfinite_steps: int | None) -> None:
        """The parts (selectors and plan, capture, guard, writer), the configuration and the run-time state."""
        structure, n = self.structure, len(self.targets)
        # the selector of each tensor, chosen once from its layout; the plan of an update, once for the controller
        self._selectors: list[ElementSelector] = [
            make_selector(i, structure.layout(t.shape) if structure is not None else None, t.numel)
            for i, t in enumerate(self.targets)]
        self._plan = StructuredPlan() if structure is not None else ElementPlan()
        self._capture: GradCapture = _fsdp.ShardedCapture(n) if self._sharded else LocalCapture(n)
        self._guard, self._writer = NonFiniteGuard(max_nonfinite_steps), Writer()
        self.config = {'method': self.method_name, 'sparsity': self.sparsity, 'distribution': self.distribution,
                       'targets': [(t.name, list(t.shape)) for t in self.targets],
                       'structure': structure.spec if structure is not None else None}
        self.step, self.history, self._generators = 0, [], {}
        self._step_hook, self._parent_handles = None, []
        self.total_numel = sum(t.numel for t in self.targets)
        self._dst_masks: list[DSTMask] = []  # the attached pruning hook (DSTMask) of each target
        self._update_pending = False  # an update postponed by a non-finite gradient runs at the next real step
        self._detached = False  # set by fold_masks: the masks are gone

    def _choose_masks(self) -> list[torch.Tensor]:
        """Budgets and the initial masks (the method's, else ``mask_init``'s), the same on every rank."""
        self.counts = self.layer_budgets(self.sparsity)
        self._budget_total = sum(self.counts)  # set again from the initial masks below
        _budgets.warn_empty(self.targets, self.counts, self.sparsity)
        masks = self.method.init_masks(self)
        if masks is None:
            masks = _budgets.initial_masks(self.targets, self._selectors, self.counts, self.mask_init,
                                           self.generator('cpu'), self._sharded, self.global_topk_masks)
        if not self._sharded:
            return _sync.broadcast_masks(masks)
        # each rank keeps its rows; every rank drew the same masks (same generator, gathered weights)
        masks = [m if _fsdp.is_dtensor(m) else _fsdp.shard_like(m, t.param) for m, t in zip(masks, self.targets)]
        _fsdp.adopt_renamed_params(self.model, self.targets, check_only=True)  # FSDP2 manages every sparse weight
        return masks

    # ------------------------------------------------------------------------------------------------------------
    # public read-outs
    @property
    def density(self) -> float:
        """Realised global density of the sparse tensors (exact counts, no device sync)."""
        return sum(self.counts) / self.total_numel

    @property
    def model_density(self) -> float:
        """Active parameters / all parameters of the model: the sparse tensors count their active weights, every other
        parameter (excluded and dense layers, biases, norms) counts whole; global sizes (``numel`` of a DTensor)."""
        sparse = {id(t.param) for t in self.targets}
        dense = sum(p.numel() for p in self.model.parameters() if id(p) not in sparse)
        return (sum(self.counts) + dense) / max(self.total_numel + dense, 1)

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
             'explored': e / t.numel, 'structure': sel.spec}
            for t, c, e, sel in zip(self.targets, self.counts, self.explored_counts, self._selectors)
        ]

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
    # the parts' state, under the names tests and older code use
    _layouts = property(lambda self: [s.layout for s in self._selectors], doc='Each tensor\'s Layout (None: none).')
    _dense_grads = property(lambda self: self._capture.grads, lambda self, v: self._capture.load(v),
                            doc='The capture\'s buffers (None where nothing was captured).')
    _grad_marks = property(lambda self: getattr(self._capture, 'marks', [None] * len(self.targets)))
    _capture_handles = property(lambda self: self._capture.handles, doc='The capture hooks (truthy while capturing).')
    max_nonfinite_steps = property(lambda self: self._guard.limit, lambda self, v: setattr(self._guard, 'limit', v),
                                   doc='Stop after this many checked non-finite steps in a row (None: never).')
    _nonfinite_streak = property(lambda self: self._guard.streak, lambda self, v: setattr(self._guard, 'streak', v))

    # ------------------------------------------------------------------------------------------------------------
    # structure (docs/structured.md): budgets and masks in whole units of each tensor's selector
    def _misfit_names(self) -> list[str]:
        return [t.name for t, sel in zip(self.targets, self._selectors) if sel.layout is None]

    def _bounds(self, i: int) -> tuple[int, int]:
        """(quantum, cap) of tensor ``i``: the step of its active count and the most it may hold."""
        return self._selectors[i].quantum, self._selectors[i].cap

    # ------------------------------------------------------------------------------------------------------------
    # hooks
    def set_total_steps(self, total_steps: int) -> None:
        """Set the optimizer steps of the whole run after attaching (with ``defer_total_steps=True``): fractional
        ``update_start`` / ``update_end`` and the prune-rate decay are resolved against it."""
        self.total_steps = check_int('total_steps', total_steps, minimum=1)
        self._total_steps_pending = False
        start, end = _setup.resolve_span(self._update_span, self.total_steps)
        self.schedule.start, self.schedule.end = start, end
        self.prune_rate_end = end if end is not None else self.total_steps

    # ------------------------------------------------------------------------------------------------------------
    # copies and pickles
    def __copy__(self) -> Sparsifier:
        raise TypeError('Sparsifier: a shallow copy would share the model, optimizer and masks with this sparsifier '
                        'and hook them twice; copy.deepcopy((model, optimizer, sparsifier)) copies all three, or save '
                        'sparsifier.state_dict()')

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` copy: the whole controller, with its model and optimizer; a copy is a
        working controller of the copied model and optimizer (:func:`~timm_dst.core.hooks.copy_state`).

        Raises:
            TypeError: The model is sharded with FSDP2 (``fully_shard``): its shards cannot be copied in one process.
        """
        return _hooks.copy_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Take control of the copied model and optimizer (:func:`~timm_dst.core.hooks.restore_state`); a sparsifier
        whose hooks were removed (:meth:`remove`) or whose masks were folded stays so."""
        _hooks.restore_state(self, state)

    # ------------------------------------------------------------------------------------------------------------
    # dense gradients (the capture part)
    def _set_capture(self, on: bool) -> None:
        self._capture.stop()
        for dst_mask in self._dst_masks:  # the dense gradient needs the dense kernels
            dst_mask.dense_grad_wanted = on
        if on:
            self._capture.start(self.targets, self._dst_masks)

    # ------------------------------------------------------------------------------------------------------------
    # topology update
    def _device(self) -> torch.device:
        return self.targets[0].param.device

    def _gradients_finite(self) -> bool:
        tensors = [t.param.grad for t in self.targets if t.param.grad is not None]
        return _sync.all_finite(tensors + [g for g in self._capture.grads if g is not None], self._device())

    def _step_finite(self) -> bool:
        """Whether this step's gradients (of the sparse weights, and the captured dense ones) are finite; one agreed
        check per step."""
        return self._guard.step_finite(self.step, self._gradients_finite)

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
        drops, grows = self._plan.topology(self, self.method.drop_counts(self, rate))
        n = len(self.targets)
        both = _sync.broadcast_indices(drops + grows, self._device())
        self._writer.apply_update(self.optimizer, self.targets, self.explored, self.counts, self.explored_counts,
                                  both[:n], both[n:], self._sharded)
        self._place_kernels()
        self.clear_dense_grads()
        self.method.after_update(self)
        self._record(prune_rate=rate)

    def _drop_lowest(self, i: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices of the ``k`` lowest-scoring active weights of tensor ``i``, and the mask left after dropping."""
        return drop_lowest(self, i, k)

    # ------------------------------------------------------------------------------------------------------------
    # writes (the writer part)
    def _refresh_counts(self) -> None:
        """Recount active and explored positions (one device sync)."""
        self.counts, self.explored_counts = self._writer.recount(self.targets, self.explored)
        self._place_kernels()

    def _place_kernels(self) -> None:
        """Sparse kernels on the linear layers whose budget is at most ``sparse_kernel_density``, none elsewhere."""
        self._writer.place_kernels(self.targets, self._dst_masks, self.counts, self.sparse_kernel_density)

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
        self._writer.apply_masks(self.optimizer, self.targets, self.explored, _sync.broadcast_masks(masks),
                                 self._sharded)
        self._refresh_counts()
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

    def _detach_masks(self) -> None:
        """Called by :func:`timm_dst.fold_masks` before it removes the masks."""
        self.remove()
        self._detached = True

    # ------------------------------------------------------------------------------------------------------------
    # state
    def state_dict(self, dcp: bool | None = None) -> dict[str, Any]:
        """Everything needed to continue exactly: step, masks, explored masks, generator states, method state.

        Args:
            dcp: One structure at every step, as ``torch.distributed.checkpoint`` needs (it loads into the structure it
                is given): the captured dense gradients are tensors (zeros where none is held; ``dense_grads_held``
                says which are real) for the methods that read them (``uses_dense_grads``), None for the others.
                None: only on a model sharded with FSDP2 (whose masks are ``DTensor`` shards); pass True for the
                template of an unsharded process loading such a checkpoint.
        """
        return make_state(self, self._sharded if dcp is None else dcp)

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
        restore(self, check_state(self, state))
