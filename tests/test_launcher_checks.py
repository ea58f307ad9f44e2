"""timm_dst.run's checks: DST values refused before train.py starts (issue #27 item 4); GMP and ``--update-start``
through timm's own train.py (item 2); hook points that cannot be missed silently (item 5); both densities (item 7).

The runs of timm's train.py use the small Fashion-MNIST folder of :mod:`test_timm_run` (skipped without
``../shared/clients/timm`` or the idx files).
"""
from __future__ import annotations

import json
import os

import pytest
from test_timm_run import MODEL_ARGS, TRAIN_PY, fmnist_folder, launch, needs_timm_scripts  # noqa: F401  (a fixture)

from timm_dst.integrations.timm.launcher import main

MARKER = 'train_py_ran'


@pytest.fixture
def script(tmp_path) -> str:
    """A train.py that leaves a marker and an output folder when it runs at all."""
    path = tmp_path / 'train.py'
    path.write_text(f'import os\nos.makedirs("output", exist_ok=True)\nopen({MARKER!r}, "w").close()\n'
                    'print("train.py started")\n')
    return str(path)


@pytest.mark.parametrize('flags, expected', [
    (['--dst-kwargs', 'foo=1'], "--dst rigl-itop: unknown argument(s) foo for method 'rigl-itop'"),
    (['--update-end', '-3'], '--dst rigl-itop: update_end=-3 must be >= 0'),
    (['--dst', 'gmp', '--update-start', '0.6', '--update-end', '0.5'], '--dst gmp: update_end=0.5 comes before '
                                                                       'update_start=0.6'),
    (['--dst', 'set', '--update-start', '10', '--update-end', '5'], '--dst set: update_end=5 (step 5) comes before'),
    (['--dst', 'set', '--update-milestones', '0:0'], '--dst set: update_milestones='),
    (['--dst', 'set', '--dst-kwargs', 'prune_rate_schedule=nope'], "--dst set: prune_rate_schedule='nope'"),
    (['--dst', 'snip', '--snip-num-batches', '0'], '--dst snip: snip_num_batches'),
    (['--dst', 'gmp', '--gmp-initial-sparsity', '1.5'], '--dst gmp: gmp_initial_sparsity'),
])
def test_refused_before_train_py_starts(script, tmp_path, monkeypatch, capsys, flags, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([script, 'DATA', '--epochs', '2', *flags])
    err = capsys.readouterr()
    assert e.value.code == 2
    assert err.err.startswith(f'timm-dst-run: error: {expected}') and err.err.count('\n') == 1, err.err
    assert 'train.py started' not in err.out
    assert not (tmp_path / MARKER).exists() and not (tmp_path / 'output').exists()


@pytest.mark.parametrize('flags', [[], ['--dst', 'gmp'], ['--dst', 'snip'], ['--dst', 'lth'],
                                   ['--dst', 'gmp', '--update-end', '0.5', '--update-start', '0.1']])
def test_values_left_to_attach_pass(script, tmp_path, monkeypatch, flags):
    """What needs the model or the launcher's own inputs (SNIP's batches, LTH's dense phase) passes the early check;
    the script then runs (and the launcher stops it for never creating an optimizer)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([script, 'DATA', *flags])
    assert e.value.code == 2 and (tmp_path / MARKER).exists()


# --------------------------------------------------------------------------------------------------------------------
# through timm's own train.py


def _run(data: str, out: str, name: str, *dst: str, epochs: int = 2):
    args = [TRAIN_PY, data, *MODEL_ARGS, '-b', '32', '--epochs', str(epochs), '--output', out, '--experiment', name,
            *dst]
    result = launch(args, cwd=out)
    with open(os.path.join(out, name, 'dst_summary.json')) as f:
        return result, json.load(f)


@needs_timm_scripts
def test_gmp_with_no_flags_and_update_start(fmnist_folder, tmp_path):  # noqa: F811
    """``--dst gmp`` trains from one command: its end of pruning is a fraction of the run (0.75 of 8 steps: step 6),
    known at the scheduler set-up; ``--update-start S`` puts the first update at step S."""
    out = str(tmp_path)
    result, summary = _run(fmnist_folder, out, 'gmp', '--dst', 'gmp')
    assert summary['method'] == 'gmp' and summary['total_steps'] == 8 and summary['step'] == 8
    assert abs(summary['density'] - 0.1) < 0.01
    assert [h['step'] for h in summary['history']][-1] == 6  # update_end 0.75 x 8 steps
    log = result.stderr + result.stdout
    assert 'final density 0.1000 (sparse tensors), ' in log and ' (all weights)' in log
    with open(os.path.join(out, 'gmp', 'dst_summary.csv')) as f:
        header = f.readline().strip().split(',')
    assert header[:5] == ['epoch', 'step', 'topology_updates', 'density', 'model_density'], header
    _, summary = _run(fmnist_folder, out, 'gmp-start', '--dst', 'gmp', '--update-start', '3', '--update-interval', '2',
                      '--update-end', '1.0')
    steps = [h['step'] for h in summary['history'] if h['step'] > 0]
    assert steps[0] == 3 and steps[-1] == 8 and abs(summary['density'] - 0.1) < 0.01, steps


# --------------------------------------------------------------------------------------------------------------------
# hook points: one removed at a time from a copy of timm's train.py
_EDITS = {
    'update_summary': ('utils.update_summary(', '(lambda *a, **k: None)(', 'timm.utils.update_summary'),
    'CheckpointSaver': ('saver = utils.CheckpointSaver(', 'saver = None and utils.CheckpointSaver(',
                        'timm.utils.CheckpointSaver'),
    'create_scheduler_v2': ('lr_scheduler, num_epochs = create_scheduler_v2(',
                            'lr_scheduler, num_epochs = (lambda *a, **k: (__import__(\'timm.scheduler\', '
                            'fromlist=[\'x\']).StepLRScheduler(optimizer, decay_t=1000), args.epochs))(',
                            'create_scheduler_v2'),
    'optimizer_kwargs': ('**optimizer_kwargs(cfg=args),', '**dict(opt=args.opt, lr=args.lr),',
                         'timm.optim.optimizer_kwargs(cfg=args)'),
    'EMA unknown to the launcher': ('        task.setup_ema(', '        (lambda **k: None)(', 'ModelEmaV3'),
    'EMA before the optimizer': ('    optimizer = create_optimizer_v2(\n',
                                 '    utils.ModelEmaV3(model)\n    optimizer = create_optimizer_v2(\n',
                                 'ModelEma* after the sparsifier attached'),
}


@needs_timm_scripts
@pytest.mark.slow  # six short runs of train.py: about 2 minutes
@pytest.mark.parametrize('point', list(_EDITS))
def test_missing_hook_point_is_named(fmnist_folder, tmp_path, point):  # noqa: F811
    old, new, named = _EDITS[point]
    with open(TRAIN_PY) as f:
        text = f.read()
    assert text.count(old) == 1, f'{old!r} is not in train.py once: update the test for this timm'
    script = tmp_path / 'train.py'
    script.write_text(text.replace(old, new))
    args = [str(script), fmnist_folder, *MODEL_ARGS, '-b', '64', '--epochs', '1', '--output', str(tmp_path),
            '--experiment', 'run', '--dst', 'rigl-itop', '--sparsity', '0.9', '--update-interval', '1']
    if point.startswith('EMA'):
        args.append('--model-ema')
    out = launch(args, cwd=str(tmp_path), check=False)
    last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''
    assert out.returncode == 2, out.stderr[-3000:]
    assert last.startswith('timm-dst-run: error: ') and named in last and 'timm 1.' in last, last
