"""Every YAML recipe under recipes/ parses with the CLI's config loader and trains a few steps.

Where the recipe's data set is not on this machine the run uses synthetic data of the recipe's shape (channels,
image size, classes); the real model of the recipe is kept. Each run is one epoch of a handful of optimizer steps
with the topology updated every 2 steps, so the recipe's method, distribution and schedule all execute.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from timm_dst._config import _config_defaults, create_parser
from timm_dst._data import FASHION_MNIST_DIR, normalize_dataset_name
from timm_dst.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'recipes', '**', '*.yaml'),
                                                             recursive=True))
# data set -> (C, H, W), classes of its synthetic stand-in
SHAPES = {'fashion_mnist': ((1, 28, 28), 10), 'cifar10': ((3, 32, 32), 10), 'cifar100': ((3, 32, 32), 100)}
IMAGENET = ((3, 224, 224), 1000)
SMOKE_IMAGENET = ((3, 64, 64), 1000)  # ResNet-50 at 224 px takes ~90 s a recipe on 2 CPU cores; full size: -m slow


def _load(path: str) -> dict:
    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)


def _shape(cfg: dict) -> tuple[tuple[int, int, int], int]:
    name = normalize_dataset_name(cfg.get('dataset', 'fashion_mnist'))
    for key, shape in SHAPES.items():
        if name == key or name.endswith('/' + key) or name == 'torch/' + key:
            return shape
    return IMAGENET  # folder data sets of the recipes are ImageNet


def _smoke_args(path: str, out: str, full_size: bool = False) -> list[str]:
    cfg = _load(path)
    (c, h, w), n_cls = _shape(cfg)
    if (c, h, w) == IMAGENET[0] and not full_size:
        (c, h, w), n_cls = SMOKE_IMAGENET
    argv = ['-c', os.path.join(ROOT, path), '--output', out, '--experiment', '', '--epochs', '1', '--no-progress',
            '--workers', '0']
    name = normalize_dataset_name(cfg.get('dataset', 'fashion_mnist'))
    if not (name == 'fashion_mnist' and os.path.isdir(FASHION_MNIST_DIR)):
        argv += ['--dataset', 'synthetic', '--input-size', str(c), str(h), str(w), '--num-classes', str(n_cls),
                 '--data-dir', '', '--synthetic-train-size', '12', '--synthetic-test-size', '4']
        if 'img_size' in cfg:
            argv += ['--img-size', str(h)]
    else:
        argv += ['--stop-after-updates', '3']  # real Fashion-MNIST: three steps, then a checkpoint
    argv += ['--batch-size', '4', '--validation-batch-size', '8']
    if cfg.get('amp'):
        argv += ['--amp-dtype', 'bfloat16']  # the CPU runs autocast in bfloat16
    if cfg.get('update_milestones'):
        argv += ['--update-milestones', '0:2']
    elif cfg.get('dst', 'set-itop') not in ('dense', 'static', 'snip', 'lth'):
        argv += ['--update-interval', '2']
    if cfg.get('workers'):
        argv += ['--workers', '0']
    return argv


def test_recipes_found():
    assert len(RECIPES) >= 60
    names = {os.path.basename(p) for p in RECIPES}
    for expected in ('fig3_mlp_cifar10_set.yaml', 'table4_resnet50_imagenet_rigl_itop_s80.yaml',
                     'table5_resnet18_cifar10_set_plus.yaml', 'wrn28_2_cifar10_dsr_s90.yaml',
                     'resnet50_imagenet_dsr_s90.yaml', 'mlp_set_itop.yaml'):
        assert expected in names


@pytest.mark.parametrize('path', RECIPES)
def test_recipe_parses(path):
    """The CLI's loader accepts every key; values are the types the flags expect."""
    _, parser = create_parser()
    cfg = _config_defaults(parser, os.path.join(ROOT, path))
    assert cfg, path
    parser.set_defaults(**cfg)
    args = parser.parse_args([])
    for key, value in _load(path).items():
        dest = parser._option_string_actions['--' + key.replace('_', '-')].dest  # aliases: sparse-init is distribution
        assert getattr(args, dest) is not None, (path, key, value)


def test_paper_hyperparameters():
    """Spot checks against ITOP Tables 3-5 and DSR's official settings."""
    r = {os.path.splitext(os.path.basename(p))[0]: _load(p) for p in RECIPES}
    mlp = r['fig3_mlp_cifar10_set']
    assert (mlp['lr'], mlp['batch_size'], mlp['epochs'], mlp['weight_decay'], mlp['sparse_init']) == \
        (0.01, 128, 200, 5.0e-4, 'er')
    assert round(mlp['decay_epochs'] * 352) == 24000  # 10x every 24000 iterations, 352 steps per epoch
    vgg = r['fig3_vgg16_cifar10_set']
    assert (vgg['lr'], vgg['epochs'], vgg['update_interval'], vgg['sparse_init']) == (0.1, 250, 2000, 'erk')
    r34 = r['fig3_resnet34_cifar100_set']
    assert (r34['weight_decay'], r34['decay_milestones'], r34['update_interval']) == (1.0e-4, [100, 150], 1000)
    assert r['fig4_resnet34_cifar100_set_x20']['epochs'] == 4000
    assert r['fig4_resnet34_cifar100_set_x20']['decay_milestones'] == [2000, 3000]
    assert r['fig5_mlp_cifar10_rigl']['update_interval'] == 4000
    i50 = r['table4_resnet50_imagenet_rigl_itop_s90']
    assert (i50['batch_size'], i50['update_interval'], i50['prune_rate'], i50['warmup_epochs'],
            i50['decay_milestones'], i50['dst']) == (64, 4000, 0.5, 5, [30, 60, 90], 'rigl-itop')
    assert r['table4_mlp_cifar10_set_itop']['batch_size'] == 32
    assert r['table5_resnet18_cifar10_set_plus']['grow_unexplored_first'] is True
    assert r['table1_resnet18_cifar10_set']['decay_milestones'] == [125, 187]
    wrn = r['wrn28_2_cifar10_dsr_s90']
    spe = 391  # 50000 / 128, last partial batch kept
    assert wrn['update_milestones'] == [[0, 100], [25 * spe, 200], [80 * spe, 400], [140 * spe, 800]]
    assert (wrn['dsr_np'], wrn['update_end']) == (20000, 190 * spe)
    d50 = r['resnet50_imagenet_dsr_s80']
    assert [iv for _, iv in d50['update_milestones']] == [1000, 2000, 4000, 8000] and d50['dsr_np'] == 400000


def test_generated_recipes_up_to_date(tmp_path):
    """recipes/_generate.py reproduces the committed itop/ and dsr/ recipes."""
    code = (f'import sys; sys.path.insert(0, {os.path.join(ROOT, "recipes")!r}); import _generate as g; '
            f'g.write({str(tmp_path / "itop")!r}, g.itop_recipes()); '
            f'g.write({str(tmp_path / "dsr")!r}, g.dsr_recipes())')
    subprocess.run([sys.executable, '-c', code], check=True)
    for sub in ('itop', 'dsr'):
        made = sorted(os.listdir(tmp_path / sub))
        assert made == sorted(os.path.basename(p) for p in RECIPES if p.startswith(f'recipes{os.sep}{sub}{os.sep}'))
        for name in made:
            with open(tmp_path / sub / name) as a, open(os.path.join(ROOT, 'recipes', sub, name)) as b:
                assert a.read() == b.read(), name


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


_DENSE_CACHE: dict[str, str] = {}


def _lth_state(path: str, tmp_root: str) -> str:
    """LTH recipes read a trained dense model: make one with the dense recipe they name (tiny run)."""
    dense_dir = os.path.dirname(_load(path)['lth_trained_state'])
    recipe = os.path.join('recipes', os.path.basename(os.path.dirname(dense_dir)), os.path.basename(dense_dir)
                          + '.yaml')
    if recipe not in _DENSE_CACHE:
        out = os.path.join(tmp_root, 'dense_' + os.path.basename(dense_dir))
        main(_smoke_args(recipe, out))
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)
        _DENSE_CACHE[recipe] = os.path.join(out, 'model_last.safetensors')
    return _DENSE_CACHE[recipe]


def _run_recipe(path: str, tmp_path_factory, full_size: bool = False) -> None:
    import torch
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp('run'))
    argv = _smoke_args(path, out, full_size)
    if _load(path).get('lth_trained_state'):
        argv += ['--lth-trained-state', _lth_state(path, str(tmp_path_factory.getbasetemp()))]
    main(argv)
    if os.path.isfile(os.path.join(out, 'results.json')):
        with open(os.path.join(out, 'results.json')) as f:
            res = json.load(f)
        assert res['optimizer_steps'] > 0
        cfg = _load(path)
        if cfg.get('sparsity') is not None and cfg.get('dst') != 'dense':
            assert abs(res['density'] - (1 - cfg['sparsity'])) < 0.02 or cfg.get('dense_first_layer'), res
    else:
        assert os.path.isfile(os.path.join(out, 'last.pth.tar'))  # stopped after a few steps


def _signature(path: str) -> tuple:
    """What decides the code a run goes through: recipes that differ only in sparsity, ΔT, batch size, epochs or lr
    anchors share one."""
    c = _load(path)
    return (c.get('model'), c.get('dataset'), c.get('dst'), c.get('sparse_init'), bool(c.get('grow_unexplored_first')),
            bool(c.get('update_milestones')), c.get('sched'), bool(c.get('dense_first_layer')), bool(c.get('exclude')))


_FIRST: dict[tuple, str] = {}
for _p in RECIPES:
    _FIRST.setdefault(_signature(_p), _p)
RUN_FAST = sorted(_FIRST.values())  # one recipe per signature in CI (about 30, a few minutes on 2 cores)
RUN_SLOW = [p for p in RECIPES if p not in RUN_FAST]


@pytest.mark.parametrize('path', RUN_FAST)
def test_recipe_runs(path, tmp_path_factory):
    """A few optimizer steps of one recipe per signature (synthetic data of its shape where its data set is absent;
    ImageNet recipes at 64 px)."""
    _run_recipe(path, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize('path', RUN_SLOW)
def test_recipe_runs_variants(path, tmp_path_factory):
    """The same for every other recipe (variants of a signature run in CI): ``pytest -m slow``."""
    _run_recipe(path, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize('path', [p for p in RECIPES if 'imagenet' in p])
def test_imagenet_recipe_runs_full_size(path, tmp_path_factory):
    """The ImageNet recipes at their own 224 px input size."""
    _run_recipe(path, tmp_path_factory, full_size=True)
