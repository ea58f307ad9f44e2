"""Cost of one topology update divided by one training step, measured side by side in one process.

For each method, a sparse model trains; between timed training steps (forward, backward, optimizer step) a topology
update is timed on its own (``Sparsifier.update``). Medians over ``--repeats`` interleaved pairs are compared.

    python benchmarks/update_cost.py --model resnet50 --img-size 128 -b 32 --methods set rigl dsr
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import timm_dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='resnet50')
    p.add_argument('--methods', nargs='+', default=['set', 'rigl', 'dsr'], choices=timm_dst.list_methods())
    p.add_argument('--sparsity', type=float, default=0.9)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))
    print(f'model={args.model} sparsity={args.sparsity} batch={args.batch_size} input=3x{args.img_size}^2 '
          f'threads={args.threads} repeats={args.repeats}')
    for method in args.methods:
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        kwargs = dict(dsr_np=100_000) if method == 'dsr' else {}
        # no scheduled updates: updates are triggered by hand so they can be timed on their own
        sp = timm_dst.create_sparsifier(model, opt, method=method, sparsity=args.sparsity, update_interval=10 ** 9,
                                        update_end=None, prune_rate=0.3, prune_rate_schedule='constant', **kwargs)
        dense_grads = timm_dst.get_method_info(method).uses_dense_grads
        if dense_grads:
            sp._set_capture(True)  # what the hook does on the step before an update

        def train_step(model=model, opt=opt):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        train_step()
        steps, updates = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            train_step()
            steps.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sp.update()
            updates.append(time.perf_counter() - t0)
            if dense_grads:
                sp._set_capture(True)
        s, u = statistics.median(steps), statistics.median(updates)
        print(f'{method:6s} train step {s * 1e3:8.1f} ms  update {u * 1e3:8.1f} ms  update / step = {u / s:.3f}')


if __name__ == '__main__':
    main()
