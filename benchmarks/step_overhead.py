"""Training-step time with the sparsifier divided by the dense step time, measured side by side in one process.

Dense and sparse copies of the model train in interleaved blocks; every step is timed. The sparse step cost is the
median of its ordinary steps plus the extra cost of an update amortised over ΔT (``--update-interval``): the update
step's and that of the step after it, which rebuilds the per-mask caches (gradient mask, sparse-kernel structure)
once per update: ``(median(ordinary) + (extra(update steps) + extra(steps after)) / ΔT) / median(dense)``. To keep
big models affordable, updates can be triggered more often while measuring (``--measure-every``) and amortised over
the real ΔT. Machines are noisy: read ratios, not absolute times.

    python benchmarks/step_overhead.py --model itop_mlp --model-kwargs in_chans=1 img_size=28 -b 128
    python benchmarks/step_overhead.py --model resnet50 --img-size 128 -b 32 --measure-every 5 --blocks 4

``--structures`` measures one sparse model per structure (``create_sparsifier(structure=...)``; ``none`` =
unstructured) against the same dense model, in one process:

    python benchmarks/step_overhead.py --model vit_small_patch16_224 --model-kwargs img_size=64 -b 32 \
        --structures none 32x32 16x16 fan-in --threads 1 --measure-every 5 --blocks 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import timm_dst


def _parse_kwargs(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, v = item.split('=', 1)
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def _kernel_kwargs(args) -> dict:
    return {} if args.sparse_kernel_density is None else {'sparse_kernel_density': args.sparse_kernel_density}


def _setup(args, sparse: bool, structure: str | None = None):
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.num_classes, **_parse_kwargs(args.model_kwargs))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sp = None
    if sparse:
        kw = _kernel_kwargs(args)
        if structure is not None:
            kw['structure'] = structure
        sp = timm_dst.create_sparsifier(model, opt, method=args.method, sparsity=args.sparsity,
                                        update_interval=args.measure_every or args.update_interval,
                                        total_steps=10 ** 6, update_end=None, **kw)
    return model, opt, sp


def _block(model, opt, sp, x, y, steps: int) -> tuple[list[float], list[float], list[float]]:
    """Per-step times of ordinary steps, of update steps, and of the first step after each update (which rebuilds
    the per-mask caches of the gradient mask and the sparse kernels once per update)."""
    plain, updates, after = [], [], []
    last_was_update = False
    for _ in range(steps):
        n_hist = len(sp.history) if sp is not None else 0
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        is_update = sp is not None and len(sp.history) > n_hist
        (updates if is_update else after if last_was_update else plain).append(dt)
        last_was_update = is_update
    return plain, updates, after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='itop_mlp')
    p.add_argument('--model-kwargs', nargs='*', default=[], help='key=value pairs for timm.create_model')
    p.add_argument('--method', default='set-itop', choices=timm_dst.list_methods())
    p.add_argument('--sparsity', type=float, default=0.9)
    p.add_argument('--update-interval', type=int, default=100, help='ΔT the update cost is amortised over')
    p.add_argument('--measure-every', type=int, default=None, help='trigger updates this often while measuring')
    p.add_argument('--block-steps', type=int, default=None, help='steps per block (default: --measure-every or ΔT)')
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=None, help="input size (default: the model's)")
    p.add_argument('--in-chans', type=int, default=None)
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--blocks', type=int, default=5, help='interleaved blocks per variant')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--sparse-kernel-density', type=float, default=None,
                   help="CSR kernels for nn.Linear layers at or below this density (default: the library's; 0 = off)")
    p.add_argument('--structures', nargs='+', default=['none'],
                   help="one sparse model per structure, each against the dense one: none (unstructured), 'RxC', "
                        "'fan-in', 'N:M'")
    args = p.parse_args()
    structures = [None if s == 'none' else s for s in args.structures]
    torch.set_num_threads(args.threads)
    steps = args.block_steps or args.measure_every or args.update_interval
    dense = _setup(args, sparse=False)
    c, h, w = timm.data.resolve_data_config({}, model=dense[0])['input_size']
    kw = _parse_kwargs(args.model_kwargs)
    c = args.in_chans or kw.get('in_chans', c)
    h = w = args.img_size or kw.get('img_size', h)
    x = torch.randn(args.batch_size, c, h, w)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    _block(*dense, x, y, 2)  # warm-up
    print(f'model={args.model} method={args.method} sparsity={args.sparsity} batch={args.batch_size} '
          f'input={c}x{h}x{w} threads={args.threads} blocks={args.blocks}x{steps} steps')
    for structure in structures:
        sparse = _setup(args, sparse=True, structure=structure)
        _block(*sparse, x, y, 2)
        d_times, s_plain, s_update, s_after = [], [], [], []
        for _ in range(args.blocks):
            d_times += _block(*dense, x, y, steps)[0]
            plain, upd, after = _block(*sparse, x, y, steps)
            s_plain += plain
            s_update += upd
            s_after += after
        d, s = statistics.median(d_times), statistics.median(s_plain)
        u = statistics.median(s_update) - s if s_update else 0.0
        u += statistics.median(s_after) - s if s_after else 0.0  # cache rebuilds: paid once per update
        amortised = s + u / args.update_interval
        kernels = _kernel_summary(sparse[0])
        print(f'structure={structure or "unstructured"}: {len(s_update)} updates; sparse-kernel layers: {kernels}')
        print(f'dense step {d * 1e3:.2f} ms | sparse ordinary step {s * 1e3:.2f} ms | update extra {u * 1e3:.1f} ms '
              '(update step and the step after it)')
        print(f'ordinary-step ratio {s / d:.3f}; update extra / dense step {u / d:.3f}')
        print(f'step overhead ratio at ΔT={args.update_interval} (sparse / dense, updates amortised): '
              f'{amortised / d:.3f}')
        del sparse


def _kernel_summary(model) -> str:
    """How many linear layers run block / CSR kernels now (float32 CPU inputs)."""
    from timm_dst.kernels.sparse_linear import BlockStructure, SparseLinearForward
    kinds = {'block': 0, 'csr': 0}
    for m in model.modules():
        fwd = m.__dict__.get('forward')
        if isinstance(fwd, SparseLinearForward):
            s = fwd._structure(torch.zeros(1, m.in_features))
            if s is not None:
                kinds['block' if isinstance(s, BlockStructure) else 'csr'] += 1
    return f'{kinds["block"]} block, {kinds["csr"]} CSR'


if __name__ == '__main__':
    main()
