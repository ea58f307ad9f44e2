"""User errors at the CLI (issue 13, items 5-7): one line naming the flag, key or file, exit status 2, no traceback.
Bad checkpoints, resuming with another optimizer or more epochs, malformed configs and typed values."""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import run_cli

from timm_dst.integrations.timm.checkpoint import LAST
from timm_dst.train import main

TINY = [
    '--dataset', 'synthetic', '--input-size', '1', '6', '6', '--num-classes', '4', '--synthetic-train-size', '120',
    '--synthetic-test-size', '32', '--val-fraction', '0.2', '--model', 'itop_mlp', '--model-kwargs',
    'hidden=[24,16]', '-b', '32', '--lr', '0.05', '--dst', 'set', '--sparsity', '0.8', '--update-interval', '2',
    '--no-progress',
]


pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')


def _run(out, *extra):
    run_cli(TINY, out, *extra)


def _user_error(capsys, argv) -> str:
    """Run ``main(argv)``; it must exit with status 2 and one line on stderr (returned), no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2, e.value.code
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith('usage:')]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A finished 2-epoch run (3 optimizer steps per epoch: 96 training samples, batches of 32)."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp('run')
    _run(out, '--epochs', 2)
    return out


# --------------------------------------------------------------------------------------------------------------------
# item 5: bad checkpoints
def _bad_files(folder, good):
    data = open(good, 'rb').read()
    files = {'empty': b'', 'truncated': data[:len(data) // 2], 'garbage': os.urandom(4096),
             'text': b'this is not a checkpoint\n'}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f'{name}.pth.tar'
        paths[name].write_bytes(content)
    paths['foreign'] = folder / 'foreign.pth.tar'  # a pickle holding a class weights_only refuses
    torch.save({'state_dict': {}, 'obj': torch.nn.Linear(2, 2)}, paths['foreign'])
    paths['list'] = folder / 'list.pth.tar'
    torch.save([1, 2, 3], paths['list'])
    return paths


@pytest.mark.parametrize('flag', ['--resume', '--initial-checkpoint'])
def test_bad_checkpoints_one_line(finished_run, tmp_path, capsys, flag):
    for name, path in _bad_files(tmp_path, finished_run / LAST).items():
        line = _user_error(capsys, TINY + ['--output', tmp_path / f'out_{name}', flag, path])
        assert line.startswith('timm-dst-train: error:') and flag in line and str(path) in line, (name, line)


def test_initial_checkpoint_of_another_model(finished_run, tmp_path, capsys):
    line = _user_error(capsys, TINY[:-5] + ['--model-kwargs', 'hidden=[20,16]', '--output', tmp_path,
                                             '--initial-checkpoint', finished_run / LAST])
    assert '--initial-checkpoint' in line and 'do not fit --model' in line and 'shape differs' in line


def test_initial_checkpoint_of_own_run_trains(finished_run, tmp_path):
    _run(tmp_path, '--epochs', 1, '--initial-checkpoint', finished_run / LAST)
    assert json.loads((tmp_path / 'results.json').read_text())['optimizer_steps'] == 3


def test_resume_with_another_optimizer(finished_run, tmp_path, capsys):
    run = tmp_path / 'copy'
    run.mkdir()
    (run / LAST).write_bytes((finished_run / LAST).read_bytes())
    line = _user_error(capsys, TINY + ['--output', run, '--epochs', 3, '--opt', 'adamw', '--resume', run])
    assert '--opt momentum' in line and '--no-resume-opt' in line
    # --no-resume-opt: a fresh optimizer state, the run continues
    _run(run, '--epochs', 3, '--opt', 'adamw', '--no-resume-opt', '--resume', run)
    assert json.loads((run / 'results.json').read_text())['optimizer_steps'] == 9


def test_resume_of_a_dense_timm_checkpoint_starts_sparse_training(tmp_path, monkeypatch, caplog):
    """A dense timm checkpoint (timm's keys, no DST state) given to --resume: sparse training starts from its weights
    (--mask-init magnitude: the largest of them) and optimizer state, at its next epoch."""
    import logging

    import timm_dst.integrations.timm as plugin
    from timm_dst.integrations.timm import DST_KEY, read_checkpoint
    argv = [a for a in TINY]
    i = argv.index('--dst')
    argv[i:i + 6] = ['--dst', 'dense']  # drops --sparsity 0.8 --update-interval 2
    main(argv + ['--output', str(tmp_path / 'dense'), '--epochs', '1'])
    ckpt = read_checkpoint(str(tmp_path / 'dense' / LAST), mmap=False)
    ckpt.pop(DST_KEY)  # what timm's own train.py writes: state_dict, optimizer, epoch, version, args, ...
    assert {'state_dict', 'optimizer', 'epoch', 'args'} <= set(ckpt) and ckpt['epoch'] == 0
    torch.save(ckpt, tmp_path / 'dense.pth.tar')
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)

    seen = {}
    real = plugin.begin_training

    def begin_training(sp, *args, **kwargs):  # the sparse model right after its topology was drawn
        real(sp, *args, **kwargs)
        seen['step'] = sp.step
        seen['masked'] = {t.name: (t.param.detach() * t.mask).clone() for t in sp.targets}
        seen['masks'] = {t.name: t.mask.detach().bool().clone() for t in sp.targets}
        seen['momentum'] = {t.name: sp.optimizer.state[t.param].get('momentum_buffer', torch.zeros(0)).clone()
                            for t in sp.targets}

    monkeypatch.setattr(plugin, 'begin_training', begin_training)
    out = tmp_path / 'sparse'
    with caplog.at_level(logging.INFO, logger='timm_dst.train'):
        _run(out, '--epochs', 2, '--dst', 'set-itop', '--sparsity', 0.9, '--mask-init', 'magnitude',
             '--resume', tmp_path / 'dense.pth.tar')
    line = [r.getMessage() for r in caplog.records if 'a dense checkpoint' in r.getMessage()]
    assert len(line) == 1 and 'at epoch 1' in line[0] and '--mask-init magnitude' in line[0], line
    assert seen['step'] == 3  # one epoch of 3 optimizer steps already done
    dense = ckpt['state_dict']
    for name, masked in seen['masked'].items():
        mask, w = seen['masks'][name], dense[name]
        assert torch.equal(masked[mask], w[mask])  # the active positions start from the checkpoint's weights
        assert w[mask].abs().min() >= w[~mask].abs().max()  # and are its largest ones (magnitude)
        momentum = seen['momentum'][name]  # the checkpoint's optimizer state, zeroed at the inactive positions
        assert momentum.shape == mask.shape and momentum[mask].abs().sum() > 0 and not momentum[~mask].any()
    rows = (out / 'summary.csv').read_text().strip().splitlines()
    header = rows[0].split(',')
    assert [int(r.split(',')[header.index('epoch')]) for r in rows[1:]] == [1]
    summary = json.loads((out / 'dst_summary.json').read_text())
    assert summary['step'] == 6 and summary['total_steps'] == 6
    assert summary['density'] == pytest.approx(0.1, abs=2e-3)


def test_resume_of_another_tools_dst_checkpoint_is_refused(finished_run, tmp_path, capsys):
    from timm_dst.integrations.timm import DST_KEY, read_checkpoint
    ckpt = read_checkpoint(str(finished_run / LAST), mmap=False)
    ckpt[DST_KEY].pop('run')  # a DST state as timm's train.py under timm_dst.run writes it
    torch.save(ckpt, tmp_path / 'launcher.pth.tar')
    line = _user_error(capsys, TINY + ['--output', tmp_path / 'o', '--resume', tmp_path / 'launcher.pth.tar'])
    assert 'no timm-dst-train run state' in line and '--initial-checkpoint' in line, line


# --------------------------------------------------------------------------------------------------------------------
# item 6: resume with more epochs
def test_resume_with_more_epochs_extends_schedule_and_sparsifier(finished_run, tmp_path):
    run = tmp_path / 'more'
    run.mkdir()
    for f in (LAST, 'summary.csv'):
        (run / f).write_bytes((finished_run / f).read_bytes())
    _run(run, '--epochs', 3, '--resume', run)
    rows = (run / 'summary.csv').read_text().strip().splitlines()
    header = rows[0].split(',')
    lrs = [float(r.split(',')[header.index('lr')]) for r in rows[1:]]
    assert len(lrs) == 3 and lrs[2] > 0.0  # epoch 3 trains (the old 2-epoch schedule ended at lr 0)
    # cosine over 3 epochs, stepped per epoch: epoch 3's lr is the new schedule's, not the old one's
    import math
    assert lrs[2] == pytest.approx(0.5 * 0.05 * (1 + math.cos(math.pi * 2 / 3)), rel=1e-6)
    summary = json.loads((run / 'dst_summary.json').read_text())
    assert summary['total_steps'] == 9 and summary['step'] == 9  # the sparsifier counts the same new total


def test_resume_past_the_new_end_is_refused(finished_run, tmp_path, capsys):
    line = _user_error(capsys, TINY + ['--output', tmp_path, '--epochs', 1, '--resume', finished_run / LAST])
    assert '--resume' in line and 'past the end of --epochs 1' in line


# --------------------------------------------------------------------------------------------------------------------
# item 7: configs and typed flags
@pytest.mark.parametrize('text, needle', [
    ('model: itop_mlp\nsparsity: [0.9\nlr: 0.1\n', 'not valid YAML (line 3'),
    ('sparsity: abc\n', "key sparsity: 'abc' is not accepted; expected a number"),
    ('update_interval: 2.5\n', 'key update_interval: 2.5 is not accepted; expected an integer'),
    ('epochs: true\n', 'key epochs: True is not accepted; expected an integer'),
    ('no_aug: 3\n', 'key no_aug: 3 is not accepted; expected true or false'),
    ('decay_milestones: [10, x]\n', 'key decay_milestones'),
    ('model_kwargs: 3\n', 'key model_kwargs: 3 is not accepted; expected a mapping'),
    ('sparse_init: nope\n', 'key sparse_init'),
    ('- a\n- b\n', 'expected a mapping of flag names to values'),
])
def test_config_errors_name_the_key(tmp_path, capsys, text, needle):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(text)
    line = _user_error(capsys, ['-c', cfg, '--dataset', 'synthetic', '--output', tmp_path / 'o'])
    assert needle in line and str(cfg) in line, line
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('argv, needle', [
    (['--model-kwargs', 'hidden=[1,'], "--model-kwargs 'hidden=[1,': the value of hidden is not valid YAML"),
    (['--dst-kwargs', 'seed=[1,'], "--dst-kwargs 'seed=[1,': the value of seed is not valid YAML"),
    (['--opt', 'nope'], "--opt 'nope' is not a timm optimizer; accepted: "),
    (['--update-interval', '2.5'], "--update-interval: invalid int value: '2.5'"),
    (['--sparsity', 'abc'], "--sparsity: invalid float value: 'abc'"),
    (['--mixup', '0.2', '-b', '31'], 'need an even batch size'),
])
def test_typed_flag_errors(tmp_path, capsys, argv, needle):
    line = _user_error(capsys, TINY + argv + ['--output', tmp_path / 'o'])
    assert needle in line, line


def test_no_validation_result_line(tmp_path):
    _run(tmp_path, '--epochs', 1, '--val-fraction', 0)
    log = (tmp_path / 'log.txt').read_text()
    result = [ln for ln in log.splitlines() if ' RESULT ' in ln][-1]
    assert '(last weights; no validation split)' in result and 'best-on-validation' not in result
    assert json.loads((tmp_path / 'results.json').read_text())['best_epoch'] is None


def test_synthetic_data_says_what_it_does_not_apply(tmp_path):
    _run(tmp_path, '--epochs', 1, '--aa', 'rand-m9', '--crop-padding', 4)
    log = (tmp_path / 'log.txt').read_text()
    assert '--aa, --crop-padding: not applied: the synthetic data set is tensors' in log
