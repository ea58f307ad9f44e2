"""Prints the Markdown tables of docs/results.md from the sweeps' sweep.csv files (run recipes/fmnist/run_all.sh
first). Run from the repository root: ``python recipes/fmnist/make_tables.py [RUNS_DIR]`` (default runs/fmnist)."""
from __future__ import annotations

import csv
import os
import sys


def read(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def cell(r: dict[str, str] | None, field: str = 'test_top1', digits: int = 2) -> str:
    if r is None or not r.get(field + '_mean'):
        return 'not run'
    return f'{float(r[field + "_mean"]):.{digits}f} ± {float(r[field + "_std"]):.{digits}f}'


def acc_rs(r: dict[str, str] | None) -> str:
    if r is None:
        return 'not run'
    return f'{cell(r)} ({float(r["itop_rate_mean"]):.3f})'


def find(rows: list[dict[str, str]], **kv: str) -> dict[str, str] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kv.items()):
            return r
    return None


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join('runs', 'fmnist')
    fig3, dense, static = (read(os.path.join(root, d, 'sweep.csv')) for d in ('fig3', 'dense', 'static'))
    fig4, fig5, table5 = (read(os.path.join(root, d, 'sweep.csv')) for d in ('fig4', 'fig5', 'table5'))
    sparsities = sorted({r['sparsity'] for r in fig3}, key=float)
    dts = sorted({r['update_interval'] for r in fig3}, key=int)

    d = dense[0] if dense else None
    print(f'Dense: test top-1 {cell(d)} (n = {d["n_seeds"] if d else 0})\n')
    print('Figure 3: test top-1 (mean ± std) and R_s (mean) against ΔT; "static" = no exploration\n')
    print('| ΔT | ' + ' | '.join(f'sparsity {s}' for s in sparsities) + ' |')
    print('|---|' + '---|' * len(sparsities))
    for dt in dts:
        print(f'| {dt} | ' + ' | '.join(acc_rs(find(fig3, update_interval=dt, sparsity=s)) for s in sparsities) + ' |')
    print('| static | ' + ' | '.join(acc_rs(find(static, sparsity=s)) for s in sparsities) + ' |')

    if fig5:
        print('\nFigure 5: SET-ITOP vs RigL-ITOP at sparsity 0.95, test top-1 (R_s)\n')
        print('| ΔT | SET-ITOP | RigL-ITOP |\n|---|---|---|')
        for dt in sorted({r['update_interval'] for r in fig5}, key=int):
            print(f'| {dt} | {acc_rs(find(fig5, update_interval=dt, dst="set-itop"))} | '
                  f'{acc_rs(find(fig5, update_interval=dt, dst="rigl-itop"))} |')
    if table5:
        print('\nTable 5: SET vs SET+ at sparsity 0.95, test top-1 (R_s)\n')
        print('| ΔT | SET | SET+ |\n|---|---|---|')
        for dt in sorted({r['update_interval'] for r in table5}, key=int, reverse=True):
            print(f'| {dt} | {acc_rs(find(table5, update_interval=dt, grow_unexplored_first="False"))} | '
                  f'{acc_rs(find(table5, update_interval=dt, grow_unexplored_first="True"))} |')
    if fig4:
        print('\nFigure 4: extended training (SET-ITOP, ΔT 200), test top-1 (R_s)\n')
        eps = sorted({r['epochs'] for r in fig4}, key=int)
        print('| sparsity | ' + ' | '.join(f'{e} epochs' for e in eps) + ' | dense, 2 epochs |')
        print('|---|' + '---|' * (len(eps) + 1))
        for s in sorted({r['sparsity'] for r in fig4}, key=float):
            print(f'| {s} | ' + ' | '.join(acc_rs(find(fig4, epochs=e, sparsity=s)) for e in eps) + f' | {cell(d)} |')


if __name__ == '__main__':
    main()
