"""The optimizer step hook: what runs after every real optimizer step (docs/design.md, invariant 7).

:class:`StepHook` is registered with ``optimizer.register_step_post_hook`` on the inner optimizer, so accumulation
micro-steps and steps a ``GradScaler`` skips do not count. Per step it advances the controller's step, re-masks when
the optimizer does not keep zeros at zero, drops a non-finite dense-gradient window, calls the method's ``on_step``,
runs a due topology update (``Sparsifier.update``), checks the gradients (every ΔT, every step once one was
non-finite), sets the next backward's capture and follows non-finite steps through the guard. This module imports
rank sync; never the controller (it is handed the controller it serves).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from ..distributed.sync import all_finite

__all__ = ['StepHook']


class StepHook:
    """The controller's optimizer step post-hook (a class, so the controller is reached without a bound method)."""

    def __init__(self, sp: Any):
        self.sp = sp

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        sp = self.sp
        if sp._total_steps_pending:
            raise RuntimeError('Sparsifier(defer_total_steps=True): call set_total_steps() before the first '
                               'optimizer step')
        sp.step += 1
        if sp.remask_every_step:
            with torch.no_grad():
                torch._foreach_mul_(sp._origs, [t.mask for t in sp.targets])  # buffers: looked up fresh
        due = sp._update_pending or sp.schedule.is_update_step(sp.step)
        capturing = sp._capture.active
        # capture on/off is the same on every rank (the schedule decides), so the agreed check runs on all of them
        if capturing and not all_finite([g for g in sp._capture.grads if g is not None], sp._device()):
            sp._guard.cache = (sp.step, False)
            # never fold a non-finite window into method state (SNFS momentum) or grow from it (RigL)
            if not due:  # on an update step, update() says it
                warnings.warn(f'timm_dst: non-finite gradient at step {sp.step}: its dense gradients are dropped',
                              stacklevel=2)
            sp.clear_dense_grads()
        sp.method.on_step(sp)
        if due:
            sp.update()
        checked = self._check(sp)
        # an update postponed by a non-finite gradient runs at the next step, with a fresh capture when it uses one
        capture = sp.method.needs_dense_grad(sp, sp.step + 1) or (sp._update_pending and capturing)
        if capture != sp._capture.active:
            sp._set_capture(capture)
        sp._guard.cache = None  # valid within one step only: an update called by hand checks afresh
        if checked is not None:
            self.note_finite(checked[1])

    @staticmethod
    def _check(sp: Any) -> tuple[int, bool] | None:
        """This step's check (made by the update, or here: every ΔT, every step once one was non-finite)."""
        checked = sp._guard.cached(sp.step)
        if checked is None and (sp._guard.streak or sp.step % sp.schedule.interval == 0):
            # followed step by step once non-finite; else every ΔT, also where no update checks (a static method,
            # before update_start, after update_end)
            checked = (sp.step, sp._step_finite())
            if not checked[1] and not sp._guard.streak:
                limit = sp._guard.limit
                warnings.warn(f'timm_dst: non-finite gradient at step {sp.step}: masked weights are zeroed again'
                              + (f'; training stops after {limit} such steps in a row (max_nonfinite_steps)'
                                 if limit is not None else ''), stacklevel=3)
        return checked

    @torch.no_grad()
    def note_finite(self, finite: bool) -> None:
        """Follow the checked optimizer steps whose gradients are non-finite: the masked weights and their optimizer
        state go back to zero (the step wrote NaN there too, since NaN * 0 is NaN), and after ``max_nonfinite_steps``
        of them in a row training stops."""
        sp = self.sp
        if sp._guard.note(sp.step, finite):
            sp._writer.zero_masked(sp.optimizer, sp.targets)
            sp._guard.raise_if_over(sp.step)
