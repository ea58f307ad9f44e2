"""Inference and training FLOPs of a sparse model.

Conventions (see ``docs/flops.md``):

* FLOPs are ``torch.utils.flop_counter`` FLOPs: a multiply-add counts 2, only matmul / conv / attention kernels are
  counted (element-wise ops, norms and activations are not), per input sample.
* Sparse inference FLOPs: each layer's dense FLOPs (measured per module with ``FlopCounterMode``) scaled by the density
  of its sparse weight; every other layer at full cost. ``f_S = f_D - sum_l f_l (1 - d_l)``.
* Training FLOPs per optimizer step and sample (the RigL paper's accounting, Evci et al. 2020, Appendix H):
  forward ``f_S``, backward ``2 f_S`` (gradients of the activations and of the active weights), at the densities in
  force at that step. On a step whose backward captures the dense gradient of the sparse weights (RigL: the step
  before each topology update; SNFS: every step while it explores) the weight-gradient half is dense: the backward
  costs ``f_S + f_D``. Dense training costs ``3 f_D`` per step and sample. Mask updates themselves (top-k, sorting)
  are not counted.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..kernels.sparse_linear import dense_kernels
from .masks import unwrap_model

__all__ = ['layer_flops', 'inference_flops', 'TrainingFlops']


def _example_input(model: nn.Module, input_size: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    if torch.is_tensor(input_size):
        return input_size
    if input_size is None:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        input_size = cfg.get('input_size')
        if input_size is None:
            raise ValueError('input_size: give the (C, H, W) input size (the model has no pretrained_cfg input_size)')
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device('cpu'), torch.float32
    return torch.zeros(1, *tuple(int(s) for s in input_size), device=device, dtype=dtype)


def layer_flops(
        model: nn.Module,
        input_size: Sequence[int] | torch.Tensor | None = None,
) -> tuple[int, dict[str, int]]:
    """Dense forward FLOPs of ``model`` per sample, total and per module.

    Args:
        model: The model (masks attached or not: masked layers are still counted at their dense cost).
        input_size: ``(C, H, W)`` of one sample, or an example batch (FLOPs are divided by its batch size). None: the
            model's ``pretrained_cfg['input_size']``.

    Returns:
        ``(total, per_module)``: the total, and the FLOPs of every module by its ``named_modules`` name (a module's
        count includes its children; a module called twice counts twice).
    """
    model = unwrap_model(model)
    x = _example_input(model, input_size)
    batch = x.shape[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), dense_kernels(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == 'Global':
            continue
        name = key[len(root) + 1:] if key.startswith(root + '.') else ('' if key == root else key)
        per_module[name] = per_module.get(name, 0) + int(sum(ops.values()))
    total = int(counter.get_total_flops())
    return total // batch, {k: v // batch for k, v in per_module.items()}


def _target_densities(model: nn.Module, sparsifier: Any | None) -> list[tuple[str, str, float]]:
    """``(module name, parameter name, density)`` of every sparse tensor."""
    if sparsifier is not None:
        return [(t.name.rsplit('.', 1)[0] if '.' in t.name else '', t.param_name, c / t.numel)
                for t, c in zip(sparsifier.targets, sparsifier.counts)]
    out = []
    for mod_name, module in unwrap_model(model).named_modules():
        for buf_name, buf in module.named_buffers(recurse=False):
            if buf_name.endswith('_mask') and hasattr(module, buf_name[:-5] + '_orig'):
                out.append((mod_name, buf_name[:-5], float(buf.float().mean())))
    return out


def _sparse_flops(dense_total: int, target_flops: Sequence[int], densities: Sequence[float]) -> float:
    return dense_total - sum(f * (1.0 - d) for f, d in zip(target_flops, densities))


def inference_flops(
        model: nn.Module,
        input_size: Sequence[int] | torch.Tensor | None = None,
        sparsifier: Any | None = None,
) -> dict[str, Any]:
    """Inference FLOPs per sample of the sparse model.

    Args:
        model: The model.
        input_size: ``(C, H, W)`` or an example batch (see :func:`layer_flops`).
        sparsifier: Its :class:`~timm_dst.Sparsifier` (densities from its exact counts). None: densities from the
            ``<name>_mask`` buffers attached to the model (a dense model without masks gives ratio 1).

    Returns:
        ``{'sparse': f_S, 'dense': f_D, 'ratio': f_S / f_D, 'layers': [{'name', 'dense', 'density', 'sparse'}, ...]}``
        with one ``layers`` row per sparse tensor.
    """
    dense, per_module = layer_flops(model, input_size)
    layers = []
    for mod_name, p_name, density in _target_densities(model, sparsifier):
        f = per_module.get(mod_name, 0)
        layers.append({'name': f'{mod_name}.{p_name}' if mod_name else p_name, 'dense': f, 'density': density,
                       'sparse': f * density})
    sparse = dense - sum(r['dense'] - r['sparse'] for r in layers)
    return {'sparse': sparse, 'dense': dense, 'ratio': sparse / dense if dense else 1.0, 'layers': layers}


class TrainingFlops:
    """Accumulates the training FLOPs of a run, one optimizer step at a time, at the densities in force.

    Build it after :func:`timm_dst.create_sparsifier`; with ``attach=True`` it counts every real optimizer step through
    an optimizer step pre-hook (before the sparsifier's post-hook changes the masks), otherwise call :meth:`step`
    once per optimizer step, before ``optimizer.step()``.

    Args:
        model: The model.
        input_size: ``(C, H, W)`` of one training sample, or an example batch.
        sparsifier: The run's sparsifier (None: a dense run).
        samples_per_step: Samples per optimizer step (global batch: per-device batch x accumulation x processes).
        attach: Hook the sparsifier's (inner) optimizer so steps are counted automatically.

    Attributes:
        dense_forward: ``f_D``, dense forward FLOPs per sample.
        total: Training FLOPs so far.
        dense_total: FLOPs of the same number of steps and samples trained dense (``3 f_D`` per sample).
        steps: Optimizer steps counted.
        dense_grad_steps: Steps whose backward computed dense weight gradients.
    """

    def __init__(
            self,
            model: nn.Module,
            input_size: Sequence[int] | torch.Tensor | None = None,
            sparsifier: Any | None = None,
            samples_per_step: int = 1,
            attach: bool = False,
    ):
        if int(samples_per_step) < 1:
            raise ValueError(f'samples_per_step={samples_per_step!r} must be a positive integer')
        self.sparsifier = sparsifier
        self.samples_per_step = int(samples_per_step)
        self.dense_forward, per_module = layer_flops(model, input_size)
        if sparsifier is not None:
            names = [t.name.rsplit('.', 1)[0] if '.' in t.name else '' for t in sparsifier.targets]
            self._target_flops = [per_module.get(n, 0) for n in names]
        else:
            self._target_flops = []
        self.total = 0.0
        self.dense_total = 0.0
        self.steps = 0
        self.dense_grad_steps = 0
        self._hook = None
        if attach:
            if sparsifier is None:
                raise ValueError('attach=True needs the sparsifier (its optimizer is hooked)')
            self._hook = sparsifier.optimizer.register_step_pre_hook(self._pre_step)

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step()

    def sparse_forward(self) -> float:
        """``f_S`` at the current densities, per sample."""
        if self.sparsifier is None:
            return float(self.dense_forward)
        densities = [c / t.numel for t, c in zip(self.sparsifier.targets, self.sparsifier.counts)]
        return _sparse_flops(self.dense_forward, self._target_flops, densities)

    def step_flops(self, dense_grad: bool | None = None) -> float:
        """FLOPs of one optimizer step (all its samples) at the current densities.

        Args:
            dense_grad: Whether this step's backward computes dense weight gradients. None: ask the method about the
                step about to complete (``method.needs_dense_grad(sparsifier, sparsifier.step + 1)``).
        """
        f_s = self.sparse_forward()
        if dense_grad is None:
            sp = self.sparsifier
            dense_grad = bool(sp is not None and sp.method.attaches and sp.method.needs_dense_grad(sp, sp.step + 1))
        backward = f_s + (self.dense_forward if dense_grad else f_s)
        return (f_s + backward) * self.samples_per_step

    def step(self, samples: int | None = None, dense_grad: bool | None = None) -> float:
        """Count one optimizer step; returns its FLOPs.

        Args:
            samples: Samples of this step (default ``samples_per_step``).
            dense_grad: See :meth:`step_flops`.
        """
        n = self.samples_per_step if samples is None else int(samples)
        sp = self.sparsifier
        if dense_grad is None:
            dense_grad = bool(sp is not None and sp.method.attaches and sp.method.needs_dense_grad(sp, sp.step + 1))
        cost = self.step_flops(dense_grad) / self.samples_per_step * n
        self.total += cost
        self.dense_total += 3.0 * self.dense_forward * n
        self.steps += 1
        self.dense_grad_steps += int(dense_grad)
        return cost

    @property
    def ratio(self) -> float:
        """Training FLOPs as a multiple of dense training for the same steps."""
        return self.total / self.dense_total if self.dense_total else 1.0

    def remove(self) -> None:
        """Detach the optimizer hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready totals: training FLOPs, the dense equivalent, their ratio, and the current inference FLOPs."""
        f_s = self.sparse_forward()
        return {
            'train_flops': self.total,
            'train_flops_dense': self.dense_total,
            'train_flops_ratio': self.ratio,
            'steps': self.steps,
            'dense_grad_steps': self.dense_grad_steps,
            'inference_flops': f_s,
            'inference_flops_dense': float(self.dense_forward),
            'inference_flops_ratio': f_s / self.dense_forward if self.dense_forward else 1.0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {'total': self.total, 'dense_total': self.dense_total, 'steps': self.steps,
                'dense_grad_steps': self.dense_grad_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = float(state['total'])
        self.dense_total = float(state['dense_total'])
        self.steps = int(state['steps'])
        self.dense_grad_steps = int(state['dense_grad_steps'])
