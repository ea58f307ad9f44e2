"""Prints the accuracy tables of "What structure costs in accuracy" (docs/structured.md, docs/results.md) from the
sweeps of recipes/structured/ (commands in docs/results.md). Run from the repository root:

    python recipes/structured/make_table.py [RUNS_DIR]

(default ``recipes/structured/results``, where the sweeps' ``--archive`` keeps every run's ``results.json``; a runs
folder of the same layout works too). Each cell: test top-1 of the best-on-validation weights, mean ± std over the
finished seeds, and in brackets the difference from the unstructured run of the same method and sparsity.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from timm_dst.tools.sweep import aggregate, collect

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')  # the sweeps' --archive
METHODS = ('set-itop', 'rigl-itop')


def point(folder: str, seeds: tuple[int, ...] = (0, 1), **kv: Any) -> dict[str, Any] | None:
    """Mean / std over the finished seeds of one grid point of one sweep folder."""
    rows = collect(folder, [dict(kv)], seeds)
    return aggregate(rows, list(kv))[0] if rows else None


def cell(r: dict[str, Any] | None, base: dict[str, Any] | None, n_expected: int = 2) -> str:
    if r is None or 'test_top1_mean' not in r:
        return 'not run'
    s = f'{r["test_top1_mean"]:.2f}' + (f' ± {r["test_top1_std"]:.2f}' if r['n_seeds'] > 1 else '')
    if r['n_seeds'] != n_expected:
        s += f' (n={r["n_seeds"]})'
    if base is not None and 'test_top1_mean' in base:
        s += f' ({r["test_top1_mean"] - base["test_top1_mean"]:+.2f})'
    return s


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else RESULTS
    mlp, nm, cnn = (os.path.join(root, d) for d in ('mlp', 'mlp_nm', 'resnet10t'))
    cols = [(m, s) for s in (0.9, 0.98) for m in METHODS]
    print('MLP 784-1024-512-10, Fashion-MNIST, 10 epochs: test top-1 (difference from unstructured)\n')
    print('| structure | ' + ' | '.join(f'{m} {s}' for m, s in cols) + ' |')
    print('|---|' + '---|' * len(cols))
    base = {c: point(mlp, structure='none', sparsity=c[1], dst=c[0]) for c in cols}
    for st in ('none', 'fan-in', '16x16', '32x32'):
        label = 'unstructured' if st == 'none' else st
        ref = {c: None if st == 'none' else base[c] for c in cols}
        print(f'| {label} | ' + ' | '.join(cell(point(mlp, structure=st, sparsity=s, dst=m), ref[(m, s)])
                                         for m, s in cols) + ' |')
    print('\nMLP at sparsity 0.5: 2:4 against unstructured\n')
    print('| structure | ' + ' | '.join(METHODS) + ' |\n|---|' + '---|' * len(METHODS))
    base50 = {m: point(nm, structure='none', sparsity=0.5, dst=m) for m in METHODS}
    for st in ('none', '2:4'):
        label = 'unstructured' if st == 'none' else st
        ref = {m: None if st == 'none' else base50[m] for m in METHODS}
        print(f'| {label} | ' + ' | '.join(cell(point(nm, structure=st, sparsity=0.5, dst=m), ref[m])
                                         for m in METHODS) + ' |')
    print('\nresnet10t, Fashion-MNIST 28 px, sparsity 0.9, SET-ITOP, 1 epoch, seed 0: test top-1 (R_s)\n')
    print('| structure | test top-1 | R_s |\n|---|---|---|')
    b = point(cnn, seeds=(0,), structure='none', dst='set-itop')
    for st in ('none', 'fan-in', '16x16'):
        r = point(cnn, seeds=(0,), structure=st, dst='set-itop')
        rs = f'{r["itop_rate_mean"]:.3f}' if r is not None and 'itop_rate_mean' in r else ''
        c = cell(r, None if st == 'none' else b, n_expected=1)
        print(f'| {"unstructured" if st == "none" else st} | {c} | {rs} |')


if __name__ == '__main__':
    main()
