"""Hooks on the controlled model, and copies of the controller.

* :class:`_ParentRefresh`: a forward pre-hook on the parent of a sparse module whose forward reads the child's weight
  (BEiT / EVA / Swin V2 attention); on copies of the model it sets the child's weight to ``orig * mask``.
* :class:`_AfterModelLoad`: a ``load_state_dict`` post-hook: masks loaded with ``model.load_state_dict`` are taken
  over by the controller.
* :func:`copy_state` / :func:`restore_state`: the bodies of ``Sparsifier.__getstate__`` / ``__setstate__``, so that
  ``copy.deepcopy`` and pickles of (model, optimizer, sparsifier) keep training (docs/reliability.md); a pickle of an
  older layout (capture, guard and writer state as the controller's own attributes) is brought up to date.

Both hook classes are classes, not closures, so that ``torch.save(model)`` pickles the model; their names stay
importable from :mod:`timm_dst.core.controller` (and the deprecated ``timm_dst.sparsifier``) for old pickles. This
module imports the mask glue and the controller's parts; never the controller.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn

from ..distributed import fsdp as _fsdp
from .capture import LocalCapture
from .guard import NonFiniteGuard
from .masks import attach_masks, effective_weight
from .select import ElementPlan, StructuredPlan, make_selector
from .state import nonfinite_weights
from .step import StepHook
from .writer import Writer

__all__ = ['parent_of', 'parent_hooks', 'attach', 'install', 'take_over', 'copy_state', 'restore_state']

# optimizers whose update is exactly zero where weight, gradient and state are zero: masked weights stay zero
# without re-masking every step
_ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)


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

    def __init__(self, sparsifier: Any):
        self.sparsifier: weakref.ref | None = weakref.ref(sparsifier)

    def __getstate__(self) -> dict:
        return {'sparsifier': None}

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        sp = self.sparsifier() if self.sparsifier is not None else None
        if sp is not None and sp.model is module and not sp._detached:
            take_over(sp)


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """The module owning the module of the parameter ``name``, and the child's name relative to it."""
    name = name.rsplit('.', 1)[0] if '.' in name else ''
    if not name:
        return None
    parent, _, child = name.rpartition('.')
    return model.get_submodule(parent), child


def parent_hooks(sp: Any) -> list[Any]:
    """Install the controller's hooks on its model: the load-state-dict post-hook, and a refresh pre-hook on the parent
    of every sparse module. Returns their handles."""
    handles = [sp.model.register_load_state_dict_post_hook(_AfterModelLoad(sp))]
    # some timm blocks read a child's weight in their own forward (BEiT / EVA / Swin V2 attention:
    # F.linear(x, self.qkv.weight, qkv_bias)), so the child's prune hook never runs. On the controlled model the
    # child's weight is its `_orig` parameter anyway; copies of it (timm's EMA) need `orig * mask` from the parent
    for t in sp.targets:
        owner = parent_of(sp.model, t.name)
        if owner is not None:
            handles.append(owner[0].register_forward_pre_hook(_ParentRefresh(owner[0], owner[1], t.param_name)))
    return handles


def attach(sp: Any, masks: list[torch.Tensor]) -> None:
    """``method.prepare``, then every mask attached (all or none), counted and explored."""
    sp.method.prepare(sp)
    # every check is done: attach all masks or none
    sp._dst_masks = attach_masks([(t.module, t.param_name, m) for t, m in zip(sp.targets, masks)])
    for m, sel in zip(sp._dst_masks, sp._selectors):
        m.controller = weakref.ref(sp)
        m.root = weakref.ref(sp.model)
        m.structure = sel.spec
    if sp._sharded:
        for m in sp._dst_masks:
            m.sharded = True
        _fsdp.adopt_renamed_params(sp.model, sp.targets)
        sp.generator(sp._device())  # in the state from the start: a DCP load fills the state it is given
    sp._writer.zero_optimizer_state(sp.optimizer, sp.targets, [t.mask for t in sp.targets])
    sp.explored = [t.mask.detach().clone() for t in sp.targets]
    sp._refresh_counts()
    sp._budget_total = sum(sp.counts)  # the total a structured budget-moving method keeps (in whole units)


def install(sp: Any, remask_every_step: bool | None) -> None:
    """The optimizer step hook, the model's load and parent hooks, the first capture and history entry."""
    if remask_every_step is None:
        remask_every_step = type(sp.optimizer) not in _ZERO_PRESERVING
    sp.remask_every_step = bool(remask_every_step)
    sp._origs = [t.param for t in sp.targets]  # parameters keep their identity across module.to()
    sp._step_hook = sp.optimizer.register_step_post_hook(StepHook(sp))
    sp._parent_handles.extend(parent_hooks(sp))
    sp._set_capture(sp.method.needs_dense_grad(sp, 1))
    sp._record(prune_rate=0.0)


@torch.no_grad()
def take_over(sp: Any) -> None:
    """The masks were written from outside (``model.load_state_dict``): make counts, R_s, weights and optimizer state
    agree with them.

    Raises:
        ValueError: The loaded sparse weights are not finite (after taking the masks over; masked positions are zero
            again, NaN included).
    """
    sp._writer.take_over(sp.optimizer, sp.targets, sp.explored)
    sp._refresh_counts()
    bad = nonfinite_weights(sp.targets)
    if bad:
        raise ValueError(f'model.load_state_dict: the loaded sparse weights are not finite ({bad}): training from '
                         'them diverges; load finite weights')


def copy_state(sp: Any) -> dict[str, Any]:
    """What ``copy.deepcopy`` and ``pickle`` copy of a controller (see ``Sparsifier.__getstate__``)."""
    if sp._sharded:
        raise TypeError('Sparsifier: a sparsifier of a model sharded with fully_shard (FSDP2) cannot be copied or '
                        'pickled; save sparsifier.state_dict() with torch.distributed.checkpoint and load it into '
                        'a new sparsifier')
    state = dict(sp.__dict__)
    # hooks on the optimizer and on tensors are not copied with them (torch drops them): set again on the copy
    state['_step_hook'] = sp._step_hook is not None
    state['_capturing'] = sp._capture.active  # the capture copies its gradients, not its hooks
    state['_guard'] = NonFiniteGuard(sp._guard.limit)
    state['_guard'].streak, state['_guard'].at = sp._guard.streak, sp._guard.at
    return state


def _migrate(state: dict[str, Any]) -> None:
    """Bring the state of a controller pickled before its parts existed up to date (in place)."""
    if '_capture' not in state:
        state['_capture'] = LocalCapture(len(state['targets']))
        state['_capture'].grads = list(state.pop('_dense_grads', state['_capture'].grads))
        state.pop('_grad_marks', None)
        state['_capturing'] = bool(state.pop('_capture_handles', False))
    if '_guard' not in state:
        guard = state['_guard'] = NonFiniteGuard(state.pop('max_nonfinite_steps', 20))
        guard.streak, guard.at = state.pop('_nonfinite_streak', 0), state.pop('_nonfinite_at', -1)
        state.pop('_finite_cache', None)
    if '_writer' not in state:
        state['_writer'] = Writer()
        state['_writer'].warned_state = bool(state.pop('_warned_state', False))
    if '_selectors' not in state:
        layouts = state.pop('_layouts', [None] * len(state['targets']))
        state['_selectors'] = [make_selector(i, lay, t.numel) for i, (lay, t) in enumerate(zip(layouts,
                                                                                              state['targets']))]
        state['_plan'] = StructuredPlan() if state.get('structure') is not None else ElementPlan()


def restore_state(sp: Any, state: dict[str, Any]) -> None:
    """Take control of the copied model and optimizer (see ``Sparsifier.__setstate__``)."""
    _migrate(state)
    hooked, capturing = state.pop('_step_hook'), state.pop('_capturing')
    sp.__dict__.update(state)
    sp._step_hook = None
    if not sp.method.attaches or sp._detached:
        return
    for t, dst_mask in zip(sp.targets, sp._dst_masks):
        dst_mask.adopt(t.module)
        dst_mask.controller = weakref.ref(sp)
        dst_mask.root = weakref.ref(sp.model)
    owners = {id(m._forward_pre_hooks): m for m in sp.model.modules()}
    for handle in sp._parent_handles:
        hooks = handle.hooks_dict_ref()
        hook = hooks.get(handle.id) if hooks is not None else None
        if isinstance(hook, _AfterModelLoad):
            hook.sparsifier = weakref.ref(sp)
        elif isinstance(hook, _ParentRefresh) and id(hooks) in owners:
            hook.controlled = weakref.ref(owners[id(hooks)])
    if hooked:
        sp._step_hook = sp.optimizer.register_step_post_hook(StepHook(sp))
    sp._set_capture(capturing)
