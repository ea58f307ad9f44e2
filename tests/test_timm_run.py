"""timm_dst.run: timm's own train.py (../shared/clients/timm, skipped when absent) trained with DST.

A small Fashion-MNIST ImageFolder (PNGs written from the Debian idx files), resnet10t at 1x28x28, 4 optimizer steps per
epoch: train 3 epochs; validate the 2-epoch checkpoint with timm's validate.py in a process without timm_dst; resume
from that checkpoint and compare with the uninterrupted run; two processes under torchrun.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from timm_dst.integrations.timm import DST_KEY, read_checkpoint
from timm_dst.run import split_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM_DIR = os.path.join(ROOT, '..', 'shared', 'clients', 'timm')
TRAIN_PY = os.path.join(TIMM_DIR, 'train.py')
VALIDATE_PY = os.path.join(TIMM_DIR, 'validate.py')
FMNIST = '/usr/share/datasets/fashion-mnist'
needs_timm_scripts = pytest.mark.skipif(not os.path.isfile(TRAIN_PY), reason='../shared/clients/timm/train.py absent')
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST), reason='Fashion-MNIST idx files absent')

MODEL_ARGS = ['--model', 'resnet10t', '--in-chans', '1', '--input-img-mode', 'L', '--input-size', '1', '28', '28',
              '--mean', '0.286', '--std', '0.353', '--num-classes', '10', '--device', 'cpu', '--workers', '0']
DST_ARGS = ['--dst', 'rigl-itop', '--sparsity', '0.9', '--update-interval', '2']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}


def write_fmnist_folder(root: str, n_train: int, n_val: int) -> str:
    """Fashion-MNIST training images as an ImageFolder: ``root/train/<label>/*.png`` and ``root/validation/...``."""
    from PIL import Image

    from timm_dst.cli.data import read_idx
    images = read_idx(os.path.join(FMNIST, 'train-images-idx3-ubyte.gz'))
    labels = read_idx(os.path.join(FMNIST, 'train-labels-idx1-ubyte.gz'))
    for split, indices in (('train', range(n_train)), ('validation', range(n_train, n_train + n_val))):
        for i in indices:
            folder = os.path.join(root, split, str(int(labels[i])))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(images[i].numpy(), mode='L').save(os.path.join(folder, f'{i:05d}.png'))
    return root


@pytest.fixture(scope='session')
def fmnist_folder(tmp_path_factory) -> str:
    if not os.path.isdir(FMNIST):
        pytest.skip('Fashion-MNIST idx files absent')
    return write_fmnist_folder(str(tmp_path_factory.mktemp('fmnist')), 128, 64)


def launch(args: list[str], cwd: str, launcher: list[str] | None = None, timeout: int = 600,
           check: bool = True) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ['-m', 'timm_dst.run'] + args
    out = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}')
    return out


def train(data: str, out: str, experiment: str, *extra: str, launcher: list[str] | None = None):
    args = [TRAIN_PY, data, *MODEL_ARGS, '-b', '32', *DST_ARGS, '--output', out, '--experiment', experiment, *extra]
    return launch(args, cwd=out, launcher=launcher)


def _rows(path: str) -> list[dict[str, str]]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def runs(fmnist_folder, tmp_path_factory):
    """An uninterrupted 3-epoch run, and a run resumed from its 2-epoch checkpoint."""
    out = str(tmp_path_factory.mktemp('runs'))
    full = train(fmnist_folder, out, 'full', '--epochs', '3')
    resumed = train(fmnist_folder, out, 'resumed', '--epochs', '3',
                    '--resume', os.path.join(out, 'full', 'checkpoint-1.pth.tar'))
    return {'out': out, 'full': full, 'resumed': resumed, 'data': fmnist_folder}


# --------------------------------------------------------------------------------------------------------------------
def test_split_argv():
    script, rest, dst = split_argv(['--dst', 'set', 'train.py', 'DATA', '-c', 'cfg.yaml', '--sparsity=0.8',
                                    '--lr', '0.1', '--include', 'stages.*', 'head.*', '--epochs', '2',
                                    '--dense-classifier', '--mean', '-0.5', '--dsr-np', '3'])
    assert script == 'train.py'
    assert rest == ['DATA', '-c', 'cfg.yaml', '--lr', '0.1', '--epochs', '2', '--mean', '-0.5']
    assert dst == ['--dst', 'set', '--sparsity=0.8', '--include', 'stages.*', 'head.*', '--dense-classifier',
                   '--dsr-np', '3']


def test_usage_errors_are_one_line(tmp_path):
    out = launch(['--dst', 'rigl-itop'], cwd=str(tmp_path), check=False)
    assert out.returncode == 2 and out.stderr.count('\n') == 1 and 'give the path of a timm train.py' in out.stderr
    out = launch(['nothere.py', '--dst', 'rigl-itop'], cwd=str(tmp_path), check=False)
    assert out.returncode == 2 and out.stderr.strip() == 'timm-dst-run: error: nothere.py: no such file (give the ' \
                                                         'path of a timm train.py)'
    script = tmp_path / 'train.py'
    script.write_text('raise SystemExit("must not run")\n')
    out = launch([str(script), '--dst', 'nope'], cwd=str(tmp_path), check=False)
    assert out.returncode == 2 and out.stderr.count('\n') == 1 and "--dst 'nope' is not a known method" in out.stderr
    out = launch([str(script), '--sparsity', '1.5'], cwd=str(tmp_path), check=False)
    assert out.returncode == 2 and '--sparsity 1.5 is out of range' in out.stderr


def test_help_lists_dst_flags(tmp_path):
    out = launch(['--help'], cwd=str(tmp_path))
    for flag in ('--dst', '--sparsity', '--update-interval', '--prune-rate', '--dsr-np', '--snfs-momentum'):
        assert flag in out.stdout


@needs_timm_scripts
def test_help_shows_train_py_flags_too(tmp_path):
    out = launch([TRAIN_PY, '--help'], cwd=str(tmp_path))
    assert '--sparsity' in out.stdout and '--grad-accum-steps' in out.stdout  # ours, then train.py's own


@needs_timm_scripts
def test_trains_sparse_and_reports(runs):
    run = os.path.join(runs['out'], 'full')
    log = runs['full'].stdout + runs['full'].stderr
    assert 'DST: attached Sparsifier(method=\'rigl-itop\', sparsity=0.9' in log
    assert 'DST: rigl-itop over 12 optimizer steps (3 epochs x 4)' in log
    assert log.count('topology update') == 6  # after steps 2, 4, ..., 12
    rows = _rows(os.path.join(run, 'dst_summary.csv'))
    assert [int(r['epoch']) for r in rows] == [0, 1, 2] and [int(r['step']) for r in rows] == [4, 8, 12]
    assert all(abs(float(r['density']) - 0.1) < 1e-3 for r in rows)
    itop = [float(r['itop_rate']) for r in rows]
    assert 0.1 < itop[0] <= itop[1] <= itop[2] < 1.0
    summary = json.load(open(os.path.join(run, 'dst_summary.json')))
    assert summary['itop_rate'] == pytest.approx(itop[-1], abs=1e-6) and summary['inference_flops_ratio'] < 0.5
    assert 'final density 0.1000' in log and 'training FLOPs' in log
    for name in ('checkpoint-0', 'checkpoint-1', 'checkpoint-2', 'last', 'model_best'):
        ckpt = read_checkpoint(os.path.join(run, name + '.pth.tar'))
        assert DST_KEY in ckpt and not any(k.endswith(('_orig', '_mask')) for k in ckpt['state_dict'])
        masks = ckpt[DST_KEY]['sparsifier']['masks']
        assert all(not ckpt['state_dict'][k][~m].any() for k, m in masks.items())


_VALIDATE = textwrap.dedent('''
    import json, runpy, sys
    import timm, torch
    ckpt, data, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.argv = ['validate.py', data, '--checkpoint', ckpt, '--results-format', 'json', '--results-file', 'res.json',
                *args]
    runpy.run_path(VALIDATE_PY, run_name='__main__')
    model = timm.create_model('resnet10t', in_chans=1, num_classes=10)
    timm.models.load_checkpoint(model, ckpt, strict=True)
    w = [p for p in model.parameters() if p.dim() > 1]
    zeros = sum(int((p == 0).sum()) for p in w) / sum(p.numel() for p in w)
    print('RESULT', json.dumps({'zeros': zeros, 'timm_dst': any(m.startswith('timm_dst') for m in sys.modules),
                                'top1': json.load(open('res.json'))['top1']}))
''')


@needs_timm_scripts
def test_validate_py_reads_the_checkpoint_without_timm_dst(runs, tmp_path):
    ckpt = os.path.join(runs['out'], 'full', 'checkpoint-1.pth.tar')  # after two epochs
    script = _VALIDATE.replace('VALIDATE_PY', repr(VALIDATE_PY))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    out = subprocess.run([sys.executable, '-c', script, ckpt, os.path.join(runs['data'], 'validation'),
                          *MODEL_ARGS],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.split('RESULT ', 1)[1])
    assert res['timm_dst'] is False
    # conv / linear weights at sparsity 0.9 (ERK), plus the weights grown (at zero) by the update at its last step
    assert 0.899 <= res['zeros'] <= 0.93
    # (its top-1 is not compared with train.py's own evaluation: the two scripts' eval pipelines differ slightly,
    # dense checkpoints included)
    assert 0.0 <= res['top1'] <= 100.0


@needs_timm_scripts
def test_resume_continues_exactly(runs):
    full = read_checkpoint(os.path.join(runs['out'], 'full', 'last.pth.tar'))
    resumed = read_checkpoint(os.path.join(runs['out'], 'resumed', 'last.pth.tar'))
    log = runs['resumed'].stdout + runs['resumed'].stderr
    assert 'step=8)' in log and log.count('topology update') == 2  # steps 10 and 12 only
    assert full['epoch'] == resumed['epoch'] == 2
    a, b = full[DST_KEY], resumed[DST_KEY]
    assert a['step'] == b['step'] == 12 and a['itop_rate'] == b['itop_rate']
    for key, mask in a['sparsifier']['masks'].items():
        assert torch.equal(mask, b['sparsifier']['masks'][key])
        assert torch.equal(a['sparsifier']['explored'][key], b['sparsifier']['explored'][key])
    for key, value in full['state_dict'].items():
        torch.testing.assert_close(resumed['state_dict'][key], value, rtol=0, atol=0)
    rows = _rows(os.path.join(runs['out'], 'resumed', 'dst_summary.csv'))
    assert [r['epoch'] for r in rows] == ['2']
    assert float(rows[0]['itop_rate']) == pytest.approx(a['itop_rate'], abs=1e-6)


@needs_timm_scripts
def test_torchrun_two_processes(fmnist_folder, tmp_path):
    masks_dir = str(tmp_path / 'rank_masks')
    out = train(fmnist_folder, str(tmp_path), 'ddp', '--epochs', '2', '--model-ema', '--dst-rank-masks', masks_dir,
                launcher=[sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2'])
    log = out.stdout + out.stderr
    assert 'DST: rigl-itop over 4 optimizer steps (2 epochs x 2)' in log and 'Test (EMA)' in log
    r0, r1 = (torch.load(os.path.join(masks_dir, f'masks_rank{r}.pt')) for r in (0, 1))
    assert r0['step'] == r1['step'] == 4 and r0['itop_rate'] == r1['itop_rate'] > 0.1
    assert all(torch.equal(m, r1['masks'][k]) for k, m in r0['masks'].items())
    ckpt = read_checkpoint(os.path.join(str(tmp_path), 'ddp', 'last.pth.tar'))
    for key, mask in ckpt[DST_KEY]['sparsifier']['masks'].items():
        assert torch.equal(mask, r0['masks'][key])
        assert not ckpt['state_dict_ema'][key][~mask].any() and not ckpt['state_dict'][key][~mask].any()


# --------------------------------------------------------------------------------------------------------------------
# a script in the style of the timm 1.0.x train.py before timm.task (resume_checkpoint, ModelEmaV3, NativeDDP,
# CheckpointSaver without a task, create_scheduler_v2), on random tensors
_LEGACY = textwrap.dedent('''
    import argparse, os
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as NativeDDP  # noqa: F401  (as train.py imports it)
    from timm import utils
    from timm.models import create_model, load_checkpoint, resume_checkpoint
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    parser.add_argument('--model', default='test_resnet')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--resume', default='')
    parser.add_argument('--initial-checkpoint', default='')
    parser.add_argument('--model-ema', action='store_true')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--opt', default='sgd')
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--weight-decay', type=float, default=0.0)
    parser.add_argument('--momentum', type=float, default=0.9)
    parser.add_argument('--sched', default='cosine')
    parser.add_argument('--warmup-epochs', type=int, default=0)
    parser.add_argument('--input-size', type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument('-b', '--batch-size', type=int, default=8)
    args = parser.parse_args()
    utils.setup_default_logging()
    utils.random_seed(args.seed, 0)
    model = create_model(args.model, num_classes=10, checkpoint_path=args.initial_checkpoint)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    resume_epoch = None
    if args.resume:
        resume_epoch = resume_checkpoint(model, args.resume, optimizer=optimizer)
    model_ema = None
    if args.model_ema:
        model_ema = utils.ModelEmaV3(model, decay=0.9)
        if args.resume:
            load_checkpoint(model_ema.module, args.resume, use_ema=True)
    saver = utils.CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=model_ema,
                                  checkpoint_dir=args.output, recovery_dir=args.output)
    updates_per_epoch = 4
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                   updates_per_epoch=updates_per_epoch)
    start_epoch = resume_epoch or 0
    if start_epoch > 0:
        lr_scheduler.step(start_epoch)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    for epoch in range(start_epoch, num_epochs):
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if model_ema is not None:
                model_ema.update(model)
        utils.update_summary(epoch, {'loss': loss.item()}, {'top1': 0.0},
                             filename=os.path.join(args.output, 'summary.csv'), write_header=epoch == start_epoch)
        saver.save_checkpoint(epoch, metric=-loss.item())
        lr_scheduler.step(epoch + 1)
''')


@pytest.fixture
def legacy(tmp_path):
    script = tmp_path / 'legacy_train.py'
    script.write_text(_LEGACY)
    return str(script)


def _legacy_run(legacy: str, out: str, *extra: str, dst: tuple[str, ...] = ('--dst', 'set', '--sparsity', '0.8',
                                                                           '--update-interval', '2')):
    os.makedirs(out, exist_ok=True)
    return launch([legacy, '--output', out, *extra, *dst], cwd=out)


def test_legacy_train_py_api(legacy, tmp_path):
    """resume_checkpoint + ModelEmaV3 + CheckpointSaver(model_ema=...): plain weights, exact resume, EMA reloaded."""
    full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
    _legacy_run(legacy, full, '--epochs', '3', '--model-ema')
    out = _legacy_run(legacy, resumed, '--epochs', '3', '--model-ema',  # from its state after two epochs
                      '--resume', os.path.join(full, 'checkpoint-1.pth.tar'))
    assert 'step=8)' in out.stdout + out.stderr
    a, b = (read_checkpoint(os.path.join(d, 'last.pth.tar')) for d in (full, resumed))
    assert a[DST_KEY]['step'] == b[DST_KEY]['step'] == 12 and a[DST_KEY]['itop_rate'] == b[DST_KEY]['itop_rate']
    for key in a['state_dict']:
        torch.testing.assert_close(b['state_dict'][key], a['state_dict'][key], rtol=0, atol=0)
        torch.testing.assert_close(b['state_dict_ema'][key], a['state_dict_ema'][key], rtol=0, atol=0)
    import timm
    model = timm.create_model('test_resnet', num_classes=10)
    timm.models.load_checkpoint(model, os.path.join(full, 'last.pth.tar'), strict=True)  # the EMA weights


def test_dense_checkpoint_starts_sparse_training(legacy, tmp_path):
    """A dense timm checkpoint given to --initial-checkpoint or --resume: sparse training from its weights."""
    import timm
    dense = timm.create_model('test_resnet', num_classes=10)
    path = str(tmp_path / 'dense.pth')
    torch.save({'state_dict': dense.state_dict(), 'epoch': 0, 'version': 2}, path)
    mag = ('--dst', 'set', '--sparsity', '0.8', '--mask-init', 'magnitude', '--update-interval', '100')
    for flag, name in (('--initial-checkpoint', 'init'), ('--resume', 'resume')):
        out = _legacy_run(legacy, str(tmp_path / name), '--epochs', '2', flag, path, '--lr', '0', dst=mag)
        log = out.stdout + out.stderr
        ckpt = read_checkpoint(str(tmp_path / name / 'last.pth.tar'))
        masks = ckpt[DST_KEY]['sparsifier']['masks']
        for key, mask in masks.items():  # magnitude topology of the dense weights, which lr 0 leaves unchanged
            w = dense.state_dict()[key]
            assert torch.equal(ckpt['state_dict'][key], w * mask)
            if (~mask).any():  # ERK may leave small tensors dense
                assert w.abs()[mask].min() >= w.abs()[~mask].max()
        if flag == '--resume':
            assert 'holds no timm_dst state' in log and ckpt[DST_KEY]['step'] == 8 and ckpt['epoch'] == 1


# --------------------------------------------------------------------------------------------------------------------
# longer checks (pytest -m slow)
_EDITS = [  # docs/timm-train.md: the lines a user adds to the shared train.py
    ('from timm.utils import NativeScaler\n',
     'from timm.utils import NativeScaler\nfrom timm_dst.integrations import timm as dst_timm\n'),
    ('\n\ndef _parse_args():', '\ndst_timm.add_dst_args(parser)\n\n\ndef _parse_args():'),
    ('            log_info=utils.is_primary(args),\n        )\n\n    # setup exponential moving average',
     '            log_info=utils.is_primary(args),\n        )\n'
     '    sparsifier = dst_timm.create_sparsifier_from_args(model, optimizer, args, resume=args.resume)\n\n'
     '    # setup exponential moving average'),
    ("            task=task,\n        )\n        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:",
     "            task=task,\n        )\n        dst_timm.pack_saver(saver, sparsifier)\n"
     "        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:"),
    ('        updates_per_epoch=updates_per_epoch,\n    )\n    start_epoch = 0',
     '        updates_per_epoch=updates_per_epoch,\n    )\n'
     '    dst_timm.begin_training(sparsifier, num_epochs * updates_per_epoch, '
     'start_step=(resume_epoch or 0) * updates_per_epoch)\n    start_epoch = 0'),
]


@pytest.mark.slow
@needs_timm_scripts
def test_edited_train_py_matches_the_launcher(runs, tmp_path):
    """The documented five-line edit of the shared train.py trains exactly as the launcher does."""
    text = open(TRAIN_PY).read()
    for old, new in _EDITS:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    script = tmp_path / 'train.py'
    script.write_text(text)
    out = str(tmp_path)
    args = [str(script), runs['data'], *MODEL_ARGS, '-b', '32', *DST_ARGS, '--output', out, '--experiment', 'edited',
            '--epochs', '3']
    res = subprocess.run([sys.executable, *args], cwd=out, env=ENV, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    a = read_checkpoint(os.path.join(runs['out'], 'full', 'last.pth.tar'))
    b = read_checkpoint(os.path.join(out, 'edited', 'last.pth.tar'))
    assert a[DST_KEY]['itop_rate'] == b[DST_KEY]['itop_rate']
    for key, value in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][key], value, rtol=0, atol=0)


@pytest.mark.slow
@needs_timm_scripts
def test_two_epochs_then_resume_for_a_third(fmnist_folder, tmp_path):
    """The issue's sequence: train two epochs, resume with --epochs 3. With schedules that do not depend on the
    run's length (step lr decay without warm-up, constant prune rate) it equals an uninterrupted 3-epoch run."""
    out = str(tmp_path)
    same = ['--sched', 'step', '--decay-epochs', '10', '--warmup-epochs', '0', '--prune-rate-schedule', 'constant',
            '--prune-rate', '0.3']
    train(fmnist_folder, out, 'three', '--epochs', '3', *same)
    train(fmnist_folder, out, 'two', '--epochs', '2', *same)
    train(fmnist_folder, out, 'third', '--epochs', '3', *same, '--resume', os.path.join(out, 'two', 'last.pth.tar'))
    a = read_checkpoint(os.path.join(out, 'three', 'last.pth.tar'))
    b = read_checkpoint(os.path.join(out, 'third', 'last.pth.tar'))
    assert a[DST_KEY]['step'] == b[DST_KEY]['step'] == 12 and a[DST_KEY]['itop_rate'] == b[DST_KEY]['itop_rate']
    for key, mask in a[DST_KEY]['sparsifier']['masks'].items():
        assert torch.equal(mask, b[DST_KEY]['sparsifier']['masks'][key])
    for key, value in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][key], value, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# another release's train.py (TIMM_DST_OTHER_TRAIN_PY=PATH/TO/train.py; skipped when unset)
OTHER_TRAIN_PY = os.environ.get('TIMM_DST_OTHER_TRAIN_PY', '')
needs_other_train_py = pytest.mark.skipif(not os.path.isfile(OTHER_TRAIN_PY),
                                          reason='TIMM_DST_OTHER_TRAIN_PY (another timm train.py) not set')
# a train.py without --device (timm before 1.0.x's --device flag) asks timm.utils.init_distributed_device for CUDA and
# calls torch.cuda.synchronize() in validate(): without a GPU the run goes through this prelude (the train.py itself
# stays unmodified), which makes both use the CPU, then starts the launcher
_CPU_PRELUDE = textwrap.dedent('''
    import sys
    import torch
    import timm.utils
    import timm.utils.distributed as tud
    _init = tud.init_distributed_device
    def init_distributed_device(args):
        args.device = 'cpu'
        return _init(args)
    timm.utils.init_distributed_device = tud.init_distributed_device = init_distributed_device
    torch.cuda.synchronize = lambda *a, **k: None
    from timm_dst.run import main
    main(sys.argv[1:])
''')
_CHECK_PLAIN = textwrap.dedent('''
    import json, sys
    import timm
    path, in_chans = sys.argv[1], int(sys.argv[2])
    out = {}
    for use_ema in (False, True):
        model = timm.create_model('resnet10t', in_chans=in_chans, num_classes=10)
        timm.models.load_checkpoint(model, path, strict=True, use_ema=use_ema)
        w = [p for p in model.parameters() if p.dim() > 1]
        out[str(use_ema)] = sum(int((p == 0).sum()) for p in w) / sum(p.numel() for p in w)
    print('RESULT', json.dumps({'zeros': out, 'timm_dst': any(m.startswith('timm_dst') for m in sys.modules)}))
''')


@needs_other_train_py
def test_other_release_train_py(fmnist_folder, tmp_path):
    """Another timm release's train.py: trains sparse, plain timm weights (EMA too) with ~90% zeros loaded without
    timm_dst, ``--resume`` from the 2-epoch checkpoint equals the uninterrupted 3-epoch run (weights, EMA, masks)."""
    text = open(OTHER_TRAIN_PY).read()
    gray = "'--input-img-mode'" in text  # older scripts read every image as RGB: 3 channels then
    model_args = ['--model', 'resnet10t', '--input-size', '1' if gray else '3', '28', '28', '--mean', '0.286',
                  '--std', '0.353', '--num-classes', '10', '--workers', '0', '-b', '32']
    if gray:
        model_args += ['--in-chans', '1', '--input-img-mode', 'L']
    launcher = [sys.executable, '-m', 'timm_dst.run']
    if "'--device'" in text:
        model_args += ['--device', 'cpu']
    elif not torch.cuda.is_available():
        launcher = [sys.executable, '-c', _CPU_PRELUDE]
    out = str(tmp_path)

    def run(experiment: str, *extra: str) -> str:
        cmd = [*launcher, OTHER_TRAIN_PY, fmnist_folder, *model_args, *DST_ARGS, '--model-ema', '--output', out,
               '--experiment', experiment, '--epochs', '3', *extra]
        res = subprocess.run(cmd, cwd=out, env=ENV, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f'{" ".join(cmd)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}'
        return res.stdout + res.stderr

    log = run('full')
    assert 'DST: rigl-itop over 12 optimizer steps (3 epochs x 4)' in log and log.count('topology update') == 6
    log = run('resumed', '--resume', os.path.join(out, 'full', 'checkpoint-1.pth.tar'))
    assert 'step=8)' in log and log.count('topology update') == 2
    a, b = (read_checkpoint(os.path.join(out, d, 'last.pth.tar')) for d in ('full', 'resumed'))
    assert a[DST_KEY]['step'] == b[DST_KEY]['step'] == 12 and a[DST_KEY]['itop_rate'] == b[DST_KEY]['itop_rate']
    for key, mask in a[DST_KEY]['sparsifier']['masks'].items():
        assert torch.equal(mask, b[DST_KEY]['sparsifier']['masks'][key])
    for sd in ('state_dict', 'state_dict_ema'):
        for key, value in a[sd].items():
            torch.testing.assert_close(b[sd][key], value, rtol=0, atol=0)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    res = subprocess.run([sys.executable, '-c', _CHECK_PLAIN, os.path.join(out, 'full', 'last.pth.tar'),
                          '1' if gray else '3'], cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    plain = json.loads(res.stdout.split('RESULT ', 1)[1])
    assert plain['timm_dst'] is False
    assert all(0.899 <= z <= 0.93 for z in plain['zeros'].values()), plain


@needs_timm_scripts
@pytest.mark.parametrize('model,kwargs', [('itop_mlp', ['hidden=(256,128)', 'img_size=28']),
                                          ('vit_tiny_patch16_224', ['img_size=28', 'patch_size=4']),
                                          ('resnet10t', [])])
def test_launcher_masks_are_independent_of_the_init(fmnist_folder, tmp_path, model, kwargs):
    """train.py seeds torch with --seed, builds the model, and the launcher attaches with the same seed: the active
    weights of every sparse tensor are a plausible random sample of the initialisation (issue #24; the MLP's first
    layer and the ViT's patch embedding kept only positive weights before the fix). A learning rate of 1e-12 keeps
    the weights at their initial values."""
    from test_seeding import assert_unbiased, bias_z
    out = str(tmp_path)
    args = [TRAIN_PY, fmnist_folder, *MODEL_ARGS, '--model', model, '-b', '32', '--epochs', '1', '--lr', '1e-12',
            '--weight-decay', '0', '--sched', 'step', '--dst', 'static', '--sparsity', '0.9', '--output', out,
            '--experiment', 'seed', '--seed', '42']
    if kwargs:
        args += ['--model-kwargs', *kwargs]
    launch(args, cwd=out)
    ckpt = read_checkpoint(os.path.join(out, 'seed', 'last.pth.tar'))
    masks = ckpt[DST_KEY]['sparsifier']['masks']
    assert_unbiased([(k, *bias_z(ckpt['state_dict'][k], m, center=0.0)) for k, m in masks.items()])
