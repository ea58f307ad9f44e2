"""Compressed inference: a copy of a sparse model whose sparse linear layers run compressed kernels.

:func:`compress` takes a sparse model (masks attached by a :class:`~timm_dst.Sparsifier`, or a plain model whose
inactive weights are zeros, e.g. loaded from :func:`~timm_dst.export_state_dict`) and returns an inference copy in
which every sparse ``nn.Linear`` sparse enough to gain is a :class:`CompressedLinear`. The representation follows the
layer's structure (declared by the sparsifier's ``structure`` option, or found in the mask) and the device:

==================  ==================================================================================================
structure           representation and kernel
==================  ==================================================================================================
``'RxC'`` blocks    BSR (``R * C >= 64``): the active blocks, one ``torch.bmm`` over them per call
                    (:func:`timm_dst.kernels.sparse_linear.block_matmul`)
``'2:4'``           on CUDA: ``torch.sparse.to_sparse_semi_structured`` (sparse tensor cores); on CPU as unstructured
``'fan-in'``        CSR (constant row length), the same kernels as unstructured: measured fastest of the candidates
unstructured        CSR: ``torch.mv`` per row for up to 2 rows, ``torch.sparse.mm`` below 32 rows, ``F.embedding_bag``
                    from 32 rows (:func:`timm_dst.kernels.sparse_linear.csr_matmul`), ``F.linear`` on the rebuilt dense
                    weight from 1024 rows
==================  ==================================================================================================

Layers denser than the representation's limit (:data:`MAX_DENSITY`, from the measurements in docs/structured.md),
convolutions (no compressed convolution kernel here) and modules that are not plain linear layers stay as they are;
:func:`compress` says which, in the
``compression_report`` it attaches to the copy and in a logged summary.

:func:`save_compressed` / :func:`load_compressed` store a compressed model as one safetensors file: the plain tensors
of each compressed layer under ``<layer>.<field>`` (BSR / CSR: ``crow_indices``, ``col_indices``, ``values``, and
``bias``), every other entry of the model's ``state_dict`` under its own key, and a JSON header (safetensors metadata
key ``timm_dst``) describing each compressed layer (docs/structured.md, "Compressed inference").
"""
from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.sparse_linear import BLOCK_CANDIDATES, BLOCK_MIN_AREA, BlockStructure, block_matmul, csr_matmul
from .masks import DSTMask, fold_masks, unwrap_model

__all__ = [
    'compress', 'save_compressed', 'load_compressed', 'detect_structure', 'CompressedLinear', 'LayerReport',
    'format_report', 'MAX_DENSITY', 'FORMAT',
]

_logger = logging.getLogger(__name__)

FORMAT = 'timm_dst.compressed'
FORMAT_VERSION = 1
KINDS = ('bsr', 'csr', 'semi-structured')
# a layer is compressed only at or below this density for its representation (docs/structured.md, "Kernels")
MAX_DENSITY: dict[str, float] = {'bsr': 0.3, 'csr': 0.2, 'semi-structured': 0.5}
CSR_DENSE_MIN_ROWS = 1024  # from this many input rows a CSR layer rebuilds its dense weight per call (measured faster)
BLOCK_FULL_AREA = 1024  # blocks smaller than 32x32 get half the bsr limit (16x16 at 20%: 0.5x dense at 197 rows)
BLOCK_ZERO_TOLERANCE = 0.01  # zeros inside the active blocks of a plain model's weights: at most this fraction
_FIELDS = {'bsr': ('crow_indices', 'col_indices', 'values'), 'csr': ('crow_indices', 'col_indices', 'values'),
           'semi-structured': ('weight',)}


@dataclass
class LayerReport:
    """What :func:`compress` did with one sparse layer."""

    name: str
    module: str                 # the module's class name
    shape: tuple[int, ...]
    density: float
    structure: str | None       # 'RxC', 'N:M', 'fan-in' or None (unstructured)
    kind: str | None            # the representation ('bsr', 'csr', 'semi-structured'), None: left as it is
    reason: str = ''            # why it was left as it is


def _block_size(structure: str | None) -> tuple[int, int] | None:
    if not isinstance(structure, str) or 'x' not in structure:
        return None
    r, _, c = structure.partition('x')
    return (int(r), int(c)) if r.isdigit() and c.isdigit() and int(r) > 0 and int(c) > 0 else None


def _n_m(structure: str | None) -> tuple[int, int] | None:
    if not isinstance(structure, str) or ':' not in structure:
        return None
    n, _, m = structure.partition(':')
    return (int(n), int(m)) if n.isdigit() and m.isdigit() and 0 < int(n) < int(m) else None


def _is_blocked(active: torch.Tensor, r: int, c: int, tolerance: float = 0.0) -> bool:
    """Whether every ``r x c`` block is all inactive or all active; with ``tolerance``, blocks with an active
    position may together hold up to that fraction of inactive ones (zeros of trained weights)."""
    rows, cols = active.shape
    if rows % r or cols % c:
        return False
    counts = active.reshape(rows // r, r, cols // c, c).sum((1, 3), dtype=torch.int32)
    used = counts > 0
    if tolerance <= 0:
        return bool(((counts == 0) | (counts == r * c)).all())
    n_used = int(used.sum())
    return n_used < used.numel() and int(counts.sum()) >= (1.0 - tolerance) * n_used * r * c


def _is_n_m(active: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = active.shape
    return cols % m == 0 and int(active.reshape(rows, cols // m, m).sum(-1, dtype=torch.int32).max()) <= n


def detect_structure(active: torch.Tensor, declared: str | None = None, from_values: bool = False) -> str | None:
    """The structure of a 2-D bool mask of active weights: ``'RxC'`` blocks, ``'N:M'``, ``'fan-in'`` or None.

    ``declared`` (the sparsifier's ``structure`` spec of the layer) is checked first and returned when the mask obeys
    it; otherwise blocks of :data:`~timm_dst.kernels.sparse_linear.BLOCK_CANDIDATES`, then ``'2:4'``, then a constant
    number of active inputs per output (``'fan-in'``) are looked for. All-active and all-inactive masks have no
    structure. ``from_values``: ``active`` is ``weight != 0`` of a plain model, where a trained weight may be exactly
    zero inside an active block: blocks are then found when their zeros are at most :data:`BLOCK_ZERO_TOLERANCE` of
    them (the zeros are stored in the blocks; outputs are unchanged).
    """
    if active.dim() != 2:
        return None
    n_active = int(active.sum())
    if n_active in (0, active.numel()):
        return None
    size, nm = _block_size(declared), _n_m(declared)
    tol = BLOCK_ZERO_TOLERANCE if from_values else 0.0
    if size is not None and _is_blocked(active, *size, tol):
        return f'{size[0]}x{size[1]}'
    if nm is not None and _is_n_m(active, *nm):
        return f'{nm[0]}:{nm[1]}'
    counts = active.sum(1, dtype=torch.int32)
    if declared == 'fan-in' and bool((counts == counts[0]).all()):
        return 'fan-in'
    for r, c in BLOCK_CANDIDATES:
        if _is_blocked(active, r, c, tol):
            return f'{r}x{c}'
    if _is_n_m(active, 2, 4):
        return '2:4'
    return 'fan-in' if bool((counts == counts[0]).all()) else None


def _csr_tensors(weight: torch.Tensor, active: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = active.nonzero(as_tuple=True)
    crow = torch.zeros(active.shape[0] + 1, dtype=torch.int32, device=weight.device)
    crow[1:] = torch.bincount(rows, minlength=active.shape[0]).cumsum(0)
    return {'crow_indices': crow, 'col_indices': cols.to(torch.int32), 'values': weight[rows, cols].contiguous()}


def _bsr_tensors(weight: torch.Tensor, active: torch.Tensor, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    (r, c), (rows, cols) = block, active.shape
    grid = active.reshape(rows // r, r, cols // c, c).any(3).any(1)
    brow, bcol = grid.nonzero(as_tuple=True)
    crow = torch.zeros(grid.shape[0] + 1, dtype=torch.int32, device=weight.device)
    crow[1:] = torch.bincount(brow, minlength=grid.shape[0]).cumsum(0)
    s = BlockStructure(block=block, shape=(rows, cols), row=brow, col=bcol)
    return {'crow_indices': crow, 'col_indices': bcol.to(torch.int32), 'values': s.values(weight).contiguous()}


class CompressedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is stored compressed (BSR, CSR, or 2:4 semi-structured on CUDA).

    Built by :func:`compress` / :func:`load_compressed`. ``weight`` (a property) rebuilds the dense weight for code
    that reads it (a parent computing with ``child.weight``: correct, but without the speed-up). Inputs whose dtype
    differs from the stored values, or a CSR layer off the float types, run ``F.linear`` on that dense weight.
    """

    def __init__(self, in_features: int, out_features: int, kind: str, tensors: Mapping[str, torch.Tensor],
                 bias: torch.Tensor | None, structure: str | None = None, block: tuple[int, int] | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f'kind {kind!r}: expected one of {KINDS}')
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.kind, self.structure = kind, structure
        self.block = (int(block[0]), int(block[1])) if block is not None else None
        self._semi = None
        if kind == 'semi-structured':
            self._semi = torch.sparse.to_sparse_semi_structured(tensors['weight'].contiguous())
        else:
            for field in _FIELDS[kind]:
                self.register_buffer(field, tensors[field])
        if kind == 'bsr':
            crow = tensors['crow_indices'].long()
            rows = torch.arange(crow.numel() - 1, device=crow.device).repeat_interleave(crow.diff())
            self.register_buffer('_block_row', rows, persistent=False)
            self.register_buffer('_block_col', tensors['col_indices'].long(), persistent=False)
        self.register_buffer('bias', bias.detach().clone() if bias is not None else None)

    @property
    def n_active(self) -> int:
        if self.kind == 'semi-structured':
            return int(torch.count_nonzero(self._semi.to_dense()))
        return self.values.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The plain tensors stored for this layer (what :func:`save_compressed` writes)."""
        if self.kind == 'semi-structured':
            return {'weight': self.weight}
        return {field: getattr(self, field) for field in _FIELDS[self.kind]}

    def _blocks(self) -> BlockStructure:
        return BlockStructure(block=self.block, shape=(self.out_features, self.in_features), row=self._block_row,
                              col=self._block_col)

    def _csr(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                       (self.out_features, self.in_features), check_invariants=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (rebuilt per access)."""
        if self.kind == 'bsr':
            return self._blocks().scatter(self.values)
        if self.kind == 'csr':
            return self._csr().to_dense()
        return self._semi.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == 'semi-structured':
            return F.linear(x, self._semi, self.bias)
        if x.dtype != self.values.dtype or (self.kind == 'csr' and x.dtype not in (torch.float32, torch.float64)):
            return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if self.kind == 'csr' and x.shape[0] >= CSR_DENSE_MIN_ROWS:  # many rows: the dense GEMM on the rebuilt weight
            return F.linear(x, self.weight, self.bias).view(*shape[:-1], self.out_features)
        y = block_matmul(x, self.values, self._blocks()) if self.kind == 'bsr' else csr_matmul(x, self._csr())
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self._semi is not None:
            self._semi = fn(self._semi)
        return out

    def extra_repr(self) -> str:
        density = self.n_active / (self.in_features * self.out_features)
        block = f', block={self.block[0]}x{self.block[1]}' if self.block is not None else ''
        return (f'in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}{block}, '
                f'structure={self.structure}, density={density:.4f}, bias={self.bias is not None}')


def _plain_linear(module: nn.Module) -> bool:
    """A linear layer whose forward is ``F.linear(x, weight, bias)`` (``nn.Linear`` or timm's ``Linear``)."""
    if not isinstance(module, nn.Linear):
        return False
    forwards = {nn.Linear.forward}
    try:
        from timm.layers import Linear as TimmLinear
        forwards.add(TimmLinear.forward)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return type(module).forward in forwards and 'forward' not in module.__dict__


def _choose(structure: str | None, density: float, device: torch.device, limits: Mapping[str, float]
            ) -> tuple[str | None, tuple[int, int] | None, str]:
    """Representation (or None), block size, and the reason when None.

    Blocks try BSR first (at most ``limits['bsr']`` dense from 32x32 blocks, half that for smaller blocks), then CSR;
    2:4 on CUDA tries semi-structured, then CSR; everything else CSR.
    """
    block = _block_size(structure)
    tried = []
    if block is not None and block[0] * block[1] >= BLOCK_MIN_AREA:
        limit = limits['bsr'] * (1.0 if block[0] * block[1] >= BLOCK_FULL_AREA else 0.5)
        if density <= limit:
            return 'bsr', block, ''
        tried.append(f'bsr limit {limit:g} for {block[0]}x{block[1]} blocks')
    if structure == '2:4' and device.type == 'cuda':
        if density <= limits['semi-structured']:
            return 'semi-structured', None, ''
        tried.append(f'semi-structured limit {limits["semi-structured"]:g}')
    if density <= limits['csr']:
        return 'csr', None, ''
    tried.append(f'csr limit {limits["csr"]:g}')
    why = f'density {density:.3f} above the {" and the ".join(tried)}'
    if structure == '2:4' and device.type != 'cuda':
        why += ' (2:4 semi-structured kernels need CUDA)'
    return None, None, why


def _limits(max_density: float | Mapping[str, float] | None) -> dict[str, float]:
    if max_density is None:
        return dict(MAX_DENSITY)
    if isinstance(max_density, Mapping):
        unknown = set(max_density) - set(KINDS)
        if unknown:
            raise ValueError(f'max_density: unknown representation(s) {sorted(unknown)}; expected keys from {KINDS}')
        out = dict(MAX_DENSITY)
        out.update({k: float(v) for k, v in max_density.items()})
    else:
        out = dict.fromkeys(KINDS, float(max_density))
    for k, v in out.items():
        if not 0.0 <= v <= 1.0:
            raise ValueError(f'max_density[{k!r}] = {v!r}: must lie in [0, 1]')
    return out


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition('.')
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def compress(model: nn.Module, max_density: float | Mapping[str, float] | None = None) -> nn.Module:
    """An inference copy of a sparse model whose sparse linear layers run compressed kernels.

    Args:
        model: A model with masks attached by a sparsifier (any wrapper: DDP, ``torch.compile``), or a plain model
            whose inactive weights are zeros. It is not changed.
        max_density: Compress a layer only at or below this density: one float for every representation, or a dict
            by representation (``'bsr'``, ``'csr'``, ``'semi-structured'``) overriding :data:`MAX_DENSITY`.

    Returns:
        A copy in eval mode without gradients, on the model's device, whose compressed layers are
        :class:`CompressedLinear`; ``copy.compression_report`` lists every sparse layer (a :class:`LayerReport`
        each: what it became, or why it stayed as it is).
    """
    limits = _limits(max_density)
    src = unwrap_model(model)
    declared: dict[str, str | None] = {}
    for name, module in src.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, DSTMask) and hook._tensor_name == 'weight':
                declared[name] = getattr(hook, 'structure', None)
    out = copy.deepcopy(src)
    masks = {name: m._buffers['weight_mask'].to(torch.bool) for name, m in out.named_modules()
             if m._buffers.get('weight_mask') is not None}
    fold_masks(out)
    out.eval().requires_grad_(False)
    report: list[LayerReport] = []
    for name, module in list(out.named_modules()):
        weight = module.__dict__.get('weight', module._parameters.get('weight'))
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        active = masks.get(name)
        from_values = active is None
        active = weight != 0 if from_values else active
        n_active = int(active.sum())
        if n_active == active.numel():
            continue  # dense: nothing to compress
        density = n_active / active.numel()
        structure = detect_structure(active, declared.get(name), from_values) if active.dim() == 2 else None
        row = LayerReport(name=name, module=type(module).__name__, shape=tuple(weight.shape), density=density,
                          structure=structure, kind=None)
        report.append(row)
        if not _plain_linear(module):
            row.reason = 'not a plain linear layer (compressed kernels exist for nn.Linear only)'
            continue
        kind, block, row.reason = _choose(structure, density, weight.device, limits)
        if kind is None:
            continue
        with torch.no_grad():
            w = weight.detach()
            if kind == 'bsr':
                tensors = _bsr_tensors(w, active, block)
            elif kind == 'csr':
                tensors = _csr_tensors(w, active)
            else:
                tensors = {'weight': w.contiguous()}
            try:
                new = CompressedLinear(module.in_features, module.out_features, kind, tensors, module.bias,
                                       structure=structure, block=block)
            except RuntimeError as e:  # semi-structured: a shape or dtype its kernels do not take
                row.reason = f'{kind} conversion failed: {e}'.splitlines()[0]
                continue
        new.train(False)
        if name:
            _set_child(out, name, new)
        else:  # the model is the linear layer itself
            out = new
        row.kind = kind
    out.compression_report = report
    _logger.info('timm_dst.compress: %s', format_report(report, summary_only=True))
    return out


def format_report(report: list[LayerReport], summary_only: bool = False) -> str:
    """A summary line of a ``compression_report`` (and, unless ``summary_only``, one line per layer)."""
    kinds: dict[str, int] = {}
    for r in report:
        kinds[r.kind or 'left as is'] = kinds.get(r.kind or 'left as is', 0) + 1
    summary = f'{len(report)} sparse layers: ' + ', '.join(f'{v} {k}' for k, v in kinds.items())
    if summary_only:
        left = [r.name for r in report if r.kind is None]
        return summary + (f' (left as is: {", ".join(left[:8])}{", ..." if len(left) > 8 else ""})' if left else '')
    lines = [summary]
    for r in report:
        what = r.kind if r.kind is not None else f'left as is: {r.reason}'
        lines.append(f'{r.name:40s} {r.module:12s} {"x".join(map(str, r.shape)):>12s} density {r.density:.4f} '
                     f'structure {r.structure or "unstructured"}: {what}')
    return '\n'.join(lines)


def save_compressed(model: nn.Module, path: str | Path) -> None:
    """Write a compressed model (from :func:`compress`) to one safetensors file (format: module docstring)."""
    from safetensors.torch import save_file
    model = unwrap_model(model)
    layers, tensors = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            own = module.tensors()
            layers[name] = {'kind': module.kind, 'structure': module.structure,
                            'shape': [module.out_features, module.in_features],
                            'block': list(module.block) if module.block is not None else None,
                            'bias': module.bias is not None, 'fields': sorted(own)}
            tensors.update({f'{name}.{k}': v for k, v in own.items()})
    prefixes = tuple(n + '.' for n in layers)
    for key, value in model.state_dict().items():
        if not key.startswith(prefixes) or key.endswith('.bias') and key[:-5] in layers:
            tensors[key] = value
    header = {'format': FORMAT, 'version': FORMAT_VERSION, 'layers': layers,
              'architecture': (getattr(model, 'pretrained_cfg', None) or {}).get('architecture'),
              'report': [asdict(r) for r in getattr(model, 'compression_report', [])]}
    save_file({k: v.detach().to('cpu').contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata={'timm_dst': json.dumps(header)})


def load_compressed(model: str | nn.Module, path: str | Path, device: str | torch.device | None = None,
                    **create_kwargs) -> nn.Module:
    """Rebuild a compressed model written by :func:`save_compressed`.

    Args:
        model: A timm model name (created with ``timm.create_model(model, pretrained=False, **create_kwargs)``) or a
            model of the same architecture, whose linear layers named in the file are replaced in place.
        path: The safetensors file.
        device: Where to put the tensors (default CPU); 2:4 semi-structured layers need CUDA.
        **create_kwargs: For ``timm.create_model`` when ``model`` is a name (``num_classes=...`` etc.).

    Returns:
        The model, in eval mode without gradients, with the file's compressed layers and weights.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'load_compressed: no file {str(path)!r}')
    with safe_open(str(path), framework='pt') as f:
        meta = f.metadata() or {}
    header = json.loads(meta['timm_dst']) if 'timm_dst' in meta else {}
    if header.get('format') != FORMAT or header.get('version') != FORMAT_VERSION:
        raise ValueError(f'load_compressed: {str(path)!r} is not a {FORMAT} v{FORMAT_VERSION} file '
                         '(written by timm_dst.save_compressed)')
    if isinstance(model, str):
        import timm
        model = timm.create_model(model, pretrained=False, **create_kwargs)
    elif create_kwargs:
        raise ValueError(f'load_compressed: {sorted(create_kwargs)} given with a model instance; they are for '
                         'timm.create_model when model is a name')
    tensors = load_file(str(path), device=str(device) if device is not None else 'cpu')
    model = model.to(device) if device is not None else model
    model.eval().requires_grad_(False)
    for name, spec in header['layers'].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f'load_compressed: the model has no layer {name!r} (file {str(path)!r})') from None
        shape = [getattr(old, 'out_features', None), getattr(old, 'in_features', None)]
        if not isinstance(old, nn.Linear) or shape != spec['shape']:
            raise ValueError(f'load_compressed: layer {name!r} is {type(old).__name__} {shape}, the file holds a '
                             f'{spec["shape"][0]}x{spec["shape"][1]} linear layer')
        own = {k: tensors.pop(f'{name}.{k}') for k in spec['fields']}
        bias = tensors.pop(f'{name}.bias') if spec['bias'] else None
        if spec['kind'] == 'semi-structured' and own['weight'].device.type != 'cuda':
            warnings.warn(f'load_compressed: {name} is 2:4 semi-structured, whose kernels need CUDA; it stays a dense '
                          'linear layer on this device', stacklevel=2)
            with torch.no_grad():
                old.weight.copy_(own['weight'])
                if bias is not None:
                    old.bias.copy_(bias)
            continue
        new = CompressedLinear(spec['shape'][1], spec['shape'][0], spec['kind'], own, bias,
                               structure=spec['structure'], block=spec['block'])
        _set_child(model, name, new)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    prefixes = tuple(n + '.' for n in header['layers'])
    missing = [k for k in missing if not k.startswith(prefixes)]
    if missing or unexpected:
        raise ValueError(f'load_compressed: {str(path)!r} does not fit the model: missing {missing[:5]}, '
                         f'unexpected {unexpected[:5]}')
    model.compression_report = [LayerReport(**{**r, 'shape': tuple(r['shape'])}) for r in header.get('report', [])]
    return model
