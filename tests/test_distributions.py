"""ER / ERK / uniform densities: exact totals, the above-1 correction, schedules, and bad input."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny

import timm_dst
from timm_dst.core.distributions import layer_counts, round_exact
from timm_dst.core.schedules import UpdateSchedule, prune_rate_at

SHAPES = [(64, 3, 3, 3), (128, 64, 3, 3), (256, 128, 1, 1), (10, 256), (512, 512)]


@pytest.mark.parametrize('distribution', ['erk', 'er', 'uniform'])
@pytest.mark.parametrize('sparsity', [0.0, 0.5, 0.9, 0.98, 0.999])
def test_exact_total(distribution: str, sparsity: float):
    counts = layer_counts(SHAPES, sparsity, distribution)
    numels = [math.prod(s) for s in SHAPES]
    assert sum(counts) == round((1 - sparsity) * sum(numels))
    assert all(0 <= c <= n for c, n in zip(counts, numels))


def test_erk_above_one_correction():
    # at 50% the small first conv and the classifier would get ERK density > 1: they become dense, the rest re-solved
    counts = layer_counts(SHAPES, 0.5, 'erk')
    numels = [math.prod(s) for s in SHAPES]
    dens = [c / n for c, n in zip(counts, numels)]
    raw = [sum(s) / math.prod(s) for s in SHAPES]
    dense = [i for i, d in enumerate(dens) if d == 1.0]
    sparse = [i for i, d in enumerate(dens) if d < 1.0]
    assert 0 in dense and 3 in dense and len(sparse) >= 2
    assert min(raw[i] for i in dense) > max(raw[i] for i in sparse)  # the largest raw scores went dense
    # the others keep the ERK proportions (up to integer rounding)
    eps = [dens[i] / raw[i] for i in sparse]
    assert all(e == pytest.approx(eps[0], rel=1e-3) for e in eps)


def test_er_uses_fan_in_fan_out():
    shapes = [(100, 400), (400, 400)]
    counts = layer_counts(shapes, 0.9, 'er')
    d = [c / math.prod(s) for c, s in zip(counts, shapes)]
    assert d[0] / d[1] == pytest.approx((500 / 40000) / (800 / 160000), rel=1e-3)


def test_uniform_equal_densities():
    counts = layer_counts(SHAPES, 0.8, 'uniform')
    for c, s in zip(counts, SHAPES):
        assert abs(c - 0.2 * math.prod(s)) <= 1


def test_round_exact_respects_capacity():
    assert round_exact([5.0, 5.0, 0.0], 7, [2, 10, 10]) == [2, 5, 0]
    assert sum(round_exact([0.3, 0.3, 0.4], 10, [10, 10, 10])) == 10
    with pytest.raises(ValueError):
        round_exact([1.0], 5, [4])


def test_prune_rate_schedules():
    assert prune_rate_at(0, 0.5, 100, 'cosine') == pytest.approx(0.5)
    assert prune_rate_at(50, 0.5, 100, 'cosine') == pytest.approx(0.25)
    assert prune_rate_at(100, 0.5, 100, 'cosine') == pytest.approx(0.0)
    assert prune_rate_at(50, 0.5, 100, 'linear') == pytest.approx(0.25)
    assert prune_rate_at(80, 0.5, 100, 'constant') == 0.5


@pytest.mark.parametrize('kwargs,expected', [
    (dict(interval=5), [5, 10, 15, 20, 25, 30, 35, 40]),  # start 0: step 0 is never taken, the first is at ΔT
    (dict(interval=5, start=10), [10, 15, 20, 25, 30, 35, 40]),  # the first update at the start step
    (dict(interval=5, start=3, end=13), [3, 8, 13]),  # start and end both included
    (dict(interval=5, start=3, end=12), [3, 8]),
    (dict(interval=1, start=38), [38, 39, 40]),
    (dict(interval=5, milestones=[(0, 5), (20, 10)]), [5, 10, 15, 20, 30, 40]),  # a milestone's step included
    (dict(interval=2, end=20, milestones=[(10, 4)]), [2, 4, 6, 8, 10, 14, 18]),  # DSR-style, frozen after 20
    (dict(interval=4, start=6, milestones=[(2, 3)]), [6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39]),  # from start
    (dict(interval=3, end=10, update_at_end=True), [3, 6, 9, 10]),  # GMP: one more at the end, off the grid
])
def test_update_schedule_table(kwargs, expected):
    """Topology-update steps (1-based optimizer steps) over 40 steps, as the flags' help says."""
    sched = UpdateSchedule(**kwargs)
    assert [s for s in range(1, 41) if sched.is_update_step(s)] == expected


def _sp(**kwargs):
    model, _, _ = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return timm_dst.create_sparsifier(model, opt, **kwargs)


@pytest.mark.parametrize('kwargs, arg', [
    (dict(method='nope'), 'method'),
    (dict(method='set', distribution='gaussian', total_steps=10), 'distribution'),
    (dict(method='set', sparsity=1.0, total_steps=10), 'sparsity'),
    (dict(method='set', sparsity=-0.1, total_steps=10), 'sparsity'),
    (dict(method='set', mask_init='zeros', total_steps=10), 'mask_init'),
    (dict(method='set', prune_rate_schedule='step', total_steps=10), 'prune_rate_schedule'),
    (dict(method='set', update_interval=0, total_steps=10), 'update_interval'),
    (dict(method='set', update_end=0.5), 'total_steps'),
    (dict(method='set', frobnicate=3, total_steps=10), 'frobnicate'),
    (dict(method='set', include=['nothing.*'], total_steps=10), 'nothing to sparsify'),
])
def test_bad_input_names_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg) as err:
        _sp(**kwargs)
    if arg in ('method', 'distribution'):
        assert 'accepted' in str(err.value)


def test_model_with_nothing_to_sparsify():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match='model: nothing to sparsify'):
        timm_dst.create_sparsifier(model, opt, method='static', sparsity=0.5)


def test_load_state_dict_from_another_configuration():
    state = _sp(method='set', sparsity=0.9, total_steps=10).state_dict()
    with pytest.raises(ValueError, match='sparsity'):
        _sp(method='set', sparsity=0.8, total_steps=10).load_state_dict(state)
    with pytest.raises(ValueError, match='method'):
        _sp(method='rigl', sparsity=0.9, total_steps=10).load_state_dict(state)
    with pytest.raises(ValueError, match='targets'):
        _sp(method='set', sparsity=0.9, total_steps=10, exclude=['head*']).load_state_dict(state)
    with pytest.raises(ValueError, match='state'):
        _sp(method='set', sparsity=0.9, total_steps=10).load_state_dict({'foo': 1})


def test_include_exclude_and_dense_layers():
    model, _, _ = make_tiny('vit')
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, method='static', sparsity=0.5, exclude=['*.attn.*'],
                                    dense_first_layer=True, dense_classifier=True)
    names = [t.name for t in sp.targets]
    assert not any('.attn.' in n for n in names)
    assert 'patch_embed.proj.weight' not in names and 'head.weight' not in names
    assert any('mlp.fc1' in n for n in names)
