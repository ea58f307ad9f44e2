"""timm-dst-sweep: grid parsing, commands, aggregation, and a tiny end-to-end sweep with resume."""
from __future__ import annotations

import csv
import json
import os

import pytest

from timm_dst.tools import sweep as sweep

TINY_RECIPE = """\
dataset: synthetic
input_size: [1, 6, 6]
num_classes: 4
synthetic_train_size: 96
synthetic_test_size: 32
val_fraction: 0.125
model: itop_mlp
model_kwargs: {hidden: [24, 16]}
batch_size: 16
lr: 0.05
epochs: 2
dst: set-itop
sparsity: 0.8
update_interval: 2
"""


def test_parse_grid():
    g = sweep.parse_grid(['update-interval=50,200', 'sparsity=0.9,0.95', 'decay_milestones=[3,4],[6,8]',
                          'grow_unexplored_first=false,true', 'dst=set-itop,rigl-itop'])
    assert g == {'update_interval': [50, 200], 'sparsity': [0.9, 0.95], 'decay_milestones': [[3, 4], [6, 8]],
                 'grow_unexplored_first': [False, True], 'dst': ['set-itop', 'rigl-itop']}
    for bad in (['sparsity'], ['=1'], ['a=1', 'a=2']):
        with pytest.raises(ValueError):
            sweep.parse_grid(bad)


def test_points_and_names():
    pts = sweep.grid_points({'update_interval': [50, 200], 'sparsity': [0.9]})
    assert pts == [{'update_interval': 50, 'sparsity': 0.9}, {'update_interval': 200, 'sparsity': 0.9}]
    assert sweep.point_name(pts[0]) == 'update_interval=50,sparsity=0.9'
    assert sweep.grid_points({}) == [{}] and sweep.point_name({}) == 'default'
    assert sweep.point_name({'decay_milestones': [3, 4]}) == 'decay_milestones=3-4'


def test_run_command():
    cmd = sweep.run_command('r.yaml', {'update_interval': 50, 'grow_unexplored_first': True,
                                       'decay_milestones': [3, 4], 'dense_classifier': False}, 1, 'out/p/seed1')
    s = ' '.join(cmd[1:])
    assert s.startswith('-m timm_dst.train -c r.yaml --update-interval 50 --grow-unexplored-first '
                        '--decay-milestones 3 4 --seed 1 --output out/p/seed1')
    assert '--dense-classifier' not in s and '--resume' not in s
    assert sweep.run_command('r', {}, 0, 'd', resume=True)[-2:] == ['--resume', 'd']
    launched = sweep.run_command('r', {}, 0, 'd', ['--fsdp'], nproc=2)
    assert launched[1:8] == ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m',
                             'timm_dst.train'] and '--fsdp' in launched


def test_aggregate_mean_std():
    rows = [{'sparsity': 0.9, 'seed': s, 'val_top1': v, 'test_top1': t, 'test_top1_last': t, 'itop_rate': r,
             'density': 0.1, 'optimizer_steps': 10, 'train_wall_s': 1.0}
            for s, v, t, r in ((0, 80.0, 79.0, 0.2), (1, 82.0, 81.0, 0.4))]
    (agg,) = sweep.aggregate(rows, ['sparsity'])
    assert agg['n_seeds'] == 2 and agg['test_top1_mean'] == pytest.approx(80.0)
    assert agg['test_top1_std'] == pytest.approx(2 ** 0.5)  # sample std
    assert agg['itop_rate_mean'] == pytest.approx(0.3)


def test_sweep_end_to_end_and_resume(tmp_path, capsys):
    recipe = tmp_path / 'tiny.yaml'
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / 'sw'
    fig = tmp_path / 'fig.png'
    args = [str(recipe), '--grid', 'update_interval=2,1000', '--seeds', '2', '--out', str(out), '--jobs', '2',
            '--threads', '1', '--figure', str(fig)]
    # first pass stops every run after 3 steps (a killed sweep); nothing is collected
    assert sweep.main(args + ['--train-args', '--stop-after-updates 3']) == 4  # no results.json: counted failed
    assert sweep.run_state(str(out / 'update_interval=2' / 'seed0')) == 'partial'
    # second pass continues them with --resume
    assert sweep.main(args) == 0
    log = (out / 'update_interval=2' / 'seed0' / 'sweep_run.log').read_text()
    assert '--resume' in log
    with open(out / 'sweep.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['update_interval'] for r in rows] == ['2', '1000']
    assert all(r['n_seeds'] == '2' for r in rows)
    for r in rows:
        assert 0 <= float(r['test_top1_mean']) <= 100 and float(r['itop_rate_std']) >= 0
    # exploring every 2 steps visits more positions than never updating (ΔT beyond the run)
    assert float(rows[0]['itop_rate_mean']) > float(rows[1]['itop_rate_mean'])
    assert fig.stat().st_size > 1000
    with open(out / 'runs.csv') as f:
        assert len(list(csv.DictReader(f))) == 4
    # third pass: everything done, nothing run
    capsys.readouterr()
    assert sweep.main(args + ['--ref', f'self={out}']) == 0  # a reference line from a sweep.csv
    assert '0 run(s) to do' in capsys.readouterr().out
    with open(out / 'sweep.json') as f:
        assert json.load(f)['grid'] == {'update_interval': [2, 1000]}
    assert os.path.isfile(out / 'update_interval=2' / 'seed1' / 'results.json')
    # --archive keeps only the results.json files, in the layout collect() reads: the same table without the runs
    arc = tmp_path / 'archive'
    assert sweep.main(args + ['--collect-only', '--no-plot', '--archive', str(arc)]) == 0
    assert sorted(p.relative_to(arc).as_posix() for p in arc.rglob('*') if p.is_file()) == [
        f'update_interval={dt}/seed{s}/results.json' for dt in (1000, 2) for s in (0, 1)]
    points = [{'update_interval': 2}, {'update_interval': 1000}]
    assert sweep.collect(str(arc), points, [0, 1]) == sweep.collect(str(out), points, [0, 1])


def test_sweep_passes_fsdp_and_processes_through(tmp_path, capsys):
    """``timm-dst-sweep --fsdp --nproc-per-node 2``: every run is two processes under torchrun, sharded."""
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'recipes',
                          'fmnist_mlp_set_itop.yaml')
    assert sweep.main([recipe, '--grid', 'sparsity=0.9,0.95', '--fsdp', '--nproc-per-node', '2', '--dry-run',
                       '--out', str(tmp_path)]) == 0
    cmds = [line for line in capsys.readouterr().out.splitlines() if 'timm_dst.train' in line]
    assert len(cmds) == 2 and all('torch.distributed.run --standalone --nproc_per_node 2 -m timm_dst.train' in c
                                  and c.endswith('--fsdp') for c in cmds)
