"""LTH, the Lottery Ticket Hypothesis (Frankle & Carbin 2019), one-shot and global as in the ITOP paper's Section 5.

Two phases: train the dense model; then prune it once, globally, by magnitude of the *trained* weights to the target
sparsity (the global top ``round((1 - sparsity) * N)`` |w| over all sparse tensors, so ``distribution`` does not
apply), rewind every weight of the model (sparse tensors, biases, norms and buffers alike) to its initial value or to
its value at step k (late rewinding, Frankle et al. 2020), and retrain with the mask fixed (``lth``) or exploring with
SET-ITOP's settings (``lth-set-itop``: ΔT 1500, P 0.5 cosine; each tensor keeps its LTH count exactly).

Optimizer state: rewinding restarts training, so the whole state of the optimizer (momentum buffers, Adam moments and
step counts, for every parameter) is cleared when the mask is made. Learning-rate schedulers are not touched: start the
retraining phase with a fresh scheduler (the CLI starts a fresh run).

In one process::

    init = capture_weights(model)                 # at step 0 (or at step k, for late rewinding)
    ...train dense with optimizer...
    sp = lottery_ticket(model, optimizer, rewind_state=init, sparsity=0.9)   # prunes by the current weights
    ...retrain...

Across runs (the CLI): the dense run saves its rewind point with :func:`save_weights` and its trained weights; the
retraining run is ``create_sparsifier(model, optimizer, method='lth', lth_trained_state='dense/last.pth.tar',
lth_rewind_state='dense/rewind.pth', sparsity=...)``.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ..core._validate import load_file
from ..core.controller import Sparsifier
from ..core.masks import export_state_dict, unwrap_model
from ..core.method import DensePhase, SparseMethod
from ._registry import create_sparsifier, get_method_info, list_methods, register_method

__all__ = ['LTH', 'LTHSetITOP', 'load_weights', 'capture_weights', 'save_weights', 'lottery_ticket']

_logger = logging.getLogger(__name__)

WeightsSource = Mapping[str, torch.Tensor] | nn.Module | str | os.PathLike

_CHECKPOINT_KEYS = ('state_dict', 'model', 'module')


def load_weights(source: WeightsSource, arg: str = 'state') -> OrderedDict[str, torch.Tensor]:
    """Plain timm-keyed weights from a state_dict, a model, or a file.

    Files may be a ``torch.save``-d state_dict, a checkpoint dict holding one under ``'state_dict'`` / ``'model'``
    (timm and timm-dst-train checkpoints), or ``.safetensors``. Sparse checkpoints are folded (``x_orig * x_mask``)
    and ``module.`` / ``_orig_mod.`` prefixes stripped.

    Args:
        source: The weights.
        arg: Argument name used in error messages.
    """
    if isinstance(source, str | os.PathLike):
        source = load_file(source, arg)
    if isinstance(source, nn.Module):
        return export_state_dict(unwrap_model(source))
    if not isinstance(source, Mapping):
        raise ValueError(f'{arg}: expected a state_dict, a model or a path, got {type(source).__name__}')
    for key in _CHECKPOINT_KEYS:
        if key in source and isinstance(source[key], Mapping):
            source = source[key]
            break
    if not all(torch.is_tensor(v) for v in source.values()):
        raise ValueError(f'{arg}: not a state_dict (some values are not tensors)')
    return export_state_dict(source)


def capture_weights(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A CPU copy of the model's weights and buffers with plain timm keys: a rewind point (init or step k)."""
    return OrderedDict((k, v.cpu()) for k, v in export_state_dict(unwrap_model(model)).items())


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Save :func:`capture_weights` with ``torch.save`` (the dense run's rewind point, for ``lth_rewind_state``)."""
    torch.save(capture_weights(model), path)


class LTH(SparseMethod):
    """One-shot global magnitude pruning of trained dense weights, with rewinding; static afterwards.

    Args:
        lth_trained_state: The trained dense weights the mask is taken from (a state_dict, a model or a path).
            None = the model's current weights (trained dense in the same process).
        lth_rewind_state: The weights to rewind to (initialisation, or step k for late rewinding): a state_dict, a
            model or a path; it must hold every key of the model. None = the model's current weights are the rewind
            point (the model was just created with the dense run's seed and code, so it holds the same
            initialisation; passing the saved initial weights is safer). At least one of the two must be given.
    """

    explores = False
    dense_phase = DensePhase(trained_state_arg='lth_trained_state', rewind_state_arg='lth_rewind_state',
                             rewind_step_arg='lth_rewind_step', dense_method='dense')

    def __init__(
            self,
            lth_trained_state: WeightsSource | None = None,
            lth_rewind_state: WeightsSource | None = None,
    ):
        if lth_trained_state is None and lth_rewind_state is None:
            raise ValueError('lth_trained_state and lth_rewind_state are both None: give the trained dense weights '
                             '(lth_trained_state), or the weights to rewind to (lth_rewind_state) when the model '
                             'holds the trained weights')
        self.trained_state = lth_trained_state
        self.rewind_state = lth_rewind_state

    def init_masks(self, sp: Sparsifier) -> list[torch.Tensor]:
        # called before the masks are attached: t.param is still the plain dense weight
        if self.trained_state is not None:
            trained = load_weights(self.trained_state, 'lth_trained_state')
            weights = []
            for t in sp.targets:
                w = trained.get(t.name)
                if w is None or tuple(w.shape) != t.shape:
                    got = 'missing' if w is None else f'shape {tuple(w.shape)}'
                    raise ValueError(f'lth_trained_state: {t.name} is {got}; expected shape {t.shape} '
                                     '(weights of another model?)')
                weights.append(w.to(t.param.device))
        else:
            weights = [t.param.detach() for t in sp.targets]
        masks = sp.global_topk_masks([w.abs() for w in weights], sum(sp.counts))
        del weights
        # keep a path (reprs, CLI args) but drop in-memory weights
        self.trained_state = self.trained_state if isinstance(self.trained_state, str | os.PathLike) else None
        return masks

    def prepare(self, sp: Sparsifier) -> None:
        # the mask is taken: rewind, and restart training (no momentum / Adam moments / step counts survive)
        if self.rewind_state is not None:
            self._rewind(sp.model, load_weights(self.rewind_state, 'lth_rewind_state'))
        else:
            _logger.info('lth: no lth_rewind_state; the model\'s current weights are the rewind point')
        sp.optimizer.state.clear()
        self.rewind_state = self.rewind_state if isinstance(self.rewind_state, str | os.PathLike) else None

    @staticmethod
    @torch.no_grad()
    def _rewind(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            detail = '; '.join(f'{name}: {", ".join(keys[:5])}{" ..." if len(keys) > 5 else ""}' for name, keys in
                               (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)) if keys)
            raise ValueError(f'lth_rewind_state does not match the model ({detail})')
        model.load_state_dict(state, strict=True)  # in place: parameters keep their identity for the optimizer

    def extra_repr(self) -> str:
        return f'lth_trained_state={self.trained_state!r}, lth_rewind_state={self.rewind_state!r}'


class LTHSetITOP(LTH):
    """The lottery-ticket mask (rewound weights) as the starting topology, then SET exploration all run long."""

    explores = True


def lottery_ticket(
        model: nn.Module,
        optimizer: Any,
        trained_state: WeightsSource | None = None,
        rewind_state: WeightsSource | None = None,
        *,
        method: str = 'lth',
        **kwargs: Any,
) -> Sparsifier:
    """Prune a dense model once (global magnitude), rewind it and return the sparsifier for the retraining phase.

    Args:
        model: The dense model (holding the trained weights when ``trained_state`` is None).
        optimizer: Its optimizer; its state is cleared (rewinding restarts training).
        trained_state: Trained dense weights; None = the model's current weights.
        rewind_state: Weights to rewind to (from :func:`capture_weights` / :func:`save_weights` at step 0 or k);
            None = the model's current weights.
        method: ``'lth'`` (static retraining) or ``'lth-set-itop'``.
        **kwargs: Further :func:`timm_dst.create_sparsifier` keywords (``sparsity``, ``total_steps``, ...).
    """
    accepted = [n for n in list_methods() if issubclass(get_method_info(n).cls, LTH)]
    if method not in accepted:
        raise ValueError(f'method={method!r}: accepted: {", ".join(accepted)}')
    return create_sparsifier(model, optimizer, method=method, lth_trained_state=trained_state,
                             lth_rewind_state=rewind_state, **kwargs)


register_method('lth', LTH, description='lottery ticket: one-shot global magnitude of trained dense weights, rewound, '
                'static', prune_rate_schedule='constant')
register_method('lth-set-itop', LTHSetITOP, description='the lottery-ticket mask, then SET-ITOP exploration',
                update_interval=1500, prune_rate=0.5, prune_rate_schedule='cosine')
