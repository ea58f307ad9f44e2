"""Distributions, prune-rate schedules and structures are registries (issue #26): a third party adds one with one file
and a registration, or through an entry point, and the library, the CLI's flag group and its validation see it."""
from __future__ import annotations

import argparse
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_plugins import write_dist_info

import timm_dst
from timm_dst.core import distributions, schedules, structure
from timm_dst.core.distributions import DISTRIBUTIONS, layer_counts
from timm_dst.core.schedules import PRUNE_RATE_SCHEDULES, prune_rate_at, schedule_decays
from timm_dst.core.structure import Layout, Structure, parse_structure, structure_forms
from timm_dst.integrations.timm import add_dst_args, sparsifier_kwargs, validate_dst_args


# ---------------------------------------------------------------------------------------------------------------------
# what a third party writes: one file (here, this module's top) plus the registrations of the tests
def inverse_rows(shape) -> float:
    """Density proportional to 1 / (output rows): narrow layers denser."""
    return 1.0 / shape[0]


def halfway(frac: float, initial: float, minimum: float) -> float:
    """P for the first half of the span, then prune_rate_min."""
    return initial if frac < 0.5 else minimum


@dataclasses.dataclass(frozen=True)
class Rows(Structure):
    """Whole output rows (neurons / channels) active or inactive: a 1 x (row length) block per tensor, through the
    block machinery."""

    kind: str = 'block'
    rows: int = 1

    @property
    def spec(self) -> str:
        return 'rows'

    def misfit(self, shape) -> str | None:
        return f'{len(shape)}-D' if len(shape) < 2 else None

    def layout(self, shape) -> Layout | None:
        if self.misfit(shape) is not None:
            return None
        return Layout(dataclasses.replace(self, cols=math.prod(shape[1:])), tuple(int(s) for s in shape))


def parse_rows(text: str) -> Structure | None:
    return Rows() if text in ('rows', 'neurons') else None


def register_all(prefix: str = '') -> None:
    timm_dst.register_distribution(f'{prefix}inverse-rows', inverse_rows, description='1 / rows')
    timm_dst.register_prune_rate_schedule(f'{prefix}halfway', halfway, description='P, then the minimum')
    timm_dst.register_structure(f'{prefix}rows', parse_rows, form="'rows' (whole output rows)")


@pytest.fixture
def fresh_registries(monkeypatch):
    """The built-in registries, plugins not loaded yet; restored afterwards."""
    for module in (distributions, schedules, structure):
        reg = module._registry
        monkeypatch.setattr(reg, '_entries', dict(reg._entries))
        monkeypatch.setattr(reg, '_plugins_loaded', False)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def _train(sp, model, opt, steps: int) -> list[tuple[int, list[int], float]]:
    """Train ``steps`` steps; after each, (step, per-tensor active counts, prune rate)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append((sp.step, [int(t.mask.sum()) for t in sp.targets], sp.prune_rate))
    return out


def _check_trained(name: str) -> None:
    """Train with the distribution, schedule and structure registered as ``<name>`` prefixes: exact counts, whole rows,
    the schedule's rates."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shapes = [tuple(m.weight.shape) for m in model if isinstance(m, nn.Linear)]
    # unstructured: the registered distribution's counts, exactly
    sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.7, distribution=f'{name}inverse-rows',
                                    update_interval=2, total_steps=8)
    expected = layer_counts(shapes, 0.7, f'{name}inverse-rows')
    assert expected != layer_counts(shapes, 0.7, 'erk') and expected != layer_counts(shapes, 0.7, 'uniform')
    assert sum(expected) == round(0.3 * sum(math.prod(s) for s in shapes))
    assert sp.counts == expected and [int(t.mask.sum()) for t in sp.targets] == expected
    sp.remove()
    # structured: whole rows, the decaying schedule
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.7, distribution=f'{name}inverse-rows',
                                    prune_rate_schedule=f'{name}halfway', prune_rate=0.5, prune_rate_min=0.2,
                                    structure='rows', update_interval=2, total_steps=8, seed=3)
    assert isinstance(sp.structure, Rows) and [r['structure'] for r in sp.summary()] == ['rows'] * 3
    budgets = list(sp.counts)
    assert all(c % s[1] == 0 for c, s in zip(budgets, shapes))  # whole rows
    assert sum(budgets) == pytest.approx(0.3 * sum(math.prod(s) for s in shapes), abs=max(s[1] for s in shapes))
    before = [t.mask.clone() for t in sp.targets]
    history = _train(sp, model, opt, 8)
    for step, counts, rate in history:
        assert counts == budgets, step  # exact: each tensor at its budget after every update
        assert rate == (0.5 if step < 4 else 0.2), step
    for t in sp.targets:
        rows = t.mask.sum(dim=1)
        assert bool(((rows == 0) | (rows == t.mask.shape[1])).all()), t.name
    assert any(not torch.equal(b, t.mask) for b, t in zip(before, sp.targets))  # it explored
    state = sp.state_dict()
    assert state['config']['structure'] == 'rows' and state['config']['distribution'] == f'{name}inverse-rows'


def _check_flags(name: str) -> None:
    """The DST flag group offers the registered names; validation and the kwargs accept them."""
    parser = argparse.ArgumentParser()
    group = add_dst_args(parser)
    actions = {a.dest: a for a in group._group_actions}
    assert f'{name}inverse-rows' in actions['distribution'].choices
    assert f'{name}halfway' in actions['prune_rate_schedule'].choices
    assert "'rows' (whole output rows)" in actions['structure'].help
    args = parser.parse_args(['--dst', 'set', '--sparse-init', f'{name}INVERSE-ROWS', '--prune-rate-schedule',
                              f'{name}halfway', '--structure', 'rows'])
    validate_dst_args(args, pytest.fail)
    kw = sparsifier_kwargs(args)
    assert (kw['distribution'], kw['prune_rate_schedule'], kw['structure']) == (
        f'{name}inverse-rows', f'{name}halfway', 'rows')


def test_register_from_outside_and_train(fresh_registries):
    assert 'inverse-rows' not in DISTRIBUTIONS and 'halfway' not in PRUNE_RATE_SCHEDULES
    register_all()
    # the live views the controller checks against see the new names
    assert DISTRIBUTIONS[-1] == 'inverse-rows' and 'inverse-rows' in DISTRIBUTIONS
    assert 'halfway' in PRUNE_RATE_SCHEDULES and schedule_decays('halfway') and not schedule_decays('constant')
    assert prune_rate_at(1, 0.5, 10, 'halfway', 0.1) == 0.5 and prune_rate_at(6, 0.5, 10, 'halfway', 0.1) == 0.1
    assert parse_structure(' Neurons ') == Rows() and "'rows' (whole output rows)" in structure_forms()
    _check_trained('')
    _check_flags('')


def test_registration_checks_its_input(fresh_registries):
    register_all()
    for register, args, needle in [
        (timm_dst.register_distribution, ('erk', inverse_rows), "'erk' is already registered"),
        (timm_dst.register_distribution, ('Bad Name', inverse_rows), 'lower-case'),
        (timm_dst.register_distribution, ('x', 3.0), 'not callable'),
        (timm_dst.register_prune_rate_schedule, ('halfway', halfway), 'already registered'),
        (timm_dst.register_structure, ('rows', parse_rows), 'already registered'),
    ]:
        with pytest.raises(ValueError, match=needle):
            register(*args, **({'form': 'x'} if register is timm_dst.register_structure else {}))
    with pytest.raises(ValueError, match=r"distribution='nope' is not known; accepted: erk, er, uniform, inverse-rows"):
        layer_counts([(4, 4)], 0.5, 'nope')
    with pytest.raises(ValueError, match=r"prune_rate_schedule='nope' is not known; accepted: cosine, constant, "
                                         r'linear, halfway'):
        prune_rate_at(0, 0.5, 10, 'nope')
    with pytest.raises(ValueError, match=r"structure='cols' is not accepted; accepted: .*'rows' \(whole output rows\)"):
        parse_structure('cols')


# ---------------------------------------------------------------------------------------------------------------------
# entry points
PLUGIN_MODULE = '''
import sys

sys.path.insert(0, {tests!r})
import test_registries


def register():
    test_registries.register_all('ep-')


def broken():
    raise RuntimeError('boom')
'''


def test_entry_points(tmp_path, monkeypatch, fresh_registries):
    import os
    (tmp_path / 'tdst_registry_plugin.py').write_text(PLUGIN_MODULE.format(tests=os.path.dirname(__file__)))
    write_dist_info(tmp_path, 'tdst-registry-plugin', '1.0', {
        'timm_dst.distributions': {'mine': 'tdst_registry_plugin:register'},
        'timm_dst.prune_rate_schedules': {'broken': 'tdst_registry_plugin:broken'},
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert 'ep-inverse-rows' in DISTRIBUTIONS  # the first look-up loads the group
        names = tuple(PRUNE_RATE_SCHEDULES)
        tuple(PRUNE_RATE_SCHEDULES)  # loaded once
    msgs = [str(w.message) for w in caught if 'plugin' in str(w.message)]
    assert len(msgs) == 1 and "prune_rate_schedule plugin 'broken'" in msgs[0] and 'boom' in msgs[0], msgs
    assert 'ep-halfway' in names and names[:3] == ('cosine', 'constant', 'linear')
    _check_trained('ep-')
    _check_flags('ep-')
