"""Sparse CPU kernels for masked ``nn.Linear`` layers: a step whose cost falls with the density.

At the densities of the ITOP / DSR experiments (a few percent), the dense GEMMs of a masked linear layer multiply
mostly zeros, and masking the weight gradient adds a pass over the whole tensor. On CPU, CSR kernels over the active
weights are several times faster below about 5% density (``benchmarks/step_overhead.py``; the break-even is near 10%):

- forward ``y = x W^T + b`` as ``(W_csr x^T)^T``;
- input gradient ``dL/dx = dL/dy W`` as ``(W^T_csr dL/dy^T)^T``;
- weight gradient at the active positions only (``torch.sparse.sampled_addmm``), written into a zero tensor.

Block-sparse layers (whole ``R x C`` blocks active or inactive, ``R * C >= 1024``, :data:`BLOCK_TRAIN_MIN_AREA`) run
block kernels up to a higher density (:data:`DEFAULT_BLOCK_MAX_DENSITY`), under the same rules. The active blocks are
a ``(n_blocks, R, C)`` tensor; forward and input gradient are batched GEMMs (``torch.bmm``) over them
(:func:`block_matmul`), and the weight gradient is one ``bmm`` at the active blocks, scattered into a zero tensor.
With 16x16 blocks the weight-gradient ``bmm`` alone is 3x slower than the dense GEMM and the step is no faster than
dense (docs/structured.md), hence the minimum block area.

The values are gathered from ``weight_orig`` on every call, so they follow the optimizer; the CSR / block structure
is cached per mask version and rebuilt after a topology update. The dense path (``F.linear``) is taken whenever the
sparse one would not give the same result: autocast, dtypes other than float32, accelerators, ``torch.compile``
tracing, copies of the model (EMA), and steps where a method needs the dense gradient (RigL, SNFS).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'CsrStructure', 'csr_structure', 'BlockStructure', 'block_structure', 'find_block_size', 'block_matmul',
    'csr_matmul', 'SparseLinearForward', 'DEFAULT_MAX_DENSITY', 'DEFAULT_BLOCK_MAX_DENSITY', 'BLOCK_MIN_AREA',
    'BLOCK_TRAIN_MIN_AREA',
    'dense_kernels',
]

# torch warns once per process that CSR support is in beta; these kernels (csr @ dense, sampled_addmm) are tested here
warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta', category=UserWarning)

DEFAULT_MAX_DENSITY = 0.05  # CSR kernels below this layer density (CPU, float32); measured break-even is near 0.1
DEFAULT_BLOCK_MAX_DENSITY = 0.25  # block kernels below this layer density (training; docs/structured.md)
BLOCK_MIN_AREA = 64  # smaller blocks make batched GEMMs too small to beat CSR: they count as unstructured
BLOCK_TRAIN_MIN_AREA = 1024  # block kernels in training from 32x32 blocks (16x16: no faster than dense, measured)
BLOCK_CANDIDATES = ((32, 32), (16, 16), (8, 8))  # block sizes looked for in masks that declare no structure


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


@dataclass
class BlockStructure:
    """The active blocks of a 2-D mask made of whole ``R x C`` blocks, in row-major block order (= BSR order)."""

    block: tuple[int, int]   # (R, C)
    shape: tuple[int, int]   # (out_features, in_features)
    row: torch.Tensor        # block row of each active block (int64)
    col: torch.Tensor        # block column of each active block (int64)
    _plans: dict = field(default_factory=dict, repr=False, compare=False)  # cached, see row_buckets()

    @property
    def grid(self) -> tuple[int, int]:
        return self.shape[0] // self.block[0], self.shape[1] // self.block[1]

    def values(self, weight: torch.Tensor) -> torch.Tensor:
        """The active blocks of ``weight`` as a ``(n_blocks, R, C)`` tensor (a copy)."""
        (nbr, nbc), (r, c) = self.grid, self.block
        return weight.reshape(nbr, r, nbc, c)[self.row, :, self.col, :]

    def scatter(self, blocks: torch.Tensor) -> torch.Tensor:
        """The dense ``shape`` tensor that is ``blocks`` at the active blocks and zero elsewhere."""
        (nbr, nbc), (r, c) = self.grid, self.block
        out = blocks.new_zeros(self.shape)
        out.view(nbr, r, nbc, c)[self.row, :, self.col, :] = blocks
        return out

    def row_buckets(self, transpose: bool = False) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        """Block rows (of ``W``, or of ``W^T`` with ``transpose``) grouped by their number of active blocks ``k``:
        ``(rows, blocks, cols, k)`` per group, ``blocks`` / ``cols`` listing each row's ``k`` blocks in turn
        (indices into this structure's block list, and their block columns). Cached."""
        plan = self._plans.get(transpose)
        if plan is None:
            row, col = (self.col, self.row) if transpose else (self.row, self.col)
            n_rows, n_cols = self.grid[::-1] if transpose else self.grid
            order = torch.argsort(row * n_cols + col)
            counts = torch.bincount(row, minlength=n_rows)
            plan = []
            for k in counts.unique().tolist():
                if k:
                    rows_k = (counts == k).nonzero().squeeze(1)
                    sel = order[torch.isin(row[order], rows_k)]
                    plan.append((rows_k, sel, col[sel], int(k)))
            self._plans[transpose] = plan
        return plan


def block_structure(active_blocks: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> BlockStructure:
    """The :class:`BlockStructure` whose active blocks are the True entries of the ``(rows / R, cols / C)`` grid
    ``active_blocks``."""
    row, col = active_blocks.nonzero(as_tuple=True)
    return BlockStructure(block=(int(block[0]), int(block[1])), shape=(int(shape[0]), int(shape[1])), row=row, col=col)


def find_block_size(active: torch.Tensor, candidates: tuple[tuple[int, int], ...] = BLOCK_CANDIDATES,
                    min_area: int = BLOCK_MIN_AREA) -> tuple[tuple[int, int], torch.Tensor] | None:
    """The first block size of ``candidates`` in which the 2-D bool tensor ``active`` is made of whole blocks (every
    block all True or all False), and the block grid; None when none fits (or ``active`` is all True / all False).

    Blocks of fewer than ``min_area`` elements are skipped: their batched products do not pay.
    """
    if active.dim() != 2:
        return None
    rows, cols = active.shape
    for r, c in candidates:
        if r * c < min_area or rows % r or cols % c:
            continue
        head = active[:r].reshape(r, cols // c, c).sum((0, 2), dtype=torch.int32)  # the first block row, cheaply
        if not bool(((head == 0) | (head == r * c)).all()):
            continue
        counts = active.reshape(rows // r, r, cols // c, c).sum((1, 3), dtype=torch.int32)
        full = counts == r * c
        n_full = int(full.sum())
        if 0 < n_full < full.numel() and n_full * r * c == int(counts.sum()):
            return (r, c), full
    return None


BLOCK_ROW_GEMM_MIN_ROWS = 16  # from this many input rows: one GEMM per group of block rows (block_matmul)


def block_matmul(x: torch.Tensor, blocks: torch.Tensor, s: BlockStructure, transpose: bool = False) -> torch.Tensor:
    """``x @ W^T`` (or ``x @ W`` with ``transpose``) for the 2-D ``x`` and the block-sparse ``W`` whose active blocks
    are ``blocks`` (``(n_blocks, R, C)``, in the order of ``s``).

    Below :data:`BLOCK_ROW_GEMM_MIN_ROWS` rows of ``x``: one ``bmm`` with a product per active block, summed into
    the output blocks by ``index_add_``. From there on, larger products: the block rows of ``W`` that have the same
    number ``k`` of active blocks form one ``bmm`` of ``(rows, n, k*C) @ (rows, k*C, R)``
    (:meth:`BlockStructure.row_buckets`); measured 1.3-1.5x faster than the per-block product at 197 rows.
    """
    (nbr, nbc), (r, c) = s.grid, s.block
    if transpose:  # W^T: blocks (C x R) from block row `col` to block column `row`
        nbr, nbc, r, c, row, col, blocks = nbc, nbr, c, r, s.col, s.row, blocks.transpose(1, 2)
    else:
        row, col = s.row, s.col
    n = x.shape[0]
    xv = x.reshape(n, nbc, c)
    if n < BLOCK_ROW_GEMM_MIN_ROWS:
        xb = xv.index_select(1, col).transpose(0, 1)                     # (n_blocks, n, C)
        part = torch.bmm(xb, blocks.transpose(1, 2))                     # (n_blocks, n, R)
        y = x.new_zeros(nbr, n, r).index_add_(0, row, part)
    else:
        y = x.new_zeros(nbr, n, r)
        for rows_k, sel, cols_k, k in s.row_buckets(transpose):
            m = rows_k.numel()
            xk = xv.index_select(1, cols_k).view(n, m, k * c).transpose(0, 1)                      # (m, n, k*C)
            wk = blocks.index_select(0, sel).view(m, k, r, c).transpose(2, 3).reshape(m, k * c, r)  # (m, k*C, R)
            y.index_copy_(0, rows_k, torch.bmm(xk, wk))
    return y.transpose(0, 1).reshape(n, nbr * r)


CSR_MV_MAX_ROWS = 2  # up to this many input rows: one sparse matrix-vector product per row (MKL SpMV)
CSR_BAG_MIN_ROWS = 32  # from this many input rows: embedding_bag over the rows of x^T (measured faster than CSR mm)


def csr_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` for the 2-D ``x`` and the sparse CSR ``W``, by the product measured fastest for the number of rows
    (docs/structured.md, "Kernels"): ``torch.mv`` per row for a few rows, ``torch.sparse.mm`` in between, and
    ``F.embedding_bag`` (each output neuron a weighted bag of rows of ``x^T``) for many rows."""
    n = x.shape[0]
    if n <= CSR_MV_MAX_ROWS:
        return torch.stack([torch.mv(w, row) for row in x]) if n != 1 else torch.mv(w, x[0]).unsqueeze(0)
    if n < CSR_BAG_MIN_ROWS:
        return torch.sparse.mm(w, x.t()).t()
    crow = w.crow_indices()
    return F.embedding_bag(w.col_indices(), x.t().contiguous(), crow[:-1], mode='sum',
                           per_sample_weights=w.values()).t()


class _BlockLinearFn(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose weight is zero outside the active blocks of ``s``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s: BlockStructure,
                method: Any) -> torch.Tensor:
        x_shape = x.shape
        x = x.reshape(-1, x_shape[-1])
        blocks = s.values(weight)
        y = block_matmul(x, blocks, s)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, blocks)
        ctx.s, ctx.x_shape, ctx.method = s, x_shape, method
        return y.view(*x_shape[:-1], s.shape[0]) if len(x_shape) != 2 else y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, blocks = ctx.saved_tensors
        s: BlockStructure = ctx.s
        grad_y = grad_y.reshape(-1, s.shape[0])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = block_matmul(grad_y, blocks, s, transpose=True).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            (nbr, nbc), (r, c) = s.grid, s.block
            n = x.shape[0]
            gyb = grad_y.reshape(n, nbr, r).index_select(1, s.row).permute(1, 2, 0)   # (n_blocks, R, n)
            xb = x.reshape(n, nbc, c).index_select(1, s.col).transpose(0, 1)          # (n_blocks, n, C)
            grad_w = s.scatter(torch.bmm(gyb, xb))
            ctx.method.note_masked_grad(grad_w)
        if ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b, None, None


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
    (``torch.utils.flop_counter`` in :mod:`timm_dst.core.flops`) must see ``F.linear``, not the CSR products it has no
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
    """Instance ``forward`` of a masked ``nn.Linear``: block kernels for block-sparse masks up to
    :data:`DEFAULT_BLOCK_MAX_DENSITY`, CSR kernels up to ``max_density`` (CPU, float32), ``F.linear`` otherwise.

    Installed by :meth:`timm_dst.core.masks.DSTMask.install_sparse_kernels`; ``method`` is that :class:`DSTMask`.
    """

    def __init__(self, module: nn.Linear, method: Any, max_density: float = DEFAULT_MAX_DENSITY):
        self.module = module
        self.method = method
        self.max_density = float(max_density)

    def _structure(self, x: torch.Tensor) -> CsrStructure | BlockStructure | None:
        if _dense_only or _compiling() or torch.jit.is_scripting():
            return None
        m, method = self.module, self.method
        if method.dense_grad_wanted or not method.owns(m):
            return None
        orig = getattr(m, method._tensor_name + '_orig')
        if x.device.type != 'cpu' or x.dtype != torch.float32 or orig.dtype != torch.float32 or _autocast_on():
            return None
        mask = getattr(m, method._tensor_name + '_mask')
        blocks = method.blocks(mask, self.block_max_density)
        return blocks if blocks is not None else method.csr(mask, self.max_density)

    @property
    def block_max_density(self) -> float:
        return DEFAULT_BLOCK_MAX_DENSITY if self.max_density > 0 else 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        s = self._structure(x)
        if s is None:
            return F.linear(x, m.weight, m.bias)
        fn = _BlockLinearFn if isinstance(s, BlockStructure) else _SparseLinearFn
        return fn.apply(x, getattr(m, self.method._tensor_name + '_orig'), m.bias, s, self.method)
