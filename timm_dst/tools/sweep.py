"""``timm-dst-sweep``: run a recipe over a grid of flag values and seeds, collect the results, draw the figures.

Each grid point and seed is one ``timm-dst-train`` run, started as a subprocess::

    python -m timm_dst.train -c RECIPE --key value ... --seed K --output OUT/<point>/seed<K>

With ``--nproc-per-node N`` each run is ``N`` processes under torchrun (``python -m torch.distributed.run
--standalone --nproc_per_node N -m timm_dst.train ...``); ``--fsdp`` shards each run's model with FSDP2.

A run whose ``results.json`` exists is skipped; a run with a ``last.pth.tar`` but no ``results.json`` (killed or
stopped) is continued with ``--resume``, so an interrupted sweep is resumed by giving the same command again.
At the end (and with ``--collect-only`` at any time) the runs' ``results.json`` are gathered into

* ``OUT/runs.csv``: one row per run (grid values, seed, validation / test top-1, R_s, density, wall time);
* ``OUT/sweep.csv``: one row per grid point, mean and (sample) standard deviation over the seeds found;
* ``OUT/sweep.png`` (or ``--figure``): test accuracy and R_s against ``--x`` (default: the first grid key), one
  line per value of ``--lines`` (default: the second grid key), error bars one standard deviation, like Figure 3 of
  the ITOP paper;
* with ``--archive DIR``, a copy of each finished run's ``results.json`` in ``DIR/<point>/seed<K>/``: the folder
  layout that :func:`collect` reads, a few kB per run, so that tables can be redrawn (and kept in a repository)
  without the run folders and their checkpoints.

Example (the ITOP Figure 3 sweep on Fashion-MNIST, two seeds)::

    timm-dst-sweep recipes/fmnist/mlp_set_itop_dt_sweep.yaml --grid update_interval=10,50,200,800 \\
        --grid sparsity=0.9,0.95,0.98 --seeds 2 --out runs/fmnist_fig3
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

from ..integrations.timm.outputs import LAST, RESULTS, atomic_write, write_json_atomic

__all__ = ['parse_grid', 'grid_points', 'point_name', 'run_command', 'run_state', 'collect', 'archive', 'aggregate',
           'write_csv', 'read_reference', 'plot', 'main']

MANIFEST = 'sweep.json'  # the sweep's own files (each run's are named in timm_dst.integrations.timm.outputs)
RUNS_CSV = 'runs.csv'
SWEEP_CSV = 'sweep.csv'
SWEEP_PNG = 'sweep.png'
RUN_LOG = 'sweep_run.log'
RUN_FIELDS = ('val_top1', 'test_top1', 'test_top1_last', 'itop_rate', 'density', 'optimizer_steps', 'train_wall_s')
STAT_FIELDS = ('val_top1', 'test_top1', 'test_top1_last', 'itop_rate')


def _value(text: str) -> Any:
    """A grid value as YAML reads it (``50`` -> int, ``0.9`` -> float, ``true`` -> bool, ``[1, 2]`` -> list), except
    that ``2:4`` stays text (YAML 1.1 would read it as the base-60 number 124)."""
    if not text.strip():
        return ''
    value = yaml.safe_load(text)
    return text.strip() if isinstance(value, int) and ':' in text else value


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """Parse ``key=v1,v2,...`` strings (keys with dashes or underscores) into an ordered ``{key: [values]}``.

    Values are split on commas outside brackets, so ``decay_milestones=[3,4],[6,8]`` gives two lists.
    """
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        if '=' not in spec:
            raise ValueError(f'--grid {spec!r}: expected key=v1,v2,...')
        key, raw = spec.split('=', 1)
        key = key.strip().lstrip('-').replace('-', '_')
        parts, depth, cur = [], 0, ''
        for ch in raw:
            depth += ch in '[{'
            depth -= ch in ']}'
            if ch == ',' and depth == 0:
                parts.append(cur)
                cur = ''
            else:
                cur += ch
        parts.append(cur)
        values = [_value(p) for p in parts if p.strip()]
        if not key or not values:
            raise ValueError(f'--grid {spec!r}: empty key or no values')
        if key in grid:
            raise ValueError(f'--grid {key} given twice')
        grid[key] = values
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the grid, in the order the keys and values were given (one empty point if none)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return '-'.join(_fmt(x) for x in v)
    return str(v).replace('/', '_').replace(' ', '')


def point_name(point: dict[str, Any]) -> str:
    """Folder name of a grid point, e.g. ``update_interval=50,sparsity=0.9`` (``default`` for the empty grid)."""
    return ','.join(f'{k}={_fmt(v)}' for k, v in point.items()) or 'default'


def _flag_value(v: Any) -> list[str]:
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    if isinstance(v, dict):
        return [f'{k}={json.dumps(x)}' for k, x in v.items()]
    return [str(v)]


def run_command(recipe: str, point: dict[str, Any], seed: int, run_dir: str, extra: Sequence[str] = (),
                resume: bool = False, nproc: int = 1) -> list[str]:
    """The ``timm-dst-train`` command line of one run (bool grid values become ``--flag`` / are dropped); with
    ``nproc`` > 1, ``nproc`` processes under torchrun (a rendezvous of their own on a free port)."""
    launch = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launch, '-m', 'timm_dst.train', '-c', recipe]
    for k, v in point.items():
        flag = '--' + k.replace('_', '-')
        if isinstance(v, bool):
            if v:
                cmd.append(flag)
            continue
        cmd += [flag, *_flag_value(v)]
    cmd += ['--seed', str(seed), '--output', run_dir, '--experiment', '', '--no-progress', *extra]
    if resume:
        cmd += ['--resume', run_dir]
    return cmd


def run_state(run_dir: str) -> str:
    """``done`` (results.json present), ``partial`` (a checkpoint but no results) or ``new``."""
    if os.path.isfile(os.path.join(run_dir, RESULTS)):
        return 'done'
    if os.path.isfile(os.path.join(run_dir, LAST)):
        return 'partial'
    return 'new'


def _run_one(cmd: list[str], run_dir: str, threads: int | None) -> tuple[int, float]:
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env['OMP_NUM_THREADS'] = env['MKL_NUM_THREADS'] = str(threads)
    t0 = time.time()
    with open(os.path.join(run_dir, RUN_LOG), 'a') as log:
        log.write('$ ' + ' '.join(cmd) + '\n')
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return rc, time.time() - t0


def _read_run(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, RESULTS)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        res = json.load(f)
    best = res.get('test_best') or res.get('test_last') or {}
    val = res.get('val_best') or res.get('val_last') or {}
    return {
        'val_top1': val.get('top1'), 'test_top1': best.get('top1'),
        'test_top1_last': (res.get('test_last') or {}).get('top1'), 'itop_rate': res.get('itop_rate'),
        'density': res.get('density'), 'optimizer_steps': res.get('optimizer_steps'),
        'train_wall_s': res.get('train_wall_s'),
    }


def collect(out: str, points: list[dict[str, Any]], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per finished run: the grid values, ``seed`` and the :data:`RUN_FIELDS` read from ``results.json``."""
    rows = []
    for point in points:
        for seed in seeds:
            res = _read_run(os.path.join(out, point_name(point), f'seed{seed}'))
            if res is not None:
                rows.append({**point, 'seed': seed, **res})
    return rows


def archive(out: str, points: list[dict[str, Any]], seeds: Sequence[int], dest: str) -> int:
    """Copy the ``results.json`` of every finished run of ``points`` x ``seeds`` from the sweep folder ``out`` to
    ``dest/<point>/seed<K>/results.json`` (atomically, replacing an older copy); returns the number copied."""
    n = 0
    for point in points:
        for seed in seeds:
            rel = os.path.join(point_name(point), f'seed{seed}', RESULTS)
            src = os.path.join(out, rel)
            if os.path.isfile(src):
                os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                with open(src, 'rb') as f, atomic_write(os.path.join(dest, rel)) as g:
                    g.write(f.read())
                n += 1
    return n


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def aggregate(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds of :data:`STAT_FIELDS` per grid point (``n_seeds`` runs)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(json.dumps(r[k]) for k in keys), []).append(r)
    out = []
    for runs in groups.values():
        agg: dict[str, Any] = {k: runs[0][k] for k in keys}
        agg['n_seeds'] = len(runs)
        for f in STAT_FIELDS:
            xs = [r[f] for r in runs if r.get(f) is not None]
            if xs:
                agg[f + '_mean'], agg[f + '_std'] = _mean_std(xs)
        agg['density'] = runs[0].get('density')
        agg['optimizer_steps'] = runs[0].get('optimizer_steps')
        agg['train_wall_s_mean'] = _mean_std([r['train_wall_s'] for r in runs if r.get('train_wall_s')] or [0.0])[0]
        out.append(agg)
    return out


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    """Write dict rows (columns: the union of keys, first-seen order) to ``path``, atomically."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with atomic_write(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})


def read_reference(spec: str) -> tuple[str, float, float]:
    """``LABEL=SWEEP_DIR`` -> (label, mean test top-1, its std) of the first point of that sweep's sweep.csv."""
    label, _, folder = spec.partition('=')
    path = os.path.join(folder, SWEEP_CSV)
    if not label or not os.path.isfile(path):
        raise ValueError(f'--ref {spec!r}: expected LABEL=SWEEP_DIR with a SWEEP_DIR/{SWEEP_CSV}')
    with open(path) as f:
        row = next(csv.DictReader(f))
    return label, float(row['test_top1_mean']), float(row.get('test_top1_std') or 0.0)


def plot(stats: list[dict[str, Any]], x: str, lines: str | None, path: str, title: str = '',
         refs: Sequence[tuple[str, float, float]] = ()) -> None:
    """Test top-1 and R_s against ``x``, one line per value of ``lines``, error bars one std, saved as PNG.

    ``refs`` are horizontal reference lines on the accuracy plot: (label, mean, std), e.g. the dense model.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    groups: dict[Any, list[dict[str, Any]]] = {}
    for s in stats:
        groups.setdefault(json.dumps(s[lines]) if lines else '', []).append(s)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    numeric = all(isinstance(s[x], (int, float)) and not isinstance(s[x], bool) for s in stats)
    for label, rows in groups.items():
        rows = sorted(rows, key=lambda r: r[x]) if numeric else rows
        xs = [r[x] if numeric else str(r[x]) for r in rows]
        name = f'{lines}={json.loads(label)}' if lines else None
        for ax, f in zip(axes, ('test_top1', 'itop_rate')):
            ys = [r.get(f + '_mean', float('nan')) for r in rows]
            es = [r.get(f + '_std', 0.0) for r in rows]
            ax.errorbar(xs, ys, yerr=es, marker='o', capsize=3, label=name)
    for i, (label, mean, std) in enumerate(refs):
        axes[0].axhline(mean, color='k', ls=('--', ':', '-.')[i % 3], lw=1, label=f'{label} ({mean:.2f} ± {std:.2f})')
    for ax, ylabel in zip(axes, ('test top-1 (%)', 'R_s (in-time over-parameterization rate)')):
        ax.set_xlabel('ΔT (update interval)' if x == 'update_interval' else x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if numeric:
            vals = [s[x] for s in stats]
            if min(vals) > 0 and max(vals) / min(vals) >= 10:
                ax.set_xscale('log')
        if lines or (refs and ax is axes[0]):
            ax.legend(fontsize=8)
    n = sorted({s['n_seeds'] for s in stats})
    fig.suptitle(f'{title} (mean ± std over {"/".join(map(str, n))} seeds)'.strip(), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format=os.path.splitext(path)[1][1:] or 'png', dpi=110)
    finally:
        plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='timm-dst-sweep', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('recipe', help='YAML recipe (timm-dst-train -c)')
    p.add_argument('--grid', action='append', default=[], metavar='KEY=V1,V2,...',
                   help='a flag and its values; repeat for more flags (cartesian product)')
    p.add_argument('--seeds', type=int, default=1, help='seeds per point: --seed-base, --seed-base + 1, ...')
    p.add_argument('--seed-base', type=int, default=0, help='first seed')
    p.add_argument('--out', default='', help='sweep folder (default runs/sweep/<recipe name>)')
    p.add_argument('--jobs', type=int, default=1, help='runs at a time')
    p.add_argument('--threads', type=int, default=None, help='OMP_NUM_THREADS of each run (default: inherited)')
    p.add_argument('--x', default=None, help='x axis of the figure (default: the first grid key)')
    p.add_argument('--lines', default=None, help='one line per value of this key (default: the second grid key)')
    p.add_argument('--figure', default=None, help='PNG path (default OUT/sweep.png)')
    p.add_argument('--title', default=None, help='figure title (default: the recipe name)')
    p.add_argument('--ref', action='append', default=[], metavar='LABEL=SWEEP_DIR',
                   help='horizontal line at the mean test top-1 of another sweep (e.g. dense=runs/dense); repeatable')
    p.add_argument('--no-plot', action='store_true', help='do not draw the figure')
    p.add_argument('--collect-only', action='store_true', help='do not train; collect and plot what is there')
    p.add_argument('--dry-run', action='store_true', help='print the commands of the runs still to do, and stop')
    p.add_argument('--train-args', default='', help='extra timm-dst-train arguments for every run (one string)')
    p.add_argument('--nproc-per-node', type=int, default=1, metavar='N',
                   help='processes per run, under torchrun (default 1: one process)')
    p.add_argument('--fsdp', action='store_true', help='shard each run\'s model with FSDP2 (timm-dst-train --fsdp)')
    p.add_argument('--archive', default=None, metavar='DIR',
                   help='also copy each finished run\'s results.json to DIR/<point>/seed<K>/ (tables without the runs)')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``timm-dst-sweep``; returns the number of failed runs (the exit status)."""
    args = _parser().parse_args(argv)
    if not os.path.isfile(args.recipe):
        raise SystemExit(f'timm-dst-sweep: recipe {args.recipe!r} not found')
    try:
        grid = parse_grid(args.grid)
    except ValueError as e:
        raise SystemExit(f'timm-dst-sweep: {e}') from None
    keys = list(grid)
    name = os.path.splitext(os.path.basename(args.recipe))[0]
    out = args.out or os.path.join('runs', 'sweep', name)
    points = grid_points(grid)
    seeds = list(range(args.seed_base, args.seed_base + args.seeds))
    extra = (args.train_args.split() if args.train_args else []) + (['--fsdp'] if args.fsdp else [])
    if args.nproc_per_node < 1:
        raise SystemExit(f'timm-dst-sweep: --nproc-per-node {args.nproc_per_node} must be >= 1')
    x = args.x or (keys[0] if keys else None)
    lines = args.lines if args.lines is not None else (keys[1] if len(keys) > 1 else None)
    for k in (x, lines):
        if k is not None and k not in keys:
            raise SystemExit(f'timm-dst-sweep: --x / --lines {k!r} is not a grid key ({keys})')

    failed = 0
    if not args.collect_only:
        todo = []
        for point in points:
            for seed in seeds:
                run_dir = os.path.join(out, point_name(point), f'seed{seed}')
                state = run_state(run_dir)
                if state != 'done':
                    todo.append((run_command(args.recipe, point, seed, run_dir, extra, state == 'partial',
                                             nproc=args.nproc_per_node), run_dir))
        print(f'timm-dst-sweep: {len(points)} point(s) x {len(seeds)} seed(s), {len(todo)} run(s) to do -> {out}',
              flush=True)
        if args.dry_run:
            for cmd, _ in todo:
                print(' '.join(cmd))
            return 0
        os.makedirs(out, exist_ok=True)
        write_json_atomic({'recipe': args.recipe, 'grid': grid, 'seeds': seeds, 'train_args': extra},
                          os.path.join(out, MANIFEST))

        def job(item: tuple[list[str], str]) -> int:
            cmd, run_dir = item
            rc, wall = _run_one(cmd, run_dir, args.threads)
            status = 'ok' if rc == 0 and run_state(run_dir) == 'done' else f'FAILED (exit {rc})'
            print(f'  {os.path.relpath(run_dir, out)}: {status} in {wall:.0f}s', flush=True)
            return 0 if status == 'ok' else 1

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            failed = sum(pool.map(job, todo))

    rows = collect(out, points, seeds)
    if not rows:
        print('timm-dst-sweep: no finished runs to collect')
        return failed
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, RUNS_CSV), rows)
    stats = aggregate(rows, keys)
    write_csv(os.path.join(out, SWEEP_CSV), stats)
    print(f'timm-dst-sweep: {len(rows)} run(s) in {out}/{RUNS_CSV}, {len(stats)} point(s) in {out}/{SWEEP_CSV}')
    if args.archive:
        print(f'timm-dst-sweep: {archive(out, points, seeds, args.archive)} results.json copied to {args.archive}')
    if not args.no_plot and x is not None:
        fig = args.figure or os.path.join(out, SWEEP_PNG)
        try:
            refs = [read_reference(r) for r in args.ref]
        except ValueError as e:
            raise SystemExit(f'timm-dst-sweep: {e}') from None
        plot(stats, x, lines, fig, args.title if args.title is not None else name, refs)
        print(f'timm-dst-sweep: figure {fig}')
    if failed:
        print(f'timm-dst-sweep: {failed} run(s) failed; see <run>/sweep_run.log', file=sys.stderr)
    return failed


if __name__ == '__main__':
    raise SystemExit(main())
