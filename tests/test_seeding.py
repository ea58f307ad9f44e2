"""Random masks are independent of the weights they mask (issue #24).

A user seeds torch's global generator, builds the model, then attaches a sparsifier, often with the same seed. If the
sparsifier's generator replayed torch's stream, the "random" initial mask would keep exactly the largest initial
weights of the first layer drawn (all positive for ``nn.Linear``'s uniform init). These tests check, for every method
and structure, on the library, the CLI and timm's own train.py through the launcher, that the active weights right
after attaching are a plausible random sample of the tensor's initialisation: the z-score of their mean and of their
share of positive values stay within a few units.
"""
from __future__ import annotations

import os

import pytest
import timm
import torch
from conftest import run_cli

import timm_dst
from timm_dst.core._seeding import derive_seed, derived_generator

Z_MAX = 5.0  # a true random sample exceeds 5 sigma with probability ~6e-7 per statistic
MIN_ACTIVE = 20  # fewer active weights say nothing either way

METHODS = [n for n in timm_dst.list_methods() if timm_dst.get_method_info(n).cls.__module__.startswith('timm_dst.')]

# name, create_model kwargs, input shape: the three kinds of first layer that replayed the init stream or did not
MODELS = {
    'mlp': ('itop_mlp', dict(in_chans=1, img_size=16, hidden=(256, 128)), (4, 1, 16, 16)),
    'vit': ('vit_tiny_patch16_224', dict(img_size=32), (4, 3, 32, 32)),
    'cnn': ('resnet10t', dict(), (4, 3, 32, 32)),
}


def bias_z(init: torch.Tensor, mask: torch.Tensor, center: float | None = None) -> tuple[float, float, int]:
    """z-scores of the mean and of the share of positive values of ``init[mask]`` as a sample of ``init``.

    Args:
        init: The tensor's values before the mask was chosen (or values that are still nearly those).
        mask: The bool mask.
        center: The population mean and median to test against; None = those of ``init`` itself.

    Returns:
        ``(z_mean, z_sign, k)``: both z-scores use the finite-population correction when ``init`` is the whole
        population (``center`` None); ``k`` is the number of active weights.
    """
    init, mask = init.detach().double().flatten(), mask.detach().flatten().bool()
    active, k, n = init[mask], int(mask.sum()), init.numel()
    if center is None:
        fpc = 1.0 - k / n if n else 0.0
        mu, p0 = float(init.mean()), float((init > 0).double().mean())
    else:
        fpc, mu, p0 = 1.0, center, 0.5
        active = active[active != 0]  # grown (zero) weights carry no sign
        k = active.numel()
    if k < MIN_ACTIVE or fpc <= 0:  # (fpc is 0 for a dense tensor: nothing was chosen)
        return 0.0, 0.0, k
    var = float(active.var()) if k > 1 else 0.0
    z_mean = (float(active.mean()) - mu) / max((var / k * fpc) ** 0.5, 1e-30)
    p = float((active > 0).double().mean())
    z_sign = (p - p0) / max((p0 * (1 - p0) / k * fpc) ** 0.5, 1e-30)
    return z_mean, z_sign, k


def assert_unbiased(rows: list[tuple[str, float, float, int]]) -> None:
    checked = [r for r in rows if r[3] >= MIN_ACTIVE]
    assert checked, 'no sparse tensor had enough active weights to test'
    bad = [r for r in checked if abs(r[1]) > Z_MAX or abs(r[2]) > Z_MAX]
    assert not bad, 'active weights biased (name, z of mean, z of sign, active): ' + '; '.join(
        f'{n} {zm:+.1f} {zs:+.1f} {k}' for n, zm, zs, k in bad)


def _build(kind: str, torch_seed: int):
    name, kwargs, shape = MODELS[kind]
    torch.manual_seed(torch_seed)  # as train.py does: the user's seed, then the model
    model = timm.create_model(name, num_classes=10, **kwargs)
    g = derived_generator(torch_seed, 'test-batch')
    return model, torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)


def _attach(kind: str, method: str, torch_seed: int, seed: int | None, **extra) -> list[tuple[str, float, float, int]]:
    model, x, y = _build(kind, torch_seed)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kwargs = {'dsr': dict(dsr_np=2000), 'gmp': dict(update_end=10),
              'snip': dict(snip_batches=(x, y)), 'snip-set-itop': dict(snip_batches=(x, y)),
              'lth': dict(lth_trained_state=model.state_dict()),
              'lth-set-itop': dict(lth_trained_state=model.state_dict())}.get(method, {})
    if seed is not None:
        kwargs['seed'] = seed
    sp = timm_dst.create_sparsifier(model, opt, method=method, sparsity=0.9, update_interval=1000, total_steps=4000,
                                    **kwargs, **extra)
    return [(t.name, *bias_z(init[t.name], t.mask)) for t in sp.targets]


# --------------------------------------------------------------------------------------------------------------------
def test_derived_seeds_are_deterministic_and_apart():
    assert derive_seed(0, 'sparsifier', 0) == derive_seed(0, 'sparsifier', 0)
    seeds = {derive_seed(s, key, i) for s in range(50) for key in ('sparsifier', 'split') for i in range(3)}
    assert len(seeds) == 300 and not seeds & set(range(1000))
    assert all(0 <= s < 2 ** 63 for s in seeds)
    # the derived stream shares no prefix with torch's global stream seeded by the same integer
    torch.manual_seed(7)
    assert not torch.equal(torch.rand(64), torch.rand(64, generator=derived_generator(7, 'sparsifier', 0)))


# SNIP keeps the largest |w * dL/dw| of a batch: a function of the weights and the data by design (in a ReLU network
# the gradient's sign follows the weight's), so its mask is no random sample; none of our random draws enters it
SCORED = ('snip', 'snip-set-itop')


@pytest.mark.parametrize('method', [m for m in METHODS if m not in ('dense', *SCORED)])
def test_every_method_masks_the_mlp_without_bias(method: str):
    """The user's seed equals the sparsifier's (the CLI's and the launcher's default): the first layer's active
    weights were all positive before the fix."""
    assert_unbiased(_attach('mlp', method, torch_seed=0, seed=0))


@pytest.mark.parametrize('method', SCORED)
def test_scored_masks_take_nothing_from_our_generator(method: str):
    """SNIP's initial mask is the same whatever the sparsifier's seed: no stream of ours can bias it."""
    def masks(seed):
        model, x, y = _build('mlp', 0)
        sp = timm_dst.create_sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), method=method,
                                        sparsity=0.9, total_steps=100, seed=seed, snip_batches=(x, y))
        return [t.mask.clone() for t in sp.targets]
    assert all(torch.equal(a, b) for a, b in zip(masks(0), masks(12345)))


@pytest.mark.parametrize('structure', ['2:4', '1:8', 'fan-in', '4x4'])
@pytest.mark.parametrize('method', ['static', 'set', 'rigl', 'dsr'])
def test_every_structure_masks_without_bias(method: str, structure: str):
    extra = {'dsr_np': 2000} if method == 'dsr' else {}
    sparsity = 0.5 if structure == '2:4' else 0.875 if structure == '1:8' else 0.9
    model, _, _ = _build('mlp', 3)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    sp = timm_dst.create_sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), method=method,
                                    sparsity=sparsity, structure=structure, update_interval=1000, total_steps=4000,
                                    seed=3, **extra)
    assert any(s['structure'] for s in sp.summary()), 'the structure was applied to no tensor'
    assert_unbiased([(t.name, *bias_z(init[t.name], t.mask)) for t in sp.targets])


@pytest.mark.parametrize('kind,torch_seed', [('mlp', 0), ('vit', 42), ('cnn', 42)])
def test_library_same_seed_and_default_seed(kind: str, torch_seed: int):
    """``torch.manual_seed(s)``, build, ``create_sparsifier(seed=s)``; and with no ``seed=`` after seeding torch with
    0 (the default seed): a ViT's patch-embedding conv kept only positive weights before the fix."""
    assert_unbiased(_attach(kind, 'set-itop', torch_seed=torch_seed, seed=torch_seed))
    assert_unbiased(_attach(kind, 'set-itop', torch_seed=0, seed=None))


def test_random_growth_is_independent_of_the_init():
    """SET's growth: the positions grown at the first update are a random sample of the inactive positions (the init
    values there have no bias either)."""
    model, x, y = _build('mlp', 0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.9, update_interval=1, total_steps=100,
                                    update_end=100, seed=0)
    before = [t.mask.clone() for t in sp.targets]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    rows = []
    for t, b in zip(sp.targets, before):
        grown = t.mask & ~b
        rows.append((t.name, *bias_z(init[t.name][~b], grown[~b])))
    assert sum(r[3] for r in rows) > 100, 'nothing grew'
    assert_unbiased(rows)


def test_same_seed_same_masks_other_seed_other_masks():
    def masks(seed):
        model, _, _ = _build('mlp', 0)
        sp = timm_dst.create_sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), method='set',
                                        sparsity=0.9, total_steps=100, seed=seed)
        return [t.mask.clone() for t in sp.targets]
    a, b, c = masks(5), masks(5), masks(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# --------------------------------------------------------------------------------------------------------------------
# the CLI: timm-dst-train sets the seed, builds the model and attaches with --dst-seed defaulting to --seed
CLI = ['--dataset', 'synthetic', '--input-size', '1', '16', '16', '--num-classes', '4', '--synthetic-train-size', '64',
       '--synthetic-test-size', '32', '--val-fraction', '0', '-b', '32', '--lr', '1e-12', '--weight-decay', '0',
       '--sparsity', '0.9', '--update-interval', '1000', '--epochs', '1', '--no-progress', '--seed', '0']


def _cli_masks(out: str) -> list[tuple[str, float, float, int]]:
    from timm_dst.integrations.timm.checkpoint import LAST
    ckpt = torch.load(os.path.join(out, LAST), map_location='cpu', weights_only=False)
    masks = ckpt['timm_dst']['sparsifier']['masks']
    state = ckpt['state_dict']
    return [(name, *bias_z(state[name], mask, center=0.0)) for name, mask in masks.items()]


@pytest.mark.usefixtures('fresh_accelerate_state')
@pytest.mark.parametrize('model,extra', [
    ('itop_mlp', ['--model-kwargs', 'hidden=[256,128]', '--dst', 'static']),
    ('vit_tiny_patch16_224', ['--model-kwargs', 'img_size=16', 'patch_size=4', '--dst', 'set-itop']),
])
def test_cli_masks_without_bias(tmp_path, model: str, extra: list[str]):
    run_cli(CLI + ['--model', model, *extra], tmp_path)
    assert_unbiased(_cli_masks(str(tmp_path)))
