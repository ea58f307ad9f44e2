"""Structured sparsity: N:M groups, constant fan-in and blocks, kept by every method through the shared controller.

A :class:`Structure` is parsed once from the ``structure=`` argument (:func:`parse_structure`); for each sparse
tensor that fits it, :meth:`Structure.layout` gives a :class:`Layout`, which maps the tensor to the structure's units
and back. The controller (:class:`~timm_dst.core.controller.Sparsifier`) uses the helpers here to pool the methods'
element scores to units, to take the top-k per unit group and to expand unit masks to element masks, so no method's
score or budget code knows about structure (docs/structured.md).

Weights are viewed as a matrix ``[out, in * k]``: dim 0 is the output (a row per output neuron / channel), dim 1 the
input, and the remaining (kernel) dims are moved before it, so a conv weight ``[out, in, kh, kw]`` becomes
``[out, kh * kw * in]`` with the input channels innermost (the layout of channels-last implicit GEMM, and the one
NVIDIA's 2:4 sparse tensor cores prune along). A linear weight ``[out, in]`` is its own matrix.

* ``'N:M'``: at most N active in every group of M consecutive weights along the input (the matrix's columns); fits
  when the input channels are a multiple of M (a group never straddles two kernel positions).
* ``'fan-in'``: every row (output neuron) has the same number of active inputs; fits every tensor.
* ``'RxC'``: whole R x C blocks of the matrix are active or inactive; fits when the rows are a multiple of R and the
  input channels a multiple of C.

The spellings are a registry: :func:`register_structure` (or an entry point of the group ``timm_dst.structures``) adds
a parser that turns a spelling into a :class:`Structure` (a subclass may lay tensors out its own way through
:meth:`Structure.layout`, for instance as per-tensor blocks); :func:`parse_structure` tries every registered parser.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .registry import Registry

__all__ = ['Structure', 'Layout', 'parse_structure', 'STRUCTURE_ENTRY_POINT_GROUP',
           'StructureForm', 'register_structure', 'list_structures', 'structure_forms', 'structure_help',
           'per_group_topk', 'topk_mask', 'check_mask', 'quantize_counts']

STRUCTURE_ENTRY_POINT_GROUP = 'timm_dst.structures'

_NM = re.compile(r'^\s*(\d+)\s*:\s*(\d+)\s*$')
_BLOCK = re.compile(r'^\s*(\d+)\s*[xX]\s*(\d+)\s*$')


@dataclass(frozen=True)
class Structure:
    """A parsed structure: ``kind`` is ``'n:m'``, ``'fan-in'`` or ``'block'``.

    Attributes:
        kind: The structure's kind.
        n: N of N:M (active weights per group).
        m: M of N:M (group size along the input).
        rows: R of an R x C block.
        cols: C of an R x C block.
    """

    kind: str
    n: int = 0
    m: int = 0
    rows: int = 0
    cols: int = 0

    @property
    def spec(self) -> str:
        """The canonical spelling: ``'2:4'``, ``'fan-in'``, ``'16x16'``."""
        if self.kind == 'n:m':
            return f'{self.n}:{self.m}'
        if self.kind == 'block':
            return f'{self.rows}x{self.cols}'
        return 'fan-in'

    @property
    def density(self) -> float | None:
        """The density the structure fixes (N/M for N:M), else None (the distribution decides)."""
        return self.n / self.m if self.kind == 'n:m' else None

    def misfit(self, shape: Sequence[int]) -> str | None:
        """Why a tensor of ``shape`` does not fit (None when it does)."""
        shape = tuple(shape)
        if len(shape) < 2:
            return f'{len(shape)}-D'
        out, in_ch = shape[0], shape[1]
        if self.kind == 'n:m' and in_ch % self.m:
            return f'{in_ch} input channels are not a multiple of M={self.m}'
        if self.kind == 'block':
            bad = []
            if out % self.rows:
                bad.append(f'{out} rows are not a multiple of {self.rows}')
            if in_ch % self.cols:
                bad.append(f'{in_ch} input channels are not a multiple of {self.cols}')
            return ', '.join(bad) or None
        return None

    def layout(self, shape: Sequence[int]) -> Layout | None:
        """The :class:`Layout` of a tensor of ``shape``, or None when it does not fit (see :meth:`misfit`)."""
        if self.misfit(shape) is not None:
            return None
        return Layout(self, tuple(int(s) for s in shape))

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class StructureForm:
    """A registered spelling of ``structure=``.

    Attributes:
        name: The registry name (``'n:m'``, ``'fan-in'``, ``'block'``).
        parse: ``parse(text) -> Structure | None`` of the stripped, lower-cased spelling: None when the text is not
            this form; raises ``ValueError`` with the reason when it is this form but malformed (``'N:M needs 1 <= N <
            M'``).
        form: The accepted spelling(s), for messages (``"'fan-in' (constant fan-in)"``).
        help: The same for ``--structure``'s help (default: ``form``).
    """

    name: str
    parse: Callable[[str], Structure | None]
    form: str
    help: str = ''


_registry: Registry[StructureForm] = Registry('structure', STRUCTURE_ENTRY_POINT_GROUP)


def register_structure(name: str, parse: Callable[[str], Structure | None], *, form: str,
                       help: str | None = None) -> StructureForm:
    """Register a spelling of ``structure=`` (and ``--structure``).

    Args:
        name: The registry name: lower-case letters, digits, ``-``, ``_``, ``.``, ``:``.
        parse: ``parse(text) -> Structure | None`` of the stripped, lower-cased text: a :class:`Structure` (or an
            instance of a subclass that lays tensors out its own way), None when the text is not this form; a
            ``ValueError`` with the reason when the text is this form but malformed.
        form: The accepted spelling(s), listed in the messages of refused values.
        help: The same for ``--structure``'s help (default: ``form``).

    Returns:
        The registry entry.

    Raises:
        ValueError: When ``name`` is malformed or taken, or ``parse`` is not callable.
    """
    if not callable(parse):
        raise ValueError(f'structure {name!r}: parse={parse!r} is not callable')
    return _registry.register(name, StructureForm(name, parse, form, help or form))


def list_structures() -> list[str]:
    """The registered structure names, in registration order (built-in first)."""
    return list(_registry.names())


def _join(parts: Sequence[str]) -> str:
    return ', '.join(parts[:-1]) + ', or ' + parts[-1] if len(parts) > 1 else ''.join(parts)


def structure_forms() -> str:
    """The accepted values of ``structure=``, for messages (every registered form)."""
    return _join(["None or 'none' (unstructured)", *(e.form for e in _registry.entries())])


def structure_help() -> str:
    """The accepted values of ``--structure``, for its help (every registered form)."""
    return ', '.join(e.help for e in _registry.entries()) + " or 'none' (default: unstructured)"


def __getattr__(name: str) -> Any:
    if name == 'STRUCTURE_FORMS':  # deprecated: structure_forms(); the accepted forms as of this access
        return structure_forms()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def parse_structure(spec: str | Structure | None) -> Structure | None:
    """``structure=`` as a :class:`Structure` (None: unstructured): the first registered form that takes it.

    Raises:
        ValueError: naming ``structure`` and the accepted forms.
    """
    if spec is None or isinstance(spec, Structure):
        return spec
    hint = ''
    if isinstance(spec, int) and not isinstance(spec, bool):
        hint = (' (an integer: YAML 1.1 reads an unquoted N:M such as 2:4 as a base-60 number; quote it: '
                "structure: '2:4')")
    if not isinstance(spec, str):
        raise ValueError(f'structure={spec!r} is not accepted{hint}; accepted: {structure_forms()}')
    text = spec.strip().lower()
    if text in ('none', 'unstructured', ''):
        return None
    for entry in _registry.entries():
        try:
            structure = entry.parse(text)
        except ValueError as e:
            raise ValueError(f'structure={spec!r}: {e}; accepted: {structure_forms()}') from None
        if structure is not None:
            return structure
    raise ValueError(f'structure={spec!r} is not accepted; accepted: {structure_forms()}')


def _parse_nm(text: str) -> Structure | None:
    m = _NM.match(text)
    if not m:
        return None
    n, mm = int(m.group(1)), int(m.group(2))
    if not 1 <= n < mm:
        raise ValueError('N:M needs 1 <= N < M')
    return Structure('n:m', n=n, m=mm)


def _parse_fan_in(text: str) -> Structure | None:
    return Structure('fan-in') if text in ('fan-in', 'fanin', 'fan_in') else None


def _parse_block(text: str) -> Structure | None:
    m = _BLOCK.match(text)
    if not m:
        return None
    r, c = int(m.group(1)), int(m.group(2))
    if r < 1 or c < 1 or r * c < 2:
        raise ValueError('a block needs R, C >= 1 and more than one weight')
    return Structure('block', rows=r, cols=c)


register_structure('n:m', _parse_nm, form="'N:M' with 1 <= N < M (e.g. '2:4', '1:4', '2:8')",
                   help="'N:M' (at most N active in every M consecutive inputs, e.g. 2:4; quote it in YAML)")
register_structure('fan-in', _parse_fan_in, form="'fan-in' (constant fan-in)",
                   help="'fan-in' (the same number of active inputs per output neuron)")
register_structure('block', _parse_block, form="'RxC' blocks (e.g. '1x4', '16x16', '32x32')",
                   help="'RxC' blocks (e.g. 16x16)")


@dataclass(frozen=True)
class Layout:
    """How one tensor of ``shape`` maps to the units of a fitting ``structure``.

    Blocks: the units are the R x C blocks of the matrix view, pooled by sum. N:M and fan-in ("grouped" structures):
    the units are single weights, organised in groups (M consecutive inputs, or one whole row) that all hold the same
    number of active weights.
    """

    structure: Structure
    shape: tuple[int, ...]

    @property
    def spec(self) -> str:
        return self.structure.spec

    @property
    def kind(self) -> str:
        return self.structure.kind

    @property
    def grouped(self) -> bool:
        """N:M or fan-in: every group holds the same number of active weights."""
        return self.kind != 'block'

    @property
    def out(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def group_size(self) -> int:
        """Weights per group (grouped structures): M, or the row length for fan-in."""
        return self.structure.m if self.kind == 'n:m' else self.cols

    @property
    def n_groups(self) -> int:
        return self.numel // self.group_size

    @property
    def unit_size(self) -> int:
        """Weights per unit: R * C for blocks, 1 otherwise."""
        return self.structure.rows * self.structure.cols if self.kind == 'block' else 1

    @property
    def quantum(self) -> int:
        """The step of this tensor's active count: one block, or one weight in every group."""
        return self.unit_size if self.kind == 'block' else self.n_groups

    @property
    def cap(self) -> int:
        """The most active weights the structure allows: N per group for N:M, all of them otherwise."""
        return self.n_groups * self.structure.n if self.kind == 'n:m' else self.numel

    # --- views ------------------------------------------------------------------------------------------------
    def to_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (this tensor's shape) as the matrix ``[out, kernel * in]`` (a view for 2-D tensors)."""
        if x.dim() == 2:
            return x
        return x.movedim(1, -1).reshape(self.out, self.cols)

    def from_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_matrix`: a tensor of this tensor's shape (row-major)."""
        if len(self.shape) == 2:
            return x.reshape(self.shape)
        kernel = self.shape[2:]
        return x.reshape(self.out, *kernel, self.shape[1]).movedim(-1, 1).contiguous()

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Grouped structures: ``x`` as ``[n_groups, group_size]``."""
        return self.to_matrix(x).reshape(self.n_groups, self.group_size)

    def from_groups(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_matrix(x.reshape(self.out, self.cols))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks: the sum of ``x`` over each block, as ``[out / R, cols / C]``."""
        r, c = self.structure.rows, self.structure.cols
        mat = self.to_matrix(x)
        return mat.reshape(self.out // r, r, self.cols // c, c).sum(dim=(1, 3))

    def pool_any(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks: whether any element of each block is set (bool ``[out / R, cols / C]``)."""
        return self.pool(x.to(torch.int32)) > 0

    def expand(self, units: torch.Tensor) -> torch.Tensor:
        """Blocks: a per-block tensor ``[out / R, cols / C]`` spread to this tensor's shape."""
        r, c = self.structure.rows, self.structure.cols
        mat = units.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)
        return self.from_matrix(mat)


def per_group_topk(score: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Per row of ``score`` (``[G, S]``), the ``need[g]`` highest entries, as a bool mask (entries at ``-inf`` are
    never taken; ``need`` must not exceed the finite entries of its row)."""
    kmax = int(need.max()) if need.numel() else 0
    out = torch.zeros_like(score, dtype=torch.bool)
    if kmax <= 0:
        return out
    values, index = torch.topk(score, kmax, dim=1, sorted=True)
    take = (torch.arange(kmax, device=score.device).unsqueeze(0) < need.unsqueeze(1)) & (values > -math.inf)
    out.scatter_(1, index, take)
    return out


def topk_mask(layout: Layout, score: torch.Tensor, count: int) -> torch.Tensor:
    """An element mask of ``count`` active weights (a whole number of the layout's quanta) holding the highest
    ``score``: for blocks, the blocks of largest summed score; for grouped structures, the same number in every group,
    the highest of each group."""
    q = layout.quantum
    if count % q:
        raise ValueError(f'count {count} is not a whole number of {layout.spec} quanta ({q} weights)')
    score = score.detach().float()
    if layout.kind == 'block':
        pooled = layout.pool(score).reshape(-1)
        units = torch.zeros(pooled.numel(), dtype=torch.bool, device=score.device)
        units[torch.topk(pooled, count // q, sorted=False).indices] = True
        return layout.expand(units.view(layout.out // layout.structure.rows, -1))
    groups = layout.to_groups(score)
    need = torch.full((layout.n_groups,), count // q, dtype=torch.long, device=score.device)
    return layout.from_groups(per_group_topk(groups, need))


def check_mask(layout: Layout, mask: torch.Tensor) -> str | None:
    """Why ``mask`` breaks the layout's structure (None when it keeps it)."""
    if layout.kind == 'block':
        units = layout.pool(mask.to(torch.int32))
        size = layout.unit_size
        partial = int(((units > 0) & (units < size)).sum())
        return f'{partial} block(s) partly active' if partial else None
    per_group = layout.to_groups(mask).sum(dim=1)
    lo, hi = int(per_group.min()), int(per_group.max())
    if lo != hi:
        return f'groups hold between {lo} and {hi} active weights (not the same number)'
    return None


def quantize_counts(desired: Sequence[float], quanta: Sequence[int], low: Sequence[int], high: Sequence[int],
                    total: int | None) -> tuple[list[int], bool]:
    """Round per-tensor counts to whole quanta within ``[low, high]``, with a total as close to ``total`` as the
    quanta allow.

    Each count starts at the nearest multiple of its quantum inside its bounds; then, while the total is off, one
    quantum is added (or taken) where it fits into the gap and the tensor is furthest from its desired count.
    ``total=None`` rounds each count on its own.

    Returns:
        The counts, and whether their sum is exactly ``total`` (always True for None).
    """
    n = len(desired)
    counts = []
    for d, q, lo, hi in zip(desired, quanta, low, high):
        c = q * int(math.floor(d / q + 0.5))
        counts.append(min(max(c, lo), hi))
    if total is None:
        return counts, True
    residual = total - sum(counts)
    while residual:
        sign = 1 if residual > 0 else -1
        best, best_gap = None, None
        for i in range(n):
            q = quanta[i]
            new = counts[i] + sign * q
            if q > abs(residual) or new < low[i] or new > high[i]:
                continue
            gap = sign * (desired[i] - counts[i])
            if best is None or gap > best_gap:
                best, best_gap = i, gap
        if best is None:
            break
        q = quanta[best]
        room = (high[best] - counts[best]) if sign > 0 else (counts[best] - low[best])
        steps = max(1, min(abs(residual) // q, room // q, math.ceil(best_gap / q) if best_gap > 0 else 1))
        counts[best] += sign * steps * q  # as many quanta at once as fit the gap, the room and the tensor's want
        residual = total - sum(counts)
    return counts, residual == 0
