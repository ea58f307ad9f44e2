"""Sparse CPU kernels for masked ``nn.Linear`` layers: a step whose cost falls with the density.

At the densities of the ITOP / DSR experiments (a few percent), the dense GEMMs of a masked linear layer multiply
mostly zeros, and masking the weight gradient adds a pass over the whole tensor. On CPU, CSR kernels over the active
weights are several times faster below about 5% density (``benchmarks/step_overhead.py``; the break-even is near 10%):

- forward ``y = x W^T + b`` as ``(W_csr x^T)^T``;
- input gradient ``dL/dx = dL/dy W`` as ``(W^T_csr dL/dy^T)^T``;
- weight gradient at the active positions only (``torch.sparse.sampled_addmm``), written into a zero tensor.

The values are gathered from ``weight_orig`` on every call, so they follow the optimizer; the CSR structure is cached
per mask version and rebuilt after a topology update. The dense path (``F.linear``) is taken whenever the sparse one
would not give the same result: autocast, dtypes other than float32, accelerators, ``torch.compile`` tracing, copies of
the model (EMA), and steps where a method needs the dense gradient (RigL, SNFS).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['CsrStructure', 'csr_structure', 'SparseLinearForward', 'DEFAULT_MAX_DENSITY', 'dense_kernels']

# torch warns once per process that CSR support is in beta; these kernels (csr @ dense, sampled_addmm) are tested here
warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta', category=UserWarning)

DEFAULT_MAX_DENSITY = 0.05  # CSR kernels below this layer density (CPU, float32); measured break-even is near 0.1


@dataclass
class CsrStructure:
    """The CSR structure of a 2-D mask and of its transpose (values are gathered per call)."""

    index: torch.Tensor      # sorted flat indices of the active positions (= CSR value order)
    crow: torch.Tensor
    col: torch.Tensor
    perm_t: torch.Tensor     # values of W^T in CSR order = values[perm_t]
    crow_t: torch.Tensor
    col_t: torch.Tensor
    shape: tuple[int, int]


def csr_structure(index: torch.Tensor, shape: tuple[int, int]) -> CsrStructure:
    """CSR structure (and the transpose's) of the 2-D mask whose sorted active flat indices are ``index``.

    Row pointers and column indices are int32 when they fit (half the memory of int64; the CPU kernels accept both).
    """
    rows_n, cols_n = shape
    itype = torch.int32 if index.numel() < 2 ** 31 - 1 else torch.long
    rows, cols = index // cols_n, index % cols_n
    crow = torch.zeros(rows_n + 1, dtype=itype, device=index.device)
    crow[1:] = torch.bincount(rows, minlength=rows_n).cumsum(0)
    perm_t = torch.argsort(cols * rows_n + rows)
    crow_t = torch.zeros(cols_n + 1, dtype=itype, device=index.device)
    crow_t[1:] = torch.bincount(cols, minlength=cols_n).cumsum(0)
    return CsrStructure(index=index, crow=crow, col=cols.to(itype), perm_t=perm_t, crow_t=crow_t,
                        col_t=rows[perm_t].to(itype), shape=(rows_n, cols_n))


class _SparseLinearFn(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` for a 2-D ``x`` whose weight is zero outside ``s`` (exactly the masked layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s: CsrStructure,
                method: Any) -> torch.Tensor:
        # x of any rank (..., in_features), flattened here rather than by the caller: the output is then a tensor of
        # its own, not a view, so an in-place op after the layer (ReLU(inplace=True)) needs no CopySlices in backward
        x_shape = x.shape
        x = x.reshape(-1, x_shape[-1])
        values = weight.reshape(-1)[s.index]
        w = torch.sparse_csr_tensor(s.crow, s.col, values, s.shape, check_invariants=False)
        y = torch.sparse.mm(w, x.t()).t()
        y = y + bias if bias is not None else y.contiguous()
        ctx.save_for_backward(x, values)
        ctx.s, ctx.weight_dtype, ctx.x_shape, ctx.method = s, weight.dtype, x_shape, method
        return y.view(*x_shape[:-1], s.shape[0]) if len(x_shape) != 2 else y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, values = ctx.saved_tensors
        s: CsrStructure = ctx.s
        grad_y = grad_y.reshape(-1, s.shape[0])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            wt = torch.sparse_csr_tensor(s.crow_t, s.col_t, values[s.perm_t], (s.shape[1], s.shape[0]),
                                         check_invariants=False)
            grad_x = torch.sparse.mm(wt, grad_y.t()).t().reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            pattern = torch.sparse_csr_tensor(s.crow, s.col, values, s.shape, check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, grad_y.t(), x, beta=0.0).values()
            grad_w = torch.zeros(s.shape[0] * s.shape[1], dtype=ctx.weight_dtype, device=x.device)
            grad_w = grad_w.index_copy_(0, s.index, grad_values).view(s.shape)
            ctx.method.note_masked_grad(grad_w)  # the gradient hook need not mask it again if it arrives alone
        if ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b, None, None


_dense_only = 0  # > 0 inside dense_kernels()


@contextlib.contextmanager
def dense_kernels() -> Iterator[None]:
    """Run masked linear layers on the dense kernels inside this block: whatever measures the dense operations
    (``torch.utils.flop_counter`` in :mod:`timm_dst.flops`) must see ``F.linear``, not the CSR products it has no
    formula for."""
    global _dense_only
    _dense_only += 1
    try:
        yield
    finally:
        _dense_only -= 1


def _compiling() -> bool:
    fn = getattr(torch.compiler, 'is_compiling', None)  # torch >= 2.3
    return bool(fn()) if fn is not None else bool(torch._dynamo.is_compiling())


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


class SparseLinearForward:
    """Instance ``forward`` of a masked ``nn.Linear``: CSR kernels when they apply, ``F.linear`` otherwise.

    Installed by :meth:`timm_dst.reparam.DSTMask.install_sparse_kernels`; ``method`` is that :class:`DSTMask`.
    """

    def __init__(self, module: nn.Linear, method: Any, max_density: float = DEFAULT_MAX_DENSITY):
        self.module = module
        self.method = method
        self.max_density = float(max_density)

    def _structure(self, x: torch.Tensor) -> CsrStructure | None:
        if _dense_only or _compiling() or torch.jit.is_scripting():
            return None
        m, method = self.module, self.method
        if method.dense_grad_wanted or not method.owns(m):
            return None
        orig = getattr(m, method._tensor_name + '_orig')
        if x.device.type != 'cpu' or x.dtype != torch.float32 or orig.dtype != torch.float32 or _autocast_on():
            return None
        return method.csr(getattr(m, method._tensor_name + '_mask'), self.max_density)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        s = self._structure(x)
        if s is None:
            return F.linear(x, m.weight, m.bias)
        return _SparseLinearFn.apply(x, getattr(m, self.method._tensor_name + '_orig'), m.bias, s, self.method)
