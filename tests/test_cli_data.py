"""timm's data pipeline in timm-dst-train: the in-memory fast path equals timm's transform, timm CNNs at other input
sizes (``--img-size 28``), mixup / cutmix, checkpoints timm reads, Accelerate's precision."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from timm_dst.cli.data import FASHION_MNIST_DIR
from timm_dst.train import main

HAS_FMNIST = os.path.isdir(FASHION_MNIST_DIR)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _run(*argv):
    from accelerate.state import AcceleratorState
    main([str(a) for a in argv])
    AcceleratorState._reset_state(reset_partial_state=True)


def _views(argv, model='itop_mlp', **model_kw):
    import timm
    from timm.data import resolve_data_config

    from timm_dst.cli.config import parse_args
    from timm_dst.cli.data import create_loaders, data_config_args, open_datasets
    args = parse_args(argv)
    splits = open_datasets(args)
    m = timm.create_model(model, num_classes=10, **model_kw)
    cfg = resolve_data_config(data_config_args(args, splits.info), model=m)
    create_loaders(splits, cfg, args, 64)
    return splits, cfg


@pytest.mark.skipif(not HAS_FMNIST, reason='Fashion-MNIST is not installed')
@pytest.mark.parametrize('view', ['train', 'val'])
def test_fast_path_equals_timms_transform(view):
    splits, cfg = _views(['--dataset', 'fashion_mnist', '--no-aug'], in_chans=1, img_size=28)
    v = getattr(splits, view)
    assert v.fast_norm is not None and cfg['input_size'] == (1, 28, 28) and cfg['crop_pct'] == 1.0
    idx = list(range(0, 600, 7))
    fast, targets = v.__getitems__(idx)
    v.fast_norm = None  # the per-sample path: timm's create_transform on PIL images
    slow = torch.stack([v[i][0] for i in idx])
    assert torch.allclose(fast, slow, atol=1e-6)
    assert targets.tolist() == [v[i][1] for i in idx]


@pytest.mark.skipif(not HAS_FMNIST, reason='Fashion-MNIST is not installed')
def test_augmentation_flags_leave_the_fast_path():
    splits, cfg = _views(['--dataset', 'fashion_mnist', '--img-size', '32'], in_chans=1, img_size=32)
    assert splits.train.fast_norm is None and splits.val.fast_norm is None  # resized: timm's transforms
    x, _ = splits.train[0]
    assert tuple(x.shape) == (1, 32, 32)
    splits, _ = _views(['--dataset', 'fashion_mnist', '--aa', 'rand-m9-mstd0.5'], in_chans=1, img_size=28)
    assert splits.train.fast_norm is None and splits.val.fast_norm is not None


def test_cifar_crop_padding_default(tmp_path):
    """CIFAR trains with pad-4-and-crop (docs/cli.md), then timm's transform at the full 32 px."""
    from timm_dst.cli.data import _KNOWN
    assert _KNOWN['cifar10'].crop_padding == 4 and _KNOWN['cifar100'].crop_padding == 4


def test_cnn_with_img_size_mixup_cutmix(tmp_path):
    """A timm CNN that takes no img_size (resnet10t) at 28 px with mixup + cutmix: trains; summary.csv is timm's."""
    out = tmp_path / 'run'
    _run('--dataset', 'synthetic', '--input-size', '1', '28', '28', '--num-classes', '4', '--synthetic-train-size',
         '40', '--synthetic-test-size', '8', '--val-fraction', '0.2', '--model', 'resnet10t', '--img-size', '28',
         '-b', '8', '--lr', '0.05', '--mixup', '0.2', '--cutmix', '1.0', '--dst', 'set-itop', '--epochs', '1',
         '--no-progress', '--output', out)
    with open(out / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]['eval_top1']) >= 0 and 0 < float(rows[0]['density']) < 0.2
    assert float(rows[0]['itop_rate']) >= float(rows[0]['density'])
    assert (out / 'summary.png').stat().st_size > 1000


@pytest.mark.skipif(not HAS_FMNIST, reason='Fashion-MNIST is not installed')
def test_fmnist_resnet_checkpoint_loads_in_plain_timm(tmp_path):
    """The issue's run, a few steps: last.pth.tar loads strictly in timm without timm_dst; --initial-checkpoint
    of it works."""
    common = ['--dataset', 'fashion_mnist', '--model', 'resnet10t', '--in-chans', '1', '--img-size', '28', '--mixup',
              '0.2', '--cutmix', '1.0', '--dst', 'set-itop', '-b', '8', '--lr', '0.05', '--no-progress']
    _run(*common, '--stop-after-updates', 2, '--output', tmp_path / 'a')
    code = textwrap.dedent(f'''
        import sys, timm
        model = timm.create_model('resnet10t', in_chans=1, num_classes=10)
        timm.models.load_checkpoint(model, {str(tmp_path / 'a' / 'last.pth.tar')!r}, strict=True)
        assert not any(m.startswith('timm_dst') for m in sys.modules)
        ws = [p for p in model.parameters() if p.ndim > 1]
        print(sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws))
    ''')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    zeros, numel = map(int, res.stdout.split())
    assert 0.8 * numel < zeros < numel  # 90% sparse (ERK), folded into plain weights
    _run(*common, '--stop-after-updates', 1, '--output', tmp_path / 'b', '--initial-checkpoint',
         tmp_path / 'a' / 'last.pth.tar')
    assert (tmp_path / 'b' / 'last.pth.tar').is_file()


def test_precision_is_the_launchers_without_amp(monkeypatch):
    from timm_dst.cli.build import create_accelerator
    from timm_dst.cli.config import parse_args
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')
    args = parse_args(['--dataset', 'synthetic', '--input-size', '1', '6', '6'])
    assert create_accelerator(args).mixed_precision == 'bf16'


def _image_folder(root, splits=('train', 'validation', 'test'), n=(8, 3, 3)):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in zip(splits, n):
        for c, base in enumerate((40, 200)):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(count):
                arr = np.clip(base + rng.normal(0, 20, (20, 20, 3)), 0, 255).astype('uint8')
                Image.fromarray(arr).save(d / f'{i}.png')


def test_image_folder_with_its_validation_split(tmp_path):
    """timm's folder data set: the positional data folder, its validation/ split used (no held-out fraction), timm's
    per-sample transforms at --img-size, random erasing and --aa honoured (they run), test/ reported."""
    _image_folder(tmp_path / 'data')
    out = tmp_path / 'run'
    _run(tmp_path / 'data', '--dataset', 'folder', '--model', 'itop_mlp', '--img-size', '16', '-b', '4', '--lr', '0.05',
         '--epochs', '1', '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25', '--no-progress', '--output', out,
         '--save-images', '--log-interval', '2')
    import json
    res = json.loads((out / 'results.json').read_text())
    log = (out / 'log.txt').read_text()
    assert 'train 16, validation 6 (split \'validation\'), test 6' in log
    assert res['data_config']['input_size'] == [3, 16, 16] and res['optimizer_steps'] == 4
    assert 'test_best' in res and (out / 'train-batch-0.jpg').is_file()
