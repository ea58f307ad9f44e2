"""``timm-dst-train`` on a timm user's command line (issue 27, items 6 and 7): a data folder (positional or
``--data-dir``) or a timm ``--dataset`` name gets timm's data set semantics and timm's defaults, the Fashion-MNIST
defaults apply only without data; ``summary.csv`` begins with timm's columns in timm's order; the log,
``results.json`` and ``dst_summary.json`` report the density of the sparse tensors and of all the model's weights."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import timm_dst
from timm_dst.cli.config import DEFAULTS_DIFFER, create_parser, parse_args

TIMM_TRAIN = Path(__file__).resolve().parents[1].parent / 'shared' / 'clients' / 'timm' / 'train.py'
TIMM_COLUMNS = ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
# the built-in defaults (the DST papers' laptop-sized setting), used when no data is given
BUILT_IN = {'dataset': 'fashion_mnist', 'model': 'itop_mlp', 'opt': 'momentum', 'weight_decay': 5e-4, 'epochs': 10,
            'warmup_epochs': 0, 'smoothing': 0.0, 'workers': 0}
# timm train.py's defaults of the same flags
TIMM = {'dataset': '', 'model': 'resnet50', 'opt': 'sgd', 'weight_decay': 2e-5, 'epochs': 300, 'warmup_epochs': 5,
        'smoothing': 0.1, 'workers': 4}


def _image_folder(root: Path, n: int = 4, size: int = 32) -> Path:
    """A tiny ImageFolder as timm reads it: ``train/`` and ``validation/``, two classes of ``n`` PNGs each."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for c, base in enumerate((40, 200)):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype('uint8')
                Image.fromarray(arr).save(d / f'{i}.png')
    return root


def _values(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in BUILT_IN}


def test_timm_defaults_are_timms():
    """The eight flags with a built-in default get timm train.py's own defaults with data (compared with timm's parser
    when ../shared holds its train.py)."""
    from timm_dst.cli.config import TIMM_DEFAULTS
    assert set(BUILT_IN) == set(DEFAULTS_DIFFER) and TIMM_DEFAULTS == TIMM
    if TIMM_TRAIN.is_file():
        spec = importlib.util.spec_from_file_location('_timm_train_script_defaults', TIMM_TRAIN)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # builds its parser at import; runs no training
        theirs = {a.dest: a.default for a in module.parser._actions}
        assert {k: theirs[k] for k in TIMM} == TIMM_DEFAULTS


def test_timm_defaults_when_a_data_folder_is_given(tmp_path):
    data = _image_folder(tmp_path / 'data', n=1)
    out = str(tmp_path / 'o')
    for argv in ([str(data)], ['--data-dir', str(data)], ['--dataset', 'folder', '--data-dir', str(data)]):
        args = parse_args([*argv, '--output', out])
        assert _values(args) == TIMM | ({'dataset': 'folder'} if '--dataset' in argv else {}), argv
        assert args.data_dir == str(data)
    # what the user sets stays
    args = parse_args([str(data), '--model', 'resnet10t', '--epochs', '2', '--smoothing', '0', '-j', '0', '--output',
                       out])
    assert _values(args) == TIMM | {'model': 'resnet10t', 'epochs': 2, 'smoothing': 0.0, 'workers': 0}


def test_built_in_defaults_without_data():
    """No data folder, no --data-dir, no --dataset: the Fashion-MNIST defaults; the built-in data sets keep them."""
    from timm_dst.cli.config import apply_default_family
    _, parser = create_parser()
    args = parser.parse_args([])
    assert not apply_default_family(args, set()) and _values(args) == BUILT_IN
    for dataset in ('synthetic', 'fashion_mnist', 'torch/fashion_mnist'):
        args = parser.parse_args(['--dataset', dataset])
        assert not apply_default_family(args, {'dataset'}) and _values(args) == BUILT_IN | {'dataset': dataset}
    args = parser.parse_args(['--dataset', 'torch/cifar10', '--data-dir', '/d'])
    assert apply_default_family(args, {'dataset', 'data_dir'}) and _values(args) == TIMM | {'dataset': 'torch/cifar10'}
    # a timm-dst recipe (a -c config with `dst`) keeps the built-in defaults for what it leaves out
    args = parser.parse_args(['--dataset', 'torch/cifar10', '--data-dir', '/d'])
    assert not apply_default_family(args, {'dataset', 'data_dir', 'dst'}, recipe=True)
    assert _values(args) == BUILT_IN | {'dataset': 'torch/cifar10'}


def test_recipe_with_a_data_folder_keeps_its_defaults(tmp_path):
    data = _image_folder(tmp_path / 'data', n=1)
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('dataset: folder\nmodel: resnet10t\nepochs: 3\ndst: set\nsparsity: 0.8\n')
    args = parse_args(['-c', str(recipe), str(data), '--output', str(tmp_path / 'o')])
    assert _values(args) == BUILT_IN | {'dataset': 'folder', 'model': 'resnet10t', 'epochs': 3}
    plain = tmp_path / 'timm.yaml'  # a timm user's own config: no DST key, timm's defaults for what it leaves out
    plain.write_text('model: resnet10t\nepochs: 3\n')
    args = parse_args(['-c', str(plain), str(data), '--output', str(tmp_path / 'o')])
    assert _values(args) == TIMM | {'model': 'resnet10t', 'epochs': 3}


def test_summary_csv_keeps_timms_columns_first(tmp_path):
    """Rows in any key order, a row with more columns (validated after an epoch that was not) and a file begun in the
    old order (train_top1 among timm's columns) all end up under one header that begins with timm's columns."""
    import csv

    from timm_dst.cli.outputs import write_summary_row
    path = tmp_path / 'summary.csv'
    path.write_text('epoch,train_loss,train_top1,lr,density\n0,1.5,40.0,0.1,0.2\n')  # an older run, no validation
    write_summary_row(str(path), {'epoch': 1, 'train_loss': 1.0, 'eval_loss': 0.9, 'eval_top1': 60.0,
                                  'eval_top5': 100.0, 'lr': 0.05, 'train_top1': 55.0, 'density': 0.2,
                                  'model_density': 0.25})
    write_summary_row(str(path), {'epoch': 2, 'train_loss': 0.8, 'lr': 0.01, 'train_top1': 70.0, 'density': 0.2,
                                  'model_density': 0.25})
    with open(path, newline='') as f:
        header, *rows = list(csv.reader(f))
    assert header == TIMM_COLUMNS + ['train_top1', 'density', 'model_density']
    table = [dict(zip(header, r)) for r in rows]
    assert [r['epoch'] for r in table] == ['0', '1', '2'] and table[0]['train_top1'] == '40.0'
    assert table[0]['eval_top1'] == '' and table[1]['eval_top1'] == '60.0' and table[2]['lr'] == '0.01'


def test_model_density_counts_every_weight():
    """``model_density``: the sparse tensors' active weights plus every other parameter whole, over all parameters;
    with an excluded layer it is above ``density`` (the sparse tensors only)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10),
                                torch.nn.LayerNorm(10), torch.nn.Linear(10, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, method='static', sparsity=0.8, distribution='uniform',
                                    exclude=['4.weight'])
    active = int(model[0].weight_mask.sum() + model[2].weight_mask.sum())
    assert active == sum(sp.counts) and sp.density == pytest.approx(active / (20 * 30 + 30 * 10))
    others = 30 + 10 + 10 + 10 + 10 * 5 + 5  # biases, the norm, the excluded layer
    total = 20 * 30 + 30 * 10 + others
    assert total == sum(p.numel() for p in model.parameters())
    assert sp.model_density == pytest.approx((active + others) / total)
    assert sp.model_density > sp.density
    from timm_dst.integrations.timm.outputs import dst_summary
    summary = dst_summary(sp)
    assert summary['density'] == sp.density and summary['model_density'] == sp.model_density


def test_data_folder_trains_like_timm(tmp_path):
    """``timm-dst-train DATA_FOLDER --model resnet10t ...`` with no --dataset trains on the folder; summary.csv
    begins with timm's columns; the log and results.json name both densities."""
    from accelerate.state import AcceleratorState

    from timm_dst.cli.train import main
    data, out = _image_folder(tmp_path / 'data'), tmp_path / 'run'
    try:
        main([str(data), '--model', 'resnet10t', '--img-size', '32', '-b', '2', '--epochs', '1', '--lr', '0.05',
              '--dst', 'set-itop', '--sparsity', '0.8', '--update-interval', '2', '-j', '0', '--log-interval', '2',
              '--no-progress', '--output', str(out)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    args = (out / 'args.yaml').read_text()
    assert "dataset: ''" in args and 'smoothing: 0.1' in args and 'opt: sgd' in args
    header = (out / 'summary.csv').read_text().splitlines()[0]
    assert header.startswith(','.join(TIMM_COLUMNS) + ','), header
    assert header.split(',')[len(TIMM_COLUMNS):][:3] == ['train_top1', 'density', 'model_density']
    results = json.loads((out / 'results.json').read_text())
    assert results['dataset'] in ('folder', '') and results['optimizer_steps'] == 4
    assert 0 < results['density'] < results['model_density'] < 1  # BatchNorm and biases stay dense
    log = (out / 'log.txt').read_text()
    line = [ln for ln in log.splitlines() if ' RESULT ' in ln][-1]
    assert f'density {results["density"]:.4f} (sparse tensors), {results["model_density"]:.4f} (all weights)' in line
    assert 'Density: ' in log and '(all weights)  R_s: ' in log
