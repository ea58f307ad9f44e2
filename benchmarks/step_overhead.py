"""Training-step time with the sparsifier divided by the dense step time, measured side by side in one process.

Dense and sparse copies of the model train in interleaved blocks of ``--update-interval`` steps (so each sparse
block contains exactly one topology update, amortised); the ratio of the medians of the per-block step times is
printed. Machines are noisy: read ratios, not absolute times.

    python benchmarks/step_overhead.py --model itop_mlp --model-kwargs in_chans=1 img_size=28 -b 128
    python benchmarks/step_overhead.py --model resnet50 --img-size 64 -b 8 --blocks 3
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


def _setup(args, sparse: bool):
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.num_classes, **_parse_kwargs(args.model_kwargs))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sp = None
    if sparse:
        sp = timm_dst.create_sparsifier(model, opt, method=args.method, sparsity=args.sparsity,
                                        update_interval=args.update_interval, total_steps=10 ** 6, update_end=None)
    return model, opt, sp


def _block(model, opt, x, y, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='itop_mlp')
    p.add_argument('--model-kwargs', nargs='*', default=[], help='key=value pairs for timm.create_model')
    p.add_argument('--method', default='set-itop', choices=timm_dst.list_methods())
    p.add_argument('--sparsity', type=float, default=0.9)
    p.add_argument('--update-interval', type=int, default=100)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=None, help='input size (default: the model\'s)')
    p.add_argument('--in-chans', type=int, default=None)
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--blocks', type=int, default=5, help='interleaved blocks per variant')
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense = _setup(args, sparse=False)
    sparse = _setup(args, sparse=True)
    cfg = timm.data.resolve_data_config({}, model=dense[0])
    c, h, w = cfg['input_size']
    kw = _parse_kwargs(args.model_kwargs)
    c = args.in_chans or kw.get('in_chans', c)
    h = w = args.img_size or kw.get('img_size', h)
    x = torch.randn(args.batch_size, c, h, w)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    _block(dense[0], dense[1], x, y, 3)  # warm-up
    _block(sparse[0], sparse[1], x, y, 3)
    times = {'dense': [], 'sparse': []}
    for _ in range(args.blocks):
        times['dense'].append(_block(dense[0], dense[1], x, y, args.update_interval))
        times['sparse'].append(_block(sparse[0], sparse[1], x, y, args.update_interval))
    d, s = statistics.median(times['dense']), statistics.median(times['sparse'])
    n_updates = len(sparse[2].history) - 1
    print(f'model={args.model} method={args.method} sparsity={args.sparsity} ΔT={args.update_interval} '
          f'batch={args.batch_size} input={c}x{h}x{w} threads={args.threads} updates={n_updates}')
    print(f'dense step {d * 1e3:.2f} ms, sparse step {s * 1e3:.2f} ms (medians of {args.blocks} interleaved blocks)')
    print(f'step overhead ratio (sparse / dense): {s / d:.3f}')


if __name__ == '__main__':
    main()
