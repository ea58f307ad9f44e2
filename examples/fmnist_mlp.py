"""Train the ITOP paper's MLP on Fashion-MNIST at 98% sparsity with ``static`` and ``set-itop``.

Prints validation / test accuracy and R_s of each run. Uses the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``). About 3 minutes on a 2-core CPU with the defaults.

    python examples/fmnist_mlp.py --epochs 5 --methods static set-itop
"""
from __future__ import annotations

import argparse
import os
import time

import timm
import torch
import torch.nn.functional as F

import timm_dst
from timm_dst.cli.data import read_idx

DATA_DIR = '/usr/share/datasets/fashion-mnist'


def load_fashion_mnist(data_dir: str = DATA_DIR):
    if not os.path.isdir(data_dir):
        raise SystemExit(f'Fashion-MNIST not found in {data_dir}: apt-get install dataset-fashion-mnist')
    out = {}
    for split, prefix in (('train', 'train'), ('test', 't10k')):
        x = read_idx(os.path.join(data_dir, f'{prefix}-images-idx3-ubyte.gz'))
        y = read_idx(os.path.join(data_dir, f'{prefix}-labels-idx1-ubyte.gz'))
        x = (x.float().div_(255.0) - 0.2860) / 0.3530
        out[split] = (x.unsqueeze(1), y.long())
    return out


@torch.no_grad()
def accuracy(model, x, y, batch_size=1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train()
    return 100.0 * correct / len(x)


def run(method: str, data, args) -> dict:
    torch.manual_seed(args.seed)
    x_all, y_all = data['train']
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    n_val = len(x_all) // 10  # the ITOP paper holds out 10% of the training set
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    x_tr, y_tr = x_all[train_idx], y_all[train_idx]
    steps_per_epoch = len(x_tr) // args.batch_size
    total = steps_per_epoch * args.epochs
    model = timm.create_model('itop_mlp', num_classes=10, in_chans=1, img_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sp = timm_dst.create_sparsifier(model, opt, method=method, sparsity=args.sparsity, distribution='er',
                                    update_interval=args.update_interval, total_steps=total, seed=args.seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    best_val, best_state, t0 = -1.0, None, time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_tr))
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy(model, x_all[val_idx], y_all[val_idx])
        if val > best_val:
            best_val, best_state = val, timm_dst.export_state_dict(model)
        print(f'  {method:9s} epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  val {val:.2f}%  '
              f'density {sp.density:.4f}  R_s {sp.itop_rate:.4f}', flush=True)
    plain = timm.create_model('itop_mlp', num_classes=10, in_chans=1, img_size=28)
    plain.load_state_dict(best_state)  # best epoch chosen on validation, never on test
    test = accuracy(plain, *data['test'])
    return dict(method=method, val=best_val, test=test, density=sp.density, itop_rate=sp.itop_rate,
                seconds=time.time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--methods', nargs='+', default=['static', 'set-itop'], choices=timm_dst.list_methods())
    parser.add_argument('--sparsity', type=float, default=0.98)
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--lr', type=float, default=0.01)
    parser.add_argument('--update-interval', type=int, default=200)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--data-dir', default=DATA_DIR)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = load_fashion_mnist(args.data_dir)
    results = [run(m, data, args) for m in args.methods]
    print(f'\nFashion-MNIST, MLP 784-1024-512-10, sparsity {args.sparsity}, {args.epochs} epochs, batch '
          f'{args.batch_size}, ΔT {args.update_interval}')
    print('| method | best val acc | test acc | density | R_s | time (s) |')
    print('|---|---|---|---|---|---|')
    for r in results:
        print(f"| {r['method']} | {r['val']:.2f} | {r['test']:.2f} | {r['density']:.4f} | {r['itop_rate']:.4f} | "
              f"{r['seconds']:.0f} |")


if __name__ == '__main__':
    main()
