"""Inference time of ``timm_dst.compress(model)`` against the dense model, side by side in one process.

Every ratio is ``median(dense) / median(compressed)`` (speed-up, > 1 is faster) over interleaved repeats in this
process, and beside it the ratio of the minima (less sensitive to other processes on a shared machine); absolute
times (medians) are printed only to show how loaded the machine was. The dense model is the same model with
its zeros (what a sparse model costs without compressed kernels). Masks are random, of each structure:
``unstructured``, ``fan-in`` (the same number of active inputs per output), ``16x16`` / ``32x32`` blocks, ``2:4``
(always 50% dense). Parts:

- ``kernels``: one 3072x768 and one 768x3072 layer at 90%, each candidate product (what docs/structured.md's
  "Kernels" table shows);
- ``mlp``: the 24 MLP linear layers of a ViT-B/16 (12 x 768-3072-768) at 1 row and 197 rows;
- ``vit``: the whole ``vit_base_patch16_224`` (every linear layer but the head sparse) at batch 1 and 32;
- ``resnet``: ``resnet50`` (every conv and the fc sparse, unstructured / fan-in masks) at batch 1 and 32.

    python benchmarks/inference.py --quick
    python benchmarks/inference.py --parts mlp vit resnet
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_dst
from timm_dst.kernels.sparse_linear import BlockStructure, block_matmul, csr_matmul

warnings.filterwarnings('ignore', message='Sparse (CSR|BSR) tensor support is in beta')
STRUCTURES = ('unstructured', 'fan-in', '16x16', '32x32', '2:4')


def random_mask(shape: tuple[int, ...], structure: str, sparsity: float, g: torch.Generator) -> torch.Tensor | None:
    """A random bool mask of ``shape`` (2-D or conv) with ``structure``; None when the shape does not fit it."""
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    density = 1.0 - sparsity
    if structure == 'unstructured':
        k = max(1, round(density * rows * cols))
        flat = torch.zeros(rows * cols, dtype=torch.bool)
        flat[torch.randperm(rows * cols, generator=g)[:k]] = True
        return flat.view(shape)
    if structure == 'fan-in':
        k = max(1, round(density * cols))
        order = torch.rand(rows, cols, generator=g).argsort(1)[:, :k]
        return torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, order, True).view(shape)
    if structure == '2:4':
        if cols % 4:
            return None
        order = torch.rand(rows, cols // 4, 4, generator=g).argsort(2)[..., :2]
        return torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, order, True).view(shape)
    r, c = (int(v) for v in structure.split('x'))
    if len(shape) != 2 or rows % r or cols % c:
        return None
    grid = random_mask((rows // r, cols // c), 'unstructured', sparsity, g)
    return grid.repeat_interleave(r, 0).repeat_interleave(c, 1)


def sparsify_(model: nn.Module, structure: str, sparsity: float, conv: bool = False, seed: int = 0) -> int:
    """Zero the weights of every linear layer but the classifier (and every conv with ``conv``) outside a random mask
    of ``structure``; returns how many layers were masked (shapes that do not fit the structure stay dense)."""
    g = torch.Generator().manual_seed(seed)
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if m is head or not (isinstance(m, nn.Linear) or conv and isinstance(m, nn.Conv2d)):
                continue
            mask = random_mask(tuple(m.weight.shape), structure, sparsity, g)
            if mask is not None:
                m.weight.mul_(mask)
                n += 1
    return n


def compare(fns: dict[str, callable], x: torch.Tensor, reps: int, warmup: int = 2) -> dict[str, tuple[float, float]]:
    """``(median, min)`` seconds of ``fn(x)`` for each function, timed in interleaved rounds."""
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def _row(cells: list) -> str:
    return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def _kernel_candidates(rows_n: int, cols_n: int, g: torch.Generator) -> dict[str, callable]:
    """The candidate products of one 90% sparse ``rows_n x cols_n`` layer (fan-in and 32x32 masks), as ``fn(x)``."""
    w = torch.randn(rows_n, cols_n, generator=g)
    k = round(0.1 * cols_n)
    fan = random_mask((rows_n, cols_n), 'fan-in', 0.9, g)
    idx = fan.nonzero()[:, 1].view(rows_n, k)
    w_fan = w * fan
    vals = w_fan[fan].view(rows_n, k)
    csr = w_fan.to_sparse_csr()
    csr = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape,
                                  check_invariants=False)
    blk_mask = random_mask((rows_n, cols_n), '32x32', 0.9, g)
    w_blk = w * blk_mask
    bsr = w_blk.to_sparse_bsr((32, 32))
    row, col = blk_mask[::32, ::32].nonzero(as_tuple=True)
    s = BlockStructure(block=(32, 32), shape=(rows_n, cols_n), row=row, col=col)
    blocks = s.values(w_blk)
    return {
        'dense F.linear': lambda x: F.linear(x, w),
        'fan-in: naive gather (vals * x[:, idx]).sum(-1)': lambda x: (vals * x[:, idx]).sum(-1),
        'fan-in / unstructured: CSR torch.sparse.mm': lambda x: torch.sparse.mm(csr, x.t()).t(),
        'fan-in / unstructured: CSR torch.mv per row': lambda x: torch.stack([torch.mv(csr, r) for r in x]),
        'fan-in / unstructured: F.embedding_bag over x^T': lambda x: F.embedding_bag(
            csr.col_indices(), x.t().contiguous(), csr.crow_indices()[:-1], mode='sum',
            per_sample_weights=csr.values()).t(),
        'fan-in / unstructured: csr_matmul (used)': lambda x: csr_matmul(x, csr),
        '32x32: torch BSR torch.sparse.mm': lambda x: torch.sparse.mm(bsr, x.t()).t(),
        '32x32: block bmm (used)': lambda x: block_matmul(x, blocks, s),
    }


def part_kernels(args) -> None:
    print('\n### kernels: one layer, 90% sparse, each candidate product (speed-up = dense / candidate)')
    print(_row(['layer', 'rows', 'threads', 'dense ms', 'candidate', 'ms', 'speed-up (medians)', 'speed-up (minima)']))
    print(_row(['---'] * 8))
    g = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows_n, cols_n in ((3072, 768), (768, 3072)):
            cands = _kernel_candidates(rows_n, cols_n, g)
            for n in (1, 197):
                x = torch.randn(n, cols_n, generator=g)
                fns = dict(cands)
                if n > 1:  # the naive gather's (n, out, k) temporaries make it 0.1x; mv per row is for a few rows
                    del fns['fan-in: naive gather (vals * x[:, idx]).sum(-1)']
                    del fns['fan-in / unstructured: CSR torch.mv per row']
                t = compare(fns, x, args.reps * 5)
                d = t.pop('dense F.linear')
                for name, v in t.items():
                    print(_row([f'{rows_n}x{cols_n}', n, threads, f'{d[0] * 1e3:.3f}', name, f'{v[0] * 1e3:.3f}',
                                f'{d[0] / v[0]:.2f}x', f'{d[1] / v[1]:.2f}x']), flush=True)


def _mlp_stack() -> nn.Module:
    layers = []
    for _ in range(12):
        layers += [nn.Linear(768, 3072), nn.Linear(3072, 768)]
    return nn.Sequential(*layers)


def _compare_models(label: str, make, structures, sparsities, batches, inputs, args, conv: bool = False) -> None:
    for structure in structures:
        for sparsity in (sparsities if structure != '2:4' else [0.5]):
            torch.set_num_threads(max(args.threads))
            dense = make()
            n_masked = sparsify_(dense, structure, sparsity, conv=conv)
            comp = timm_dst.compress(dense)
            n_comp = sum(r.kind is not None for r in comp.compression_report)
            kinds = sorted({r.kind for r in comp.compression_report if r.kind is not None}) or ['none']
            for threads in args.threads:
                torch.set_num_threads(threads)
                for b in batches:
                    x = inputs(b)
                    with torch.inference_mode():
                        torch.testing.assert_close(comp(x), dense(x), rtol=1e-3, atol=1e-3)
                    reps = args.reps if b == 1 else max(3, args.reps // 3)
                    t = compare({'dense': dense, 'compressed': comp}, x, reps, warmup=1)
                    (d_med, d_min), (c_med, c_min) = t['dense'], t['compressed']
                    print(_row([label, structure, sparsity, b, threads, f'{d_med * 1e3:.1f}', f'{c_med * 1e3:.1f}',
                                f'**{d_med / c_med:.2f}x**', f'{d_min / c_min:.2f}x',
                                f'{n_comp}/{n_masked} ({", ".join(kinds)})']), flush=True)


def _header(title: str) -> None:
    print(f'\n### {title}')
    print(_row(['model', 'structure', 'sparsity', 'rows / batch', 'threads', 'dense ms', 'compressed ms',
                'speed-up (medians)', 'speed-up (minima)', 'compressed / masked layers']))
    print(_row(['---'] * 10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--parts', nargs='+', default=['kernels', 'mlp', 'vit', 'resnet'],
                   choices=['kernels', 'mlp', 'vit', 'resnet'])
    p.add_argument('--structures', nargs='+', default=list(STRUCTURES), choices=STRUCTURES)
    p.add_argument('--sparsities', nargs='+', type=float, default=[0.8, 0.9, 0.95])
    p.add_argument('--threads', nargs='+', type=int, default=[1, torch.get_num_threads()])
    p.add_argument('--batches', nargs='+', type=int, default=[1, 32], help='batch sizes of the whole models')
    p.add_argument('--reps', type=int, default=9, help='timed rounds at batch 1 (a third of them at larger batches)')
    p.add_argument('--quick', action='store_true',
                   help='a few minutes: 90%% only, MLP stack and ViT-B at batch 1, ResNet-50 left out')
    args = p.parse_args()
    args.threads = sorted(set(args.threads))
    big_batches = args.batches
    if args.quick:
        args.sparsities, args.reps, big_batches = [0.9], 5, [1]
        args.parts = [q for q in args.parts if q != 'resnet']
    print(f'torch {torch.__version__}, timm {timm.__version__}, threads {args.threads}, '
          f'{torch.backends.cpu.get_cpu_capability()}')
    if 'kernels' in args.parts:
        part_kernels(args)
    if 'mlp' in args.parts:
        _header('ViT-B/16 MLP stack: 24 linear layers, 12 x 768-3072-768')
        _compare_models('MLP stack', _mlp_stack, args.structures, args.sparsities, [1, 197],
                        lambda n: torch.randn(n, 768), args)
    if 'vit' in args.parts:
        _header('vit_base_patch16_224, every linear layer but the head sparse')
        _compare_models('vit_base_patch16_224', lambda: timm.create_model('vit_base_patch16_224').eval(),
                        args.structures, args.sparsities, big_batches, lambda n: torch.randn(n, 3, 224, 224), args)
    if 'resnet' in args.parts:
        _header('resnet50, every conv and linear layer but the fc sparse (convolutions are not compressed)')
        _compare_models('resnet50', lambda: timm.create_model('resnet50').eval(),
                        [s for s in args.structures if s in ('unstructured', 'fan-in')], args.sparsities,
                        big_batches, lambda n: torch.randn(n, 3, 224, 224), args, conv=True)


if __name__ == '__main__':
    main()
