"""Every YAML recipe under recipes/ parses with the CLI's config loader and trains a few steps.

Where the recipe's data set is not on this machine the run uses synthetic data of the recipe's shape (channels,
image size, classes); the real model of the recipe is kept. Each run is one epoch of a handful of optimizer steps
with the topology updated every 2 steps, so the recipe's method, distribution and schedule all execute.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from timm_dst.cli.config import _config_defaults, create_parser
from timm_dst.cli.data import FASHION_MNIST_DIR, normalize_dataset_name
from timm_dst.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'recipes', '**', '*.yaml'),
                                                             recursive=True))
# data set -> (C, H, W), classes of its synthetic stand-in
SHAPES = {'fashion_mnist': ((1, 28, 28), 10), 'cifar10': ((3, 32, 32), 10), 'cifar100': ((3, 32, 32), 100)}
IMAGENET = ((3, 224, 224), 1000)
SMOKE_IMAGENET = ((3, 64, 64), 1000)  # ResNet-50 at 224 px takes ~90 s a recipe on 2 CPU cores; full size: -m slow


# epochs at each lr of the papers' step schedules (PyTorch MultiStepLR milestones: the first m epochs at the initial
# lr), keyed by a glob of the recipe path under recipes/; every `sched: multistep` recipe must match exactly one
STEP_EPOCHS = {
    # ITOP official main.py: drops at epochs / 2 and 3 * epochs / 4 (x the extension factor), per epoch
    'itop_fmnist/mlp_*[!0-9].yaml': (20, 10, 10),  # 40 epochs (the 1x recipes: names not ending in a factor)
    'itop_fmnist/mlp_*_x2.yaml': (40, 20, 20),
    'itop_fmnist/mlp_*_x5.yaml': (100, 50, 50),
    'itop_fmnist/mlp_*_x10.yaml': (200, 100, 100),
    'itop/fig3_resnet34_cifar100_*.yaml': (100, 50, 50),  # ITOP Appendix A.3: 10x at the 100 and 150 epoch
    'itop/fig4_resnet34_cifar100_set_x2.yaml': (200, 100, 100),  # Figure 4: epochs and anchors x k
    'itop/fig4_resnet34_cifar100_set_x5.yaml': (500, 250, 250),
    'itop/fig4_resnet34_cifar100_set_x10.yaml': (1000, 500, 500),
    'itop/fig4_resnet34_cifar100_set_x20.yaml': (2000, 1000, 1000),
    'itop/table4_resnet34_cifar100_*_itop.yaml': (100, 50, 50),  # Table 4 typical: 200 epochs
    'itop/table4_resnet34_cifar100_*_itop_extended.yaml': (2000, 1000, 1000),  # Table 4 extended: 4000 epochs
    'itop/table[15]_resnet18_cifar10_*.yaml': (125, 62, 63),  # Appendix F: 250 epochs, 10x at 125, 187
    # Appendix B / ImageNet/main.py: 5 warm-up epochs inside the first 30, then 10x at epochs 30, 60, 90
    'itop/table4_resnet50_imagenet_*.yaml': (30, 30, 30, 10),
    'fig7/*.yaml': (100, 50, 50),  # Table 4 typical, main.py's epochs / 2 and 3 * epochs / 4
    'dsr/wrn28_2_cifar10_*.yaml': (60, 60, 40, 40),  # DSR's script: MultiStepLR([60, 120, 160], gamma=0.2)
    'dsr/resnet50_imagenet_*.yaml': (30, 30, 30, 10),  # the standard ResNet-50 schedule, 10x at 30, 60, 90
}


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


def _cli_args(path: str) -> tuple[dict, argparse.ArgumentParser, argparse.Namespace]:
    """A recipe read as ``timm_dst.cli.config.parse_args`` reads ``-c``, without its checks of the data set.

    Args:
        path: The recipe, relative to the repository root.

    Returns:
        The recipe's flag values, the parser with them as defaults and the parsed namespace.
    """
    _, parser = create_parser()
    cfg = _config_defaults(parser, os.path.join(ROOT, path))
    parser.set_defaults(**cfg)
    return cfg, parser, parser.parse_args([])


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
    cfg, parser, args = _cli_args(path)
    assert cfg, path
    for key, value in _load(path).items():
        dest = parser._option_string_actions['--' + key.replace('_', '-')].dest  # aliases: sparse-init is distribution
        assert getattr(args, dest) is not None, (path, key, value)


def test_recipe_dst_keys_are_current_names():
    """Every DST key of every recipe is a declared controller option (timm_dst.core.options), the method (``dst``)
    or a method's own argument, spelled as its ``dest``: no alias such as the old ``sparse_init``."""
    from timm_dst import method_arguments
    from timm_dst.core.options import cli_options
    from timm_dst.integrations.timm import add_dst_args

    names = {o.dest for o in cli_options()} | {a.dest for a in method_arguments()} | {'dst', 'dst_kwargs'}
    dst_dests = {a.dest for a in add_dst_args(argparse.ArgumentParser())._group_actions}
    assert dst_dests == names
    _, parser = create_parser()
    bad = []
    for path in RECIPES:
        for key in _load(path):
            action = parser._option_string_actions.get('--' + key.replace('_', '-'))
            if action is not None and action.dest in dst_dests and key not in names:
                bad.append(f'{path}: {key} (use {action.dest})')
    assert not bad, bad


def test_paper_hyperparameters():
    """Spot checks against ITOP Tables 3-5 and DSR's official settings."""
    r = {os.path.splitext(os.path.basename(p))[0]: _load(p) for p in RECIPES}
    mlp = r['fig3_mlp_cifar10_set']
    assert (mlp['lr'], mlp['batch_size'], mlp['epochs'], mlp['weight_decay'], mlp['distribution']) == \
        (0.01, 128, 200, 5.0e-4, 'er')
    assert round(mlp['decay_epochs'] * 352) == 24000  # 10x every 24000 iterations, 352 steps per epoch
    vgg = r['fig3_vgg16_cifar10_set']
    assert (vgg['lr'], vgg['epochs'], vgg['update_interval'], vgg['distribution']) == (0.1, 250, 2000, 'erk')
    r34 = r['fig3_resnet34_cifar100_set']
    # timm's milestones are the paper's + 1 (recipes/README.md, "How timm counts milestones")
    assert (r34['weight_decay'], r34['decay_milestones'], r34['update_interval']) == (1.0e-4, [101, 151], 1000)
    assert r['fig4_resnet34_cifar100_set_x20']['epochs'] == 4000
    assert r['fig4_resnet34_cifar100_set_x20']['decay_milestones'] == [2001, 3001]
    assert r['fig5_mlp_cifar10_rigl']['update_interval'] == 4000
    i50 = r['table4_resnet50_imagenet_rigl_itop_s90']
    assert (i50['batch_size'], i50['update_interval'], i50['prune_rate'], i50['warmup_epochs'],
            i50['decay_milestones'], i50['dst']) == (64, 4000, 0.5, 5, [31, 61, 91], 'rigl-itop')
    assert r['table4_mlp_cifar10_set_itop']['batch_size'] == 32
    assert r['table5_resnet18_cifar10_set_plus']['grow_unexplored_first'] is True
    assert r['table1_resnet18_cifar10_set']['decay_milestones'] == [126, 188]
    wrn = r['wrn28_2_cifar10_dsr_s90']
    spe = 391  # 50000 / 128, last partial batch kept
    assert wrn['update_milestones'] == [[0, 100], [25 * spe, 200], [80 * spe, 400], [140 * spe, 800]]
    assert (wrn['dsr_np'], wrn['update_end']) == (20000, 190 * spe)
    d50 = r['resnet50_imagenet_dsr_s80']
    assert [iv for _, iv in d50['update_milestones']] == [1000, 2000, 4000, 8000] and d50['dsr_np'] == 400000


MULTISTEP = [p for p in RECIPES if _load(p).get('sched') == 'multistep']


def _epochs_per_step(path: str) -> tuple[tuple[int, ...], list[float]]:
    """The lr steps of a recipe, with timm's scheduler built and stepped as ``timm_dst.train`` does.

    Args:
        path: The recipe, relative to the repository root.

    Returns:
        The number of epochs of each step (a step ends where the lr drops, so warm-up epochs count in the first one)
        and the lr of the last epoch of each step.
    """
    import torch
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    _, _, args = _cli_args(path)
    optimizer = create_optimizer_v2(torch.nn.Linear(1, 1), **optimizer_kwargs(cfg=args), **(args.opt_kwargs or {}))
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=False),
                                                updates_per_epoch=1)
    lrs = []
    for epoch in range(num_epochs):  # one update per epoch: the per-update and per-epoch hooks of the training loop
        lrs.append(optimizer.param_groups[0]['lr'])
        scheduler.step_update(num_updates=epoch + 1)
        scheduler.step(epoch + 1, None)
    starts = [0] + [e for e in range(1, len(lrs)) if lrs[e] < lrs[e - 1] * (1 - 1e-9)] + [len(lrs)]
    return tuple(b - a for a, b in zip(starts, starts[1:])), [lrs[b - 1] for b in starts[1:]]


def _step_patterns(path: str) -> list[str]:
    """The STEP_EPOCHS globs that match a recipe (its path under recipes/)."""
    name = os.path.relpath(path, 'recipes').replace(os.sep, '/')
    return [g for g in STEP_EPOCHS if fnmatch.fnmatchcase(name, g)]


def test_multistep_recipes_in_table():
    """Every multistep recipe has exactly one entry of STEP_EPOCHS, and every entry a recipe."""
    assert len(MULTISTEP) >= 60
    for path in MULTISTEP:
        assert len(_step_patterns(path)) == 1, (path, _step_patterns(path))
    matched = {g for path in MULTISTEP for g in _step_patterns(path)}
    assert matched == set(STEP_EPOCHS), set(STEP_EPOCHS) - matched


@pytest.mark.parametrize('path', MULTISTEP)
def test_multistep_epochs_per_step(path):
    """timm applies milestone m from 0-based epoch m - 1, so a recipe writes the paper's milestones + 1: the epochs
    trained at each lr are the paper's (recipes/README.md, "How timm counts milestones")."""
    cfg = _load(path)
    counts, step_lrs = _epochs_per_step(path)
    assert counts == STEP_EPOCHS[_step_patterns(path)[0]], (path, cfg['decay_milestones'])
    for k, lr in enumerate(step_lrs):
        assert lr == pytest.approx(cfg['lr'] * cfg['decay_rate'] ** k), (path, k)


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
    return (c.get('model'), c.get('dataset'), c.get('dst'), c.get('distribution'), bool(c.get('grow_unexplored_first')),
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
