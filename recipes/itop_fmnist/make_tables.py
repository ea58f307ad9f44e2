"""Prints the Markdown tables of docs/results.md's paper-scale section and draws its Figure 4 / 5 panels, from the runs
of ``recipes/itop_fmnist/run_all.sh``. Run from the repository root:

    python recipes/itop_fmnist/make_tables.py [RUNS_DIR] [--figures DIR]

(default ``runs/itop_fmnist``; figures are drawn only with ``--figures``). Points with no finished run print
``not run``. Beside each point the official ITOP code was run on (issue #19: same loop, seeds 0 and 1, final weights)
it prints that number and whether ours agrees within the seed spread of this setup (0.8 points, the largest
seed-to-seed difference seen with the official code here).
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from timm_dst.tools.sweep import aggregate, collect

SEEDS = (0, 1)
SEEDS60 = (0, 1, 2)  # the comparison with the official code on all 60k images (issue #24): 3 seeds
SPARSITIES = (0.9, 0.95, 0.98)
INTERVALS = (30, 100, 500, 1500, 4000)
SPREAD = 0.8  # points: the largest seed-to-seed difference of the official code in this setup (issue #19)

# The official ITOP code's results in the same loop (issue #19): mean of seeds 0 and 1, test top-1 of the final
# weights, and R_s where reported. Keys: (sweep, point) as in this script.
OFFICIAL: dict[tuple[str, tuple], tuple[float, float | None]] = {
    ('dense', ()): (90.09, None),
    ('static', (('sparsity', 0.98),)): (84.97, None),
    ('static', (('sparsity', 0.95),)): (87.08, None),  # 4 seeds
    ('fig3', (('update_interval', 4000), ('sparsity', 0.98))): (85.69, 0.037),
    ('fig3', (('update_interval', 1500), ('sparsity', 0.98))): (86.05, 0.071),
    ('fig3', (('update_interval', 500), ('sparsity', 0.98))): (86.50, 0.167),
    ('fig3', (('update_interval', 100), ('sparsity', 0.98))): (86.43, 0.570),
    ('fig3', (('update_interval', 30), ('sparsity', 0.98))): (86.45, 0.939),
    ('table5', (('update_interval', 1500), ('grow_unexplored_first', True))): (86.13, 0.072),
    ('rigl', (('sparsity', 0.98),)): (87.38, 0.036),
}


def point(root: str, sweep: str, seeds: tuple[int, ...] = SEEDS, **kv: Any) -> dict[str, Any] | None:
    """Mean / std over the finished seeds of one grid point of one sweep folder (None: no finished run)."""
    rows = collect(os.path.join(root, sweep), [dict(kv)], seeds)
    return aggregate(rows, list(kv))[0] if rows else None


def acc(r: dict[str, Any] | None, field: str = 'test_top1') -> str:
    if r is None or field + '_mean' not in r:
        return 'not run'
    if r['n_seeds'] < 2:
        return f'{r[field + "_mean"]:.2f} (n={r["n_seeds"]})'
    n = '' if r['n_seeds'] == len(SEEDS) else f' (n={r["n_seeds"]})'
    return f'{r[field + "_mean"]:.2f} ± {r[field + "_std"]:.2f}{n}'


def acc_rs(r: dict[str, Any] | None) -> str:
    return acc(r) if r is None or 'itop_rate_mean' not in r else f'{acc(r)} ({r["itop_rate_mean"]:.3f})'


def _ours(r: dict[str, Any] | None, ref: tuple[float, float | None],
          seeds: tuple[int, ...] = SEEDS) -> tuple[str, str]:
    """Our final-weight cell (mean, ± std where there are several seeds, R_s) and its agreement with the official
    number ``ref``."""
    if r is None or 'test_top1_last_mean' not in r:
        return 'not run', ''
    ours = r['test_top1_last_mean']
    std = f' ± {r["test_top1_last_std"]:.2f}' if r['n_seeds'] > 1 and 'test_top1_last_std' in r else ''
    rs = f' ({r["itop_rate_mean"]:.3f})' if ref[1] is not None and 'itop_rate_mean' in r else ''
    d = ours - ref[0]
    rs += '' if r['n_seeds'] == len(seeds) else f' (n={r["n_seeds"]})'
    return f'{ours:.2f}{std}{rs}', (f'yes ({d:+.2f})' if abs(d) <= SPREAD else f'**no** ({d:+.2f})')


def official(root: str, sweep: str, **kv: Any) -> str:
    """``ours | agree? | ours on all 60k | agree? | official`` cells for a point the official code was run on."""
    ref = OFFICIAL.get((sweep, tuple(kv.items())))
    if ref is None:
        return ' | | | | '
    off = f'{ref[0]:.2f}' + (f' ({ref[1]:.3f})' if ref[1] is not None else '')
    split = _ours(point(root, sweep, **kv), ref)
    full = _ours(point(os.path.join(root, 'full60k'), sweep, seeds=SEEDS60, **kv), ref, SEEDS60)
    return f'{split[0]} | {split[1]} | {full[0]} | {full[1]} | {off}'


def tables(root: str) -> dict[str, dict]:
    dense = point(root, 'dense')
    print(f'Dense (40 epochs): test top-1 {acc(dense)}\n')

    print('Figure 3: SET-ITOP, test top-1 of the best-on-validation weights, mean ± std over seeds 0 and 1 (R_s)\n')
    print('| ΔT | ' + ' | '.join(f'sparsity {s}' for s in SPARSITIES) + ' |')
    print('|---|' + '---|' * len(SPARSITIES))
    for dt in INTERVALS:
        print(f'| {dt} | ' + ' | '.join(acc_rs(point(root, 'fig3', update_interval=dt, sparsity=s))
                                       for s in SPARSITIES) + ' |')
    print('| static | ' + ' | '.join(acc_rs(point(root, 'static', sparsity=s)) for s in SPARSITIES) + ' |')

    print('\nBeside the official ITOP code (same setup, mean of its seeds 0 and 1, test top-1 of the FINAL weights, '
          f'R_s); "agree" = within {SPREAD} points. "54k": our recipes (6,000 images held out for validation, seeds 0 '
          'and 1); "60k": the same on all 60,000 training images (`--val-fraction 0`), as the official runs, mean ± '
          'std over seeds 0, 1 and 2\n')
    print('| config | timm-dst CLI, 54k | agree | timm-dst CLI, 60k | agree | official code (60k) |\n'
          '|---|---|---|---|---|---|')
    rows = [('dense', 'dense', {}), ('static 98%', 'static', {'sparsity': 0.98}),
            ('static 95%', 'static', {'sparsity': 0.95})]
    rows += [(f'SET 98%, ΔT {dt}', 'fig3', {'update_interval': dt, 'sparsity': 0.98}) for dt in INTERVALS[::-1]]
    rows += [('SET+ 98%, ΔT 1500', 'table5', {'update_interval': 1500, 'grow_unexplored_first': True}),
             ('RigL 98%, ΔT 4000', 'rigl', {'sparsity': 0.98})]
    for label, sweep, kv in rows:
        print(f'| {label} | {official(root, sweep, **kv)} |')

    print('\nTable 5: SET vs SET+ at sparsity 0.98, test top-1 (R_s)\n')
    print('| ΔT | SET | SET+ |\n|---|---|---|')
    for dt in (1500, 500):
        print(f'| {dt} | {acc_rs(point(root, "fig3", update_interval=dt, sparsity=0.98))} | '
              f'{acc_rs(point(root, "table5", update_interval=dt, grow_unexplored_first=True))} |')

    ext = {
        1: point(root, 'fig3', update_interval=1500, sparsity=0.98),
        2: point(root, 'fig4_x2', sparsity=0.98), 5: point(root, 'fig4_x5', sparsity=0.98),
        10: point(root, 'fig4_x10', sparsity=0.98),
    }
    stop = {2: point(root, 'fig4_x2', sparsity=0.98, update_end=0.5),
            5: point(root, 'fig4_x5', sparsity=0.98, update_end=0.2)}
    rigl = {1: point(root, 'rigl', sparsity=0.98), 5: point(root, 'rigl_x5', sparsity=0.98)}
    print('\nFigure 4: extended training at sparsity 0.98 (SET-ITOP, ΔT 1500), test top-1 (R_s)\n')
    print('| training | SET-ITOP | exploration stopped at the 1x point |\n|---|---|---|')
    for k, r in ext.items():
        print(f'| {k}x ({40 * k} epochs) | {acc_rs(r)} | {acc_rs(stop[k]) if k in stop else "-"} |')

    print('\nFigure 5: SET-ITOP (ΔT 1500) vs RigL-ITOP (ΔT 4000) at sparsity 0.98, test top-1 (R_s)\n')
    print('| training | SET-ITOP | RigL-ITOP |\n|---|---|---|')
    for k in (1, 5):
        print(f'| {k}x ({40 * k} epochs) | {acc_rs(ext[k])} | {acc_rs(rigl[k])} |')

    print('\nDSR (its own defaults) vs SET-ITOP (ΔT 1500), test top-1 (R_s)\n')
    print('| sparsity | DSR | SET-ITOP |\n|---|---|---|')
    for s in (0.9, 0.98):
        print(f'| {s} | {acc_rs(point(root, "dsr", sparsity=s))} | '
              f'{acc_rs(point(root, "fig3", update_interval=1500, sparsity=s))} |')
    return {'dense': dense, 'ext': ext, 'stop': stop, 'rigl': rigl}


def figures(res: dict[str, dict], out: str) -> None:
    """Figure 4 / 5 panels: test top-1 against the training-time factor (error bars one std)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    def line(ax, pts: dict[int, dict | None], label: str, **kw: Any) -> None:
        xs = [k for k, r in pts.items() if r is not None and 'test_top1_mean' in r]
        if xs:
            ax.errorbar(xs, [pts[k]['test_top1_mean'] for k in xs], [pts[k]['test_top1_std'] for k in xs],
                        marker='o', capsize=3, label=label, **kw)

    os.makedirs(out, exist_ok=True)
    for name, series, title in (
            ('itop_fmnist_fig4.png', [(res['ext'], 'SET-ITOP 98%'), ({1: res['ext'][1], **res['stop']},
                                                                      'exploration stopped at 1x')],
             'Fashion-MNIST MLP 784-1024-512-10, extended training, sparsity 0.98'),
            ('itop_fmnist_fig5.png', [({k: res['ext'][k] for k in (1, 5)}, 'SET-ITOP (ΔT 1500)'),
                                      (res['rigl'], 'RigL-ITOP (ΔT 4000)')],
             'Fashion-MNIST MLP, SET-ITOP vs RigL-ITOP, sparsity 0.98')):
        fig, ax = plt.subplots(figsize=(6, 4))
        for pts, label in series:
            line(ax, pts, label)
        d = res['dense']
        if d is not None:
            ax.axhline(d['test_top1_mean'], color='k', ls='--', label='dense, 40 epochs')
        ax.set_xscale('log')
        ax.set_xticks([1, 2, 5, 10], ['1x', '2x', '5x', '10x'])
        ax.set_xlabel('training time (x 40 epochs)')
        ax.set_ylabel('test top-1 (%)')
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=120)
        plt.close(fig)
        print(f'wrote {os.path.join(out, name)}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('root', nargs='?', default=os.path.join('runs', 'itop_fmnist'), help='runs folder')
    ap.add_argument('--figures', default=None, metavar='DIR', help='also draw the Figure 4 / 5 panels into DIR')
    args = ap.parse_args()
    res = tables(args.root)
    if args.figures:
        figures(res, args.figures)


if __name__ == '__main__':
    main()
