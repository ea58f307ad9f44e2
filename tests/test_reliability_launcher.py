"""User errors and faults at the two front ends (issue 25, items 6 and 8): one line on stderr naming the flag or file
and what is accepted, exit status 2, never a traceback; what a resume changes is said in one line.

The launcher (``python -m timm_dst.run train.py ...``): refusals that come before train.py runs (the script, its
``-c`` config) and those of the timm entry points it patches (``resume_checkpoint``, ``get_outdir``,
``CheckpointSaver``) are called in this process; timm's own train.py runs as a subprocess only where its flow matters
(a truncated ``--resume``, an unknown config key, a resume with other DST options whose save hits a full disk).
``timm-dst-train``: its ``-c`` configs, ``--output`` and ``--resume`` with other DST options, in this process.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile

import pytest
import torch
from conftest import run_cli
from test_timm_run import DST_ARGS, FMNIST, MODEL_ARGS, TRAIN_PY, launch, needs_timm_scripts, write_fmnist_folder

from timm_dst.integrations.timm import DST_KEY, read_checkpoint

CLI_TINY = [
    '--dataset', 'synthetic', '--input-size', '1', '6', '6', '--num-classes', '4', '--synthetic-train-size', '120',
    '--synthetic-test-size', '32', '--val-fraction', '0.2', '--model', 'itop_mlp', '--model-kwargs',
    'hidden=[24,16]', '-b', '32', '--lr', '0.05', '--dst', 'set', '--sparsity', '0.8', '--no-progress',
]


@pytest.fixture(scope='module')
def fmnist_folder(tmp_path_factory) -> str:
    """128 training and 64 validation Fashion-MNIST images as an ImageFolder (tests/test_timm_run.py's)."""
    if not os.path.isdir(FMNIST):
        pytest.skip('Fashion-MNIST idx files absent')
    return write_fmnist_folder(str(tmp_path_factory.mktemp('fmnist')), 128, 64)


def _one_line(capsys, fn, *args, prog: str = 'timm-dst-run') -> str:
    """``fn(*args)`` must exit with status 2 and one error line on stderr (returned, without the prefix), no
    traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2, e.value.code
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: '), err
    return lines[0][len(f'{prog}: error: '):]


def _launch_error(out) -> str:
    """A launcher subprocess that must end with exit status 2 and one error line (other lines are train.py's log)."""
    err = out.stderr
    assert out.returncode == 2 and 'Traceback' not in err, (out.returncode, err[-3000:])
    errors = [ln for ln in err.splitlines() if ln.startswith('timm-dst-run: error: ')]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-3000:]
    return errors[0][len('timm-dst-run: error: '):]


@pytest.fixture
def stub_script(tmp_path) -> str:
    """A script the refusals before train.py runs must never start."""
    script = tmp_path / 'train.py'
    script.write_text('raise SystemExit("must not run")\n')
    return str(script)


def _unwritable_folder(tmp_path) -> str:
    """An existing folder this process cannot write in (permission bits do not bind root: /sys then)."""
    if os.geteuid() != 0:
        folder = tmp_path / 'readonly'
        folder.mkdir()
        folder.chmod(0o500)
        return str(folder)
    try:
        with tempfile.NamedTemporaryFile(dir='/sys/kernel'):
            pass
    except OSError:
        return '/sys/kernel'
    pytest.skip('no folder here that root cannot write in')


# --------------------------------------------------------------------------------------------------------------------
# the launcher: before train.py runs
def test_launcher_config_errors_are_one_line(capsys, tmp_path, stub_script):
    """-c/--config: missing, a folder, not YAML, empty, a list, a key given twice, dashes, both spellings, a DST value
    of the wrong type: one line each, and the script never starts."""
    from timm_dst.run import main
    files = {'dup': 'epochs: 1\nepochs: 2\n', 'dash': 'epochs: 1\nbatch-size: 16\n',
             'both': 'batch-size: 16\nbatch_size: 32\n', 'bad': 'epochs: [1\n', 'empty': '', 'list': '- 1\n',
             'dst': 'sparsity: abc\n'}
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f'{name}.yaml'
        paths[name].write_text(text)
    expected = {
        'dup': 'dup.yaml: key epochs is given twice (lines 1 and 2); keep one',
        'dash': 'dash.yaml: key batch-size: train.py reads config keys with underscores (batch_size); a key with '
                'dashes would be ignored',
        'both': 'both.yaml: keys batch-size and batch_size both name --batch-size: train.py reads config keys with '
                'underscores (batch_size)',
        'bad': 'bad.yaml: not valid YAML (line 2, column 1:',
        'empty': 'empty.yaml: expected a mapping of train.py flag names (with underscores) to values, got an empty '
                 'file',
        'list': 'list.yaml: expected a mapping of train.py flag names (with underscores) to values, got a list',
        'dst': "dst.yaml: key sparsity: 'abc' is not accepted; expected a number",
    }
    for name, text in expected.items():
        msg = _one_line(capsys, main, [stub_script, 'DATA', '-c', str(paths[name])])
        assert msg.startswith(f'-c/--config {tmp_path}/') and text in msg, msg
    msg = _one_line(capsys, main, [stub_script, '--config', str(tmp_path / 'nope.yaml')])
    assert msg == f"-c/--config '{tmp_path}/nope.yaml': no such file"
    msg = _one_line(capsys, main, [stub_script, '-c', str(tmp_path)])
    assert msg == f"-c/--config '{tmp_path}': a folder, not a YAML file"


def test_launcher_reads_dst_keys_of_the_config(capsys, tmp_path, stub_script):
    """A DST key in train.py's -c config sets the launcher's flag (silently ignored before: the run trained at the
    default sparsity), checked like the flag; the command line wins."""
    from timm_dst.run import main
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text('epochs: 1\nsparsity: 1.5\n')
    msg = _one_line(capsys, main, [stub_script, '-c', str(cfg)])
    assert msg == '--sparsity 1.5 is out of range: give a float in [0, 1)'
    from timm_dst.run import create_parser, read_train_config
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('epochs: 1\nsparsity: 0.8\nupdate_interval: 7\n')
    parser = create_parser()
    path, keys = read_train_config(['DATA', '-c', str(cfg)], parser)
    assert path == str(cfg) and keys == {'epochs', 'sparsity', 'update_interval'}
    args = parser.parse_args(['--update-interval', '3'])
    assert args.sparsity == 0.8 and args.update_interval == 3


def test_launcher_script_errors_are_one_line(capsys, tmp_path):
    """A folder, a file that is not Python, and a script that ends without ever creating a timm optimizer (nothing
    was trained with DST, which used to pass without a word)."""
    from timm_dst.run import main
    folder = tmp_path / 'train.py'
    folder.mkdir()
    assert _one_line(capsys, main, [str(folder)]) == f'{folder}: a folder (give the path of a timm train.py)'
    bad = tmp_path / 'bad.py'
    bad.write_text('def f(:\n')
    assert _one_line(capsys, main, [str(bad)]) == (f'{bad}: not a Python script (invalid syntax, line 1); give the '
                                                   'path of a timm train.py')
    hello = tmp_path / 'hello.py'
    hello.write_text('x = 1\n')
    assert _one_line(capsys, main, [str(hello), '--dst', 'set']) == (
        f'{hello} ran to its end without creating an optimizer with timm.optim.create_optimizer_v2: nothing was '
        'trained with DST (give the path of a timm train.py)')


def test_launcher_flag_errors_are_one_line(capsys, tmp_path, stub_script):
    """DST flag values argparse refuses (two lines with its usage before), and a --dst-rank-masks folder that cannot
    be written (a traceback at the very end of the run before): one line each, before the script starts."""
    from timm_dst.run import main
    for argv, expected in (
            (['--update-interval', 'abc'], "argument --update-interval: invalid int value: 'abc'"),
            (['--update-milestones', '5'], "argument --update-milestones: expected FROM_STEP:INTERVAL, got '5'"),
            (['--distribution', 'nope'], "argument --distribution/--sparse-init: invalid choice: 'nope' (choose "
                                         "from 'erk', 'er', 'uniform')"),
            (['--dst-kwargs', 'nonsense'], "--dst-kwargs: expected key=value, got 'nonsense'")):
        assert _one_line(capsys, main, [stub_script, *argv]) == expected
    afile = tmp_path / 'afile'
    afile.write_text('')
    msg = _one_line(capsys, main, [stub_script, '--dst-rank-masks', str(afile / 'masks')])
    assert msg == f'--dst-rank-masks {afile}/masks: {afile} is a file, not a folder; give a writable folder'


# --------------------------------------------------------------------------------------------------------------------
# the launcher: the timm entry points it patches, called in this process
def _launcher(**train_args):
    from timm_dst.integrations.timm import add_dst_args
    from timm_dst.run import Launcher
    p = argparse.ArgumentParser()
    add_dst_args(p)
    launcher = Launcher(p.parse_args(['--dst', 'set', '--sparsity', '0.8']), script='train.py')
    launcher.train_args = argparse.Namespace(**train_args)
    return launcher


@pytest.fixture
def timm_checkpoint(tmp_path) -> str:
    """A timm training checkpoint of test_resnet trained with --opt sgd (the layout timm's CheckpointSaver writes)."""
    import timm
    model = timm.create_model('test_resnet', num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = str(tmp_path / 'last.pth.tar')
    torch.save({'epoch': 0, 'arch': 'test_resnet', 'version': 2, 'state_dict': model.state_dict(),
                'optimizer': opt.state_dict(), 'args': argparse.Namespace(model='test_resnet', opt='sgd')}, path)
    return path


def test_launcher_resume_errors_are_one_line(capsys, tmp_path, timm_checkpoint):
    """timm's resume_checkpoint under the launcher: an empty, truncated, random or text file, a folder, a missing file,
    another model's checkpoint (another architecture, another head) and another --opt give one line naming the file,
    where timm raised EOFError / PytorchStreamReader / load_state_dict's many lines / a KeyError at the first step."""
    import timm
    data = open(timm_checkpoint, 'rb').read()
    files = {'empty.pth': b'', 'truncated.pth': data[:len(data) // 2], 'random.pth': os.urandom(4096),
             'text.pth': b'this is not a checkpoint\n'}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)

    def resume(model_name: str, path: str, opt: str = 'sgd', num_classes: int = 10) -> str:
        launcher = _launcher(model=model_name, opt=opt, no_resume_opt=False)
        model = timm.create_model(model_name, num_classes=num_classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        launcher.pending = (model, optimizer)
        with launcher.patched():
            return _one_line(capsys, timm.models.resume_checkpoint, model, path, optimizer)

    assert resume('test_resnet', str(tmp_path / 'empty.pth')) == f'--resume {tmp_path}/empty.pth: the file is empty'
    for name in ('truncated.pth', 'random.pth', 'text.pth'):
        msg = resume('test_resnet', str(tmp_path / name))
        assert msg.startswith(f'--resume {tmp_path}/{name}: not a readable checkpoint (truncated, corrupt'), msg
    assert resume('test_resnet', str(tmp_path)) == (f'--resume {tmp_path}: a folder; give a checkpoint file (e.g. '
                                                    f'{tmp_path}/last.pth.tar)')
    assert resume('test_resnet', str(tmp_path / 'nope.pth')) == f'--resume {tmp_path}/nope.pth: no such file'
    msg = resume('test_vit', timm_checkpoint)
    assert msg.startswith(f"--resume {timm_checkpoint}: the checkpoint is of model 'test_resnet', not --model "
                          "'test_vit': its weights do not fit the model (missing: "), msg
    msg = resume('test_resnet', timm_checkpoint, num_classes=5)
    assert msg == (f'--resume {timm_checkpoint}: its weights do not fit the model (shape differs: fc.weight, fc.bias '
                   '(2))')
    msg = resume('test_resnet', timm_checkpoint, opt='adamw')
    assert msg == (f'--resume {timm_checkpoint}: the run was trained with --opt sgd; resume with the same --opt, or '
                   'add --no-resume-opt to start a fresh optimizer state')


def test_launcher_initial_checkpoint_errors_are_one_line(capsys, tmp_path, timm_checkpoint):
    """--initial-checkpoint (timm.create_model(checkpoint_path=...) under the launcher): a truncated file, a folder,
    and another model's weights are one line naming the flag and the file, not timm's traceback."""
    import timm
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(open(timm_checkpoint, 'rb').read()[:300])
    launcher = _launcher(model='test_resnet', opt='sgd')
    with launcher.patched():
        msg = _one_line(capsys, functools.partial(timm.create_model, 'test_resnet', checkpoint_path=str(truncated)))
        assert msg.startswith(f'--initial-checkpoint {truncated}: not a readable checkpoint (truncated, corrupt'), msg
        msg = _one_line(capsys, functools.partial(timm.create_model, 'test_resnet', checkpoint_path=str(tmp_path)))
        assert msg == (f'--initial-checkpoint {tmp_path}: a folder; give a checkpoint file (e.g. '
                       f'{tmp_path}/last.pth.tar)')
        msg = _one_line(capsys, functools.partial(timm.create_model, 'test_vit', checkpoint_path=timm_checkpoint))
    assert msg.startswith(f'--initial-checkpoint {timm_checkpoint}: its weights do not load into --model test_vit '
                          '(Error(s) in loading state_dict for VisionTransformer: '), msg


def test_launcher_output_folder_errors_are_one_line(capsys, tmp_path):
    """timm's get_outdir under a regular file (NotADirectoryError) and a CheckpointSaver in a folder that cannot be
    written (PermissionError / read-only file system, at args.yaml or the first save): one line each."""
    import timm
    import timm.utils
    afile = tmp_path / 'afile'
    afile.write_text('')
    folder = _unwritable_folder(tmp_path)
    launcher = _launcher(model='test_resnet', opt='sgd')
    model = timm.create_model('test_resnet', num_classes=10)
    with launcher.patched():
        assert _one_line(capsys, timm.utils.get_outdir, str(afile), 'run') == (
            f'--output {afile}: cannot create the run folder {afile}/run: {afile} is a file, not a folder; give a '
            'writable folder')
        saver = functools.partial(timm.utils.CheckpointSaver, model=model, optimizer=torch.optim.SGD(
            model.parameters(), lr=0.1), checkpoint_dir=folder, recovery_dir=folder)
        msg = _one_line(capsys, saver)
    assert msg.startswith(f'--output: cannot write checkpoints in {folder}: {folder} is not writable ('), msg


# --------------------------------------------------------------------------------------------------------------------
# the launcher: timm's train.py
@needs_timm_scripts
def test_launcher_truncated_resume_and_unknown_config_key(fmnist_folder, tmp_path):
    """Through timm's train.py: a truncated --resume file (timm: PytorchStreamReader / Invalid argument) and a -c key
    that is no flag of train.py (timm: silently an unused attribute) are one line, exit status 2."""
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': {}, 'epoch': 0}, good)
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(good.read_bytes()[:200])
    base = [TRAIN_PY, fmnist_folder, *MODEL_ARGS, '-b', '32', *DST_ARGS, '--output', str(tmp_path)]
    out = launch([*base, '--experiment', 'r', '--resume', str(truncated)], cwd=str(tmp_path), check=False)
    assert _launch_error(out).startswith(f'--resume {truncated}: not a readable checkpoint (truncated, corrupt')
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('epochs: 1\nepoch: 2\n')
    out = launch([*base, '--experiment', 'c', '-c', str(cfg)], cwd=str(tmp_path), check=False)
    assert _launch_error(out) == (f'-c/--config {cfg}: unknown key(s) epoch: not a flag of {TRAIN_PY} nor a DST flag '
                                  f'(keys are the flag names with underscores, see {TRAIN_PY} --help)')


@needs_timm_scripts
@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='/dev/full (writes fail with ENOSPC) absent')
def test_launcher_resume_says_what_changed_and_a_full_disk_keeps_the_checkpoint(fmnist_folder, tmp_path):
    """Resume with another --update-interval and --prune-rate: one line says what changed. The save at the end of its
    epoch hits a full disk (timm writes tmp.pth.tar, here a link to /dev/full): one line naming last.pth.tar, the
    partial file removed, and the previous last.pth.tar unchanged and loadable."""
    base = [TRAIN_PY, fmnist_folder, *MODEL_ARGS, '-b', '32', *DST_ARGS, '--output', str(tmp_path), '--experiment',
            'run']
    launch([*base, '--epochs', '1'], cwd=str(tmp_path))
    run = tmp_path / 'run'
    last = run / 'last.pth.tar'
    before = last.read_bytes()
    assert read_checkpoint(str(last))[DST_KEY]['options']['update_interval'] == 2
    os.symlink('/dev/full', run / 'tmp.pth.tar')
    out = launch([*base, '--epochs', '2', '--update-interval', '3', '--prune-rate', '0.3', '--resume', str(last)],
                 cwd=str(tmp_path), check=False)
    log = out.stdout + out.stderr
    assert log.count('DST: resuming with') == 1
    assert 'DST: resuming with --update-interval 3 (the checkpoint was trained with 2); --prune-rate 0.3 (the ' \
           'checkpoint was trained with 0.5)' in log
    msg = _launch_error(out)
    assert msg.startswith(f'checkpoint of epoch 1 not written: {last} (torch.save: ') and msg.endswith(
        '; is the disk full?); the previous last.pth.tar is unchanged'), msg
    assert not os.path.lexists(run / 'tmp.pth.tar') and last.read_bytes() == before
    ckpt = read_checkpoint(str(last))
    assert ckpt['epoch'] == 0 and ckpt[DST_KEY]['step'] == 4


# --------------------------------------------------------------------------------------------------------------------
# timm-dst-train
@pytest.mark.usefixtures('fresh_accelerate_state')
def test_cli_config_duplicate_keys_and_both_spellings(capsys, tmp_path):
    """A key given twice (YAML keeps the last silently) and two spellings of one flag are refused in one line."""
    from timm_dst.train import main
    cases = {'epochs: 1\nepochs: 2\n': 'key epochs is given twice (lines 1 and 2); keep one',
             'batch-size: 16\nbatch_size: 32\n': 'keys batch-size and batch_size both set --batch-size; keep one',
             'sparse_init: er\ndistribution: erk\n': 'keys sparse_init and distribution both set --distribution; keep '
                                                     'one'}
    for i, (text, expected) in enumerate(cases.items()):
        cfg = tmp_path / f'cfg{i}.yaml'
        cfg.write_text(text)
        msg = _one_line(capsys, main, ['-c', str(cfg), *CLI_TINY], prog='timm-dst-train')
        assert msg == f'-c/--config {cfg}: {expected}'


@pytest.mark.usefixtures('fresh_accelerate_state')
def test_cli_output_folder_errors(capsys, tmp_path):
    """--output under a regular file (NotADirectoryError) or in a folder that cannot be written (PermissionError at
    log.txt): one line before anything is built."""
    from timm_dst.train import main
    afile = tmp_path / 'afile'
    afile.write_text('')
    msg = _one_line(capsys, main, [*CLI_TINY, '--output', str(afile / 'run')], prog='timm-dst-train')
    assert msg == (f'--output {afile}/run: cannot write the run folder {afile}/run: {afile} is a file, not a folder; '
                   'give a writable folder')
    folder = _unwritable_folder(tmp_path)
    msg = _one_line(capsys, main, [*CLI_TINY, '--output', folder], prog='timm-dst-train')
    assert msg.startswith(f'--output {folder}: cannot write the run folder {folder}: {folder} is not writable ('), msg


@pytest.mark.usefixtures('fresh_accelerate_state')
def test_cli_resume_says_what_changed(tmp_path, caplog):
    """timm-dst-train --resume with another --update-interval and --prune-rate: one line says what changed (nothing
    was said before); the same settings say nothing."""
    import logging
    run_cli(CLI_TINY, tmp_path, '--epochs', '1', '--update-interval', '2')
    last = str(tmp_path / 'last.pth.tar')
    keep = tmp_path / 'keep.pth.tar'
    shutil.copyfile(last, keep)
    with caplog.at_level(logging.INFO):
        run_cli(CLI_TINY, tmp_path, '--epochs', '2', '--update-interval', '3', '--prune-rate', '0.3', '--resume', last)
    lines = [r.getMessage() for r in caplog.records if 'resuming with' in r.getMessage()]
    assert lines == ['resuming with --update-interval 3 (the checkpoint was trained with 2); --prune-rate 0.3 (the '
                     'checkpoint was trained with 0.5)']
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_cli(CLI_TINY, tmp_path, '--epochs', '2', '--update-interval', '2', '--resume', str(keep))
    assert not [r for r in caplog.records if 'resuming with' in r.getMessage()]


@pytest.mark.usefixtures('fresh_accelerate_state')
def test_cli_full_disk_at_a_save_is_one_line_and_keeps_the_checkpoint(capsys, tmp_path):
    """timm-dst-train writing a checkpoint onto a full disk (its partial file is a link to /dev/full): one line naming
    the checkpoint not written, exit 2; the partial file is removed and the previous last.pth.tar is unchanged."""
    from timm_dst.train import main
    if not os.path.exists('/dev/full'):
        pytest.skip('/dev/full absent')
    run_cli(CLI_TINY, tmp_path, '--epochs', '1')
    last = tmp_path / 'last.pth.tar'
    before = last.read_bytes()
    part = tmp_path / 'tmp.pth.tar.part'
    os.symlink('/dev/full', part)
    msg = _one_line(capsys, main, [*CLI_TINY, '--output', str(tmp_path), '--epochs', '2', '--resume', str(last)],
                    prog='timm-dst-train')
    assert msg.startswith(f'checkpoint of epoch 1 not written: {tmp_path}/tmp.pth.tar ('), msg
    assert msg.endswith('the checkpoints written before are unchanged'), msg
    assert not os.path.lexists(part) and last.read_bytes() == before
    assert read_checkpoint(str(last))['epoch'] == 0


@needs_timm_scripts
def test_launcher_diverged_training_stops_in_one_line(fmnist_folder, tmp_path):
    """Through timm's train.py with a learning rate that diverges at once: every gradient is non-finite, so after
    max_nonfinite_steps checked steps the run stops with one line and exit status 1 (it trained on with NaN before)."""
    args = [TRAIN_PY, fmnist_folder, *MODEL_ARGS, '-b', '32', '--epochs', '3', '--lr', '1e30', '--dst', 'set',
            '--sparsity', '0.9', '--update-interval', '1', '--dst-kwargs', 'max_nonfinite_steps=2',
            '--output', str(tmp_path), '--experiment', 'nan']
    out = launch(args, cwd=str(tmp_path), check=False)
    assert out.returncode == 1 and 'Traceback' not in out.stderr, (out.returncode, out.stderr[-3000:])
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith('timm-dst-run: ') and 'non-finite' in last and 'max_nonfinite_steps=2' in last, last
