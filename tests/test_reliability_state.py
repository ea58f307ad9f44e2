"""Loaded state is checked against its own configuration and the model (issue 25, items 1 and 4).

Every state that can be loaded - ``Sparsifier.load_state_dict``, a ``timm-dst-train --resume`` checkpoint, a
``timm_dst.run`` checkpoint - is refused in one line when it contradicts itself (mask shapes and dtype, counts
against the budgets of its sparsity, explored masks, step, generator states, history, captured gradients, method
state) or holds sparse weights that are not finite, and a refused state leaves the model, the optimizer and the
sparsifier exactly as they were. Non-finite gradients that persist stop training after ``max_nonfinite_steps``
checked steps; masked weights stay zero meanwhile. Each test fails on commit 160a5b8.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_dst
from timm_dst.core.controller import NonFiniteGradientError
from timm_dst.integrations.timm import (
    DST_KEY,
    create_sparsifier_from_args,
    pack_checkpoint,
    read_checkpoint,
    read_dst_state,
)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 12))


def _batch(seed: int = 1, n: int = 16, bad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 64, generator=g), torch.randint(0, 12, (n,), generator=g)
    if bad:
        x[0, 0] = math.inf  # every gradient of the first layer becomes NaN
    return x, y


def _step(model, opt, bad: bool = False) -> None:
    x, y = _batch(bad=bad)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _build(method: str = 'set', seed: int = 0, **kw):
    model = _mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = {'sparsity': 0.8, 'update_interval': 2, 'total_steps': 40, 'sparse_kernel_density': 0, 'seed': 3, **kw}
    return model, opt, timm_dst.create_sparsifier(model, opt, method, **kw)


def _trained_state(method: str = 'set', steps: int = 5, **kw) -> dict:
    model, opt, sp = _build(method, **kw)
    for _ in range(steps):
        _step(model, opt)
    return copy.deepcopy(sp.state_dict())


def _same(a, b) -> bool:
    """Equal nested states (tensors bit-identical, NaN equal to NaN)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and torch.equal(torch.nan_to_num(a.float(), nan=7.5), torch.nan_to_num(b.float(), nan=7.5))
                and torch.equal(a.isnan(), b.isnan()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _everything(model, opt, sp) -> dict:
    return copy.deepcopy({'model': model.state_dict(), 'opt': opt.state_dict(), 'sp': sp.state_dict(),
                          'counts': list(sp.counts), 'explored': list(sp.explored_counts),
                          'weights': [t.param.detach().clone() for t in sp.targets]})


def _refused(model, opt, sp, state, needle: str) -> str:
    """``sp.load_state_dict(state)`` raises a one-line ValueError containing ``needle`` and changes nothing."""
    before = _everything(model, opt, sp)
    with pytest.raises(ValueError) as e:
        sp.load_state_dict(state)
    msg = str(e.value)
    assert needle in msg and '\n' not in msg, msg
    assert _same(before, _everything(model, opt, sp)), 'a refused state changed the model, optimizer or sparsifier'
    return msg


def _move_one(state: dict, src: str, dst: str) -> None:
    """Move one active position from tensor ``src`` to ``dst`` (counts and explored kept consistent)."""
    masks, explored = state['masks'], state['explored']
    masks[src].view(-1)[masks[src].view(-1).nonzero()[0]] = False
    free = (~masks[dst]).view(-1).nonzero()[0]
    masks[dst].view(-1)[free] = True
    explored[dst].view(-1)[free] = True
    state['counts'] = [int(m.sum()) for m in masks.values()]


# --------------------------------------------------------------------------------------------------------------------
# item 1: Sparsifier.load_state_dict checks the state against its own configuration
def _all_ones(s):
    s['masks'] = {k: torch.ones_like(v) for k, v in s['masks'].items()}
    s['explored'] = {k: torch.ones_like(v) for k, v in s['masks'].items()}
    s['counts'] = [v.numel() for v in s['masks'].values()]


def _first_row(s):
    s['masks'] = {k: v[:1].clone() for k, v in s['masks'].items()}


def _nan_dense_grads(s):
    s['dense_grads'] = [torch.full(m.shape, math.nan) for m in s['masks'].values()]
    s['dense_grads_held'] = [True] * len(s['masks'])


_DAMAGED = {
    # the three cases
    'all-ones masks (dense under sparsity 0.8)': (_all_ones, 'its budget is'),
    'masks cut to their first row': (_first_row, 'has shape (1, 64); expected (48, 64)'),
    'step -5': (lambda s: s.update(step=-5), 'step -5 is not accepted'),
    # the same class
    'step 2.5': (lambda s: s.update(step=2.5), 'step 2.5 is not accepted'),
    'uint8 masks': (lambda s: s.update(masks={k: v.to(torch.uint8) for k, v in s['masks'].items()}),
                    'dtype torch.uint8; expected torch.bool'),
    'a tensor missing': (lambda s: s['masks'].pop('3.weight'), 'masks lacks 3.weight'),
    'counts not those of the masks': (lambda s: s['counts'].__setitem__(0, s['counts'][0] + 1),
                                      'do not match its masks'),
    'budget moved between tensors (SET keeps each)': (lambda s: _move_one(s, '1.weight', '3.weight'),
                                                      '1.weight holds 473 active weights, its budget is 474'),
    'explored misses active positions': (lambda s: s.update(explored={k: torch.zeros_like(v)
                                                                      for k, v in s['explored'].items()}),
                                         'explored 1.weight lacks'),
    'generator state of the wrong size': (lambda s: s.update(generators={'cpu': torch.zeros(10, dtype=torch.uint8)}),
                                          "generators 'cpu': not a valid generator state"),
    'history past the step': (lambda s: s['history'].append({'step': 999, 'prune_rate': 0.5, 'density': 0.2,
                                                             'itop_rate': 0.3}), 'history entry'),
    'history density above R_s': (lambda s: s['history'][0].update(density=0.9), 'history entry 0'),
    'non-finite captured gradients': (_nan_dense_grads, 'dense_grads 1.weight holds'),
    'update_pending not a bool': (lambda s: s.update(update_pending='yes'), 'update_pending'),
    'a newer state version': (lambda s: s.update(version=99), 'version 99'),
    'budget_total off': (lambda s: s.update(budget_total=s['budget_total'] + 5), 'budget_total'),
}


@pytest.mark.parametrize('case', list(_DAMAGED))
def test_inconsistent_state_is_refused_and_changes_nothing(case):
    mutate, needle = _DAMAGED[case]
    state = _trained_state()
    mutate(state)
    model, opt, sp = _build(seed=5)
    _step(model, opt)
    msg = _refused(model, opt, sp, state, needle)
    assert msg.startswith('state: '), msg
    sp.load_state_dict(_trained_state())  # a good state still loads afterwards
    assert sp.step == 5


def test_all_ones_masks_no_longer_train_dense():
    """The issue's run: all-ones masks under sparsity 0.9 trained dense and reported density 1.0."""
    state = _trained_state(sparsity=0.9)
    _all_ones(state)
    model, opt, sp = _build(sparsity=0.9)
    msg = _refused(model, opt, sp, state, 'its budget is')
    assert 'sparsity 0.9' in msg and "method 'set'" in msg
    assert sp.density == pytest.approx(0.1, abs=0.01)


def test_budget_moving_methods_keep_the_total_exact():
    """DSR moves budget between tensors: such a state loads; one weight more in total does not."""
    model, opt, sp = _build('dsr', dsr_np=40, update_interval=1, prune_rate_schedule='constant')
    budgets = list(sp.counts)
    for _ in range(6):
        _step(model, opt)
    assert sp.counts != budgets and sum(sp.counts) == sum(budgets)  # moved, total kept
    state = copy.deepcopy(sp.state_dict())
    model2, opt2, sp2 = _build('dsr', dsr_np=40, update_interval=1, prune_rate_schedule='constant')
    sp2.load_state_dict(copy.deepcopy(state))
    assert sp2.counts == sp.counts
    masks, explored = state['masks'], state['explored']
    free = (~masks['1.weight']).view(-1).nonzero()[0]
    masks['1.weight'].view(-1)[free] = True
    explored['1.weight'].view(-1)[free] = True
    state['counts'][0] += 1
    model3, opt3, sp3 = _build('dsr', dsr_np=40, update_interval=1, prune_rate_schedule='constant')
    _refused(model3, opt3, sp3, state, f'hold {sum(budgets) + 1} active weights in all, the budget is {sum(budgets)}')


def test_snfs_momentum_is_checked():
    state = _trained_state('snfs')
    state['method']['momentum'][0][0, 0] = math.nan
    model, opt, sp = _build('snfs')
    _refused(model, opt, sp, state, "method 'snfs' holds non-finite values")
    state = _trained_state('snfs')
    state['method']['momentum'] = state['method']['momentum'][:1]
    _refused(model, opt, sp, state, 'snfs: momentum')


def test_gmp_counts_follow_its_schedule():
    """GMP shrinks from dense to the budgets of its sparsity: a mid-schedule state loads, one below its end does
    not."""
    kw = dict(update_start=0, update_end=10)
    state = _trained_state('gmp', steps=4, **kw)
    model, opt, sp = _build('gmp', **kw)
    sp.load_state_dict(copy.deepcopy(state))
    assert sp.density < 1.0
    final = state['method']['final_counts']
    masks = state['masks']
    active = masks['5.weight'].view(-1).nonzero().squeeze(1)
    masks['5.weight'].view(-1)[active[final[2] - 1:]] = False  # one below the end point
    state['counts'][2] = final[2] - 1
    _refused(model, opt, sp, state, f'5.weight holds {final[2] - 1} active weights, outside its pruning schedule')


def test_structure_of_loaded_masks_is_checked():
    kw = dict(structure='4x4')
    state = _trained_state(**kw)
    mask = state['masks']['1.weight']
    row, col = mask.nonzero()[0].tolist()
    mask[row, col] = False  # one weight of a block off, one of an inactive block on: same count
    off = (~mask).nonzero()
    r, c = next((r, c) for r, c in off.tolist() if (r // 4, c // 4) != (row // 4, col // 4))
    mask[r, c] = True
    state['explored']['1.weight'][r, c] = True
    model, opt, sp = _build(**kw)
    _refused(model, opt, sp, state, 'breaks structure')


# --------------------------------------------------------------------------------------------------------------------
# item 4: non-finite weights, optimizer state and gradients
def test_nonfinite_sparse_weights_are_refused_at_load():
    state = _trained_state()
    model, opt, sp = _build()
    with torch.no_grad():
        t = sp.targets[0]
        t.param.view(-1)[(~t.mask).view(-1).nonzero()[0]] = math.nan  # NaN * 0 would stay NaN
    _refused(model, opt, sp, state, 'model: the sparse weights are not finite (1.weight: 1 value(s))')


def test_nan_optimizer_state_at_masked_positions_is_zeroed_at_load():
    state = _trained_state()
    model, opt, sp = _build()
    _step(model, opt)
    masks = {k: v for k, v in state['masks'].items()}
    buf = opt.state[sp.targets[0].param]['momentum_buffer']
    buf[~masks['1.weight']] = math.nan
    sp.load_state_dict(state)
    assert not buf[~sp.targets[0].mask].any()  # zero, not NaN (NaN * 0 is NaN)
    _step(model, opt)
    for t in sp.targets:
        assert not t.param[~t.mask].any() and torch.isfinite(t.param).all(), t.name


def test_model_load_of_nan_weights():
    """Weights loaded with model.load_state_dict: NaN at masked positions becomes zero; NaN at active ones is refused
    in one line (the run would train on NaN)."""
    src, _, src_sp = _build(seed=1)
    model, opt, sp = _build()
    sd = src.state_dict()
    t = src_sp.targets[1]
    sd[t.name + '_orig'].view(-1)[(~t.mask).view(-1).nonzero()[:3].squeeze(1)] = math.nan
    model.load_state_dict(sd)
    assert all(not x.param[~x.mask].any() for x in sp.targets)
    sd[t.name + '_orig'].view(-1)[t.mask.view(-1).nonzero()[0]] = math.inf
    with pytest.raises(ValueError, match=r'model.load_state_dict: the loaded sparse weights are not finite \(3.weight'):
        model.load_state_dict(sd)


@pytest.mark.parametrize('method, kw', [
    ('set', {}),                              # every update postponed
    ('static', {}),                           # no update ever checks: every update_interval steps
    ('rigl', {'update_end': 2}),              # after update_end
])
def test_persistent_nonfinite_gradients_stop_training(method, kw):
    model, opt, sp = _build(method, max_nonfinite_steps=4, **kw)
    _step(model, opt)
    with pytest.warns(UserWarning, match='non-finite'), pytest.raises(NonFiniteGradientError) as e:
        for _ in range(30):
            _step(model, opt, bad=True)
    # first checked at step 2 (an update step, or the update_interval grid), then every step: 2, 3, 4, 5
    assert sp.step == 5 and 'at 4 checked optimizer step(s) in a row, the last at step 5' in str(e.value)
    assert 'max_nonfinite_steps=4' in str(e.value)
    for t in sp.targets:  # masked weights and momentum stay zero (not NaN) while the weights diverge
        assert not t.param[~t.mask].any(), t.name
        assert not opt.state[t.param]['momentum_buffer'][~t.mask].any(), t.name


def test_nonfinite_gradients_stop_by_default_and_can_be_allowed():
    model, opt, sp = _build()
    with pytest.warns(UserWarning), pytest.raises(NonFiniteGradientError, match='max_nonfinite_steps=20'):
        for _ in range(40):
            _step(model, opt, bad=True)
    assert sp.step == 21
    model, opt, sp = _build(max_nonfinite_steps=None)
    with pytest.warns(UserWarning):
        for _ in range(30):
            _step(model, opt, bad=True)
    for bad in (0, 2.5, 'x', True):
        with pytest.raises(ValueError, match='max_nonfinite_steps'):
            _build(max_nonfinite_steps=bad)


class _NoStep(torch.optim.SGD):
    """Steps that change nothing: non-finite gradients leave the weights finite."""

    def step(self, closure=None):
        return None


def test_transient_nonfinite_gradients_do_not_stop():
    model = _mlp()
    opt = _NoStep(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, update_interval=2, total_steps=100,
                                    sparse_kernel_density=0, max_nonfinite_steps=3)
    with pytest.warns(UserWarning, match='postponed'):
        for i in range(30):
            _step(model, opt, bad=i % 10 in (1, 2))  # two bad steps in a row, then finite ones
    assert sp.step == 30 and sp._nonfinite_streak == 0


# --------------------------------------------------------------------------------------------------------------------
# checkpoints: the plugin layout (timm's train.py under timm_dst.run, an edited train.py)
def _args(**kw):
    import argparse

    from timm_dst.integrations.timm import add_dst_args
    p = argparse.ArgumentParser()
    add_dst_args(p)
    args = p.parse_args(['--dst', 'set', '--sparsity', '0.8', '--update-interval', '2', '--sparse-kernel-density', '0'])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def _packed(tmp_path) -> tuple[str, dict]:
    model, opt, sp = _build()
    for _ in range(3):
        _step(model, opt)
    ckpt = pack_checkpoint({'epoch': 0, 'state_dict': model.state_dict(), 'optimizer': opt.state_dict()}, sp)
    return str(tmp_path / 'ckpt.pth.tar'), ckpt


def test_checkpoint_with_nonfinite_or_unmasked_sparse_weights_is_refused(tmp_path):
    path, ckpt = _packed(tmp_path)
    mask = ckpt[DST_KEY]['sparsifier']['masks']['3.weight']
    w = ckpt['state_dict']['3.weight']
    w.view(-1)[mask.view(-1).nonzero()[:2].squeeze(1)] = math.nan  # bytes flipped in an active weight
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r'checkpoint: state_dict 3.weight holds 2 non-finite value\(s\)'):
        read_dst_state(path)
    _, ckpt = _packed(tmp_path)
    ckpt['state_dict']['3.weight'].view(-1)[(~mask).view(-1).nonzero()[0]] = 0.5
    with pytest.raises(ValueError, match=r'3.weight holds 1 non-zero value\(s\) where its mask is off'):
        read_dst_state(ckpt)


def test_plugin_resume_of_a_refused_state_leaves_the_model_plain(tmp_path):
    """create_sparsifier_from_args with a state its sparsifier refuses: ValueError, and the model and optimizer are
    as the resume loaded them (no masks, same values), so a corrected retry works."""
    path, ckpt = _packed(tmp_path)
    _all_ones(ckpt[DST_KEY]['sparsifier'])
    torch.save(ckpt, path)
    model = _mlp(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.load_state_dict(ckpt['state_dict'])
    opt.load_state_dict(ckpt['optimizer'])
    before = copy.deepcopy((model.state_dict(), opt.state_dict(), [n for n, _ in model.named_parameters()]))
    with pytest.raises(ValueError, match='its budget is'):
        create_sparsifier_from_args(model, opt, _args(), total_steps=40, resume=path)
    assert _same(before[0], model.state_dict()) and _same(before[1], opt.state_dict())
    assert before[2] == [n for n, _ in model.named_parameters()]
    assert not any(m._forward_pre_hooks for m in model.modules())
    sp = create_sparsifier_from_args(model, opt, _args(), total_steps=40)  # the model is plain again
    _step(model, opt)
    assert sp.step == 1


# --------------------------------------------------------------------------------------------------------------------
# timm-dst-train --resume
_TINY = [
    '--dataset', 'synthetic', '--input-size', '1', '6', '6', '--num-classes', '4', '--synthetic-train-size', '120',
    '--synthetic-test-size', '32', '--val-fraction', '0.2', '--model', 'itop_mlp', '--model-kwargs',
    'hidden=[24,16]', '-b', '32', '--lr', '0.05', '--dst', 'set', '--sparsity', '0.8', '--update-interval', '2',
    '--no-progress', '--epochs', '2',
]


@pytest.mark.usefixtures('fresh_accelerate_state')
def test_cli_resume_of_a_damaged_checkpoint_is_one_line(tmp_path, capsys):
    from conftest import run_cli

    from timm_dst.integrations.timm.checkpoint import LAST
    from timm_dst.train import main
    run_cli(_TINY, tmp_path / 'run')
    good = read_checkpoint(str(tmp_path / 'run' / LAST), mmap=False)

    def damaged(name, edit):
        ckpt = copy.deepcopy(good)
        edit(ckpt)
        path = tmp_path / f'{name}.pth.tar'
        torch.save(ckpt, path)
        return path

    def nan_weight(c):
        name = next(iter(c[DST_KEY]['sparsifier']['masks']))
        c['state_dict'][name].view(-1)[0] = math.nan

    cases = {
        'nan': (nan_weight, 'non-finite value(s) (NaN / inf)'),
        'ones': (lambda c: _all_ones(c[DST_KEY]['sparsifier']), 'its budget is'),
        'step': (lambda c: c[DST_KEY]['sparsifier'].update(step=-5), 'step -5 is not accepted'),
    }
    for name, (edit, needle) in cases.items():
        path = damaged(name, edit)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in _TINY + ['--epochs', '3', '--output', tmp_path / f'out_{name}', '--resume', path]])
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert e.value.code == 2 and 'Traceback' not in err and len(lines) == 1, (name, err)
        assert lines[0].startswith(f'timm-dst-train: error: --resume {path}: ') and needle in lines[0], lines[0]


# --------------------------------------------------------------------------------------------------------------------
# timm's train.py under timm_dst.run
def test_launcher_resume_of_damaged_checkpoints_is_one_line(tmp_path):
    """The issue's run: a checkpoint with bytes flipped in fc.weight resumed, trained on NaN to the end with exit 0
    and reported density 0.1; a checkpoint with all-ones masks trained dense. Both now stop at the resume, exit 2."""
    from test_timm_run import DST_ARGS, FMNIST, MODEL_ARGS, TRAIN_PY, launch, train, write_fmnist_folder
    if not os.path.isfile(TRAIN_PY) or not os.path.isdir(FMNIST):
        pytest.skip('timm train.py or Fashion-MNIST absent')
    data = write_fmnist_folder(str(tmp_path / 'data'), 64, 32)
    out = str(tmp_path / 'runs')
    os.makedirs(out)
    train(data, out, 'one', '--epochs', '1')
    good = read_checkpoint(os.path.join(out, 'one', 'last.pth.tar'), mmap=False)
    for name, needle in (('nan', 'checkpoint: state_dict fc.weight holds 8 non-finite value(s)'),
                         ('ones', 'its budget is')):
        ckpt = copy.deepcopy(good)
        if name == 'nan':
            ckpt['state_dict']['fc.weight'].view(-1)[:8] = math.nan
        else:
            _all_ones(ckpt[DST_KEY]['sparsifier'])
        path = os.path.join(out, f'{name}.pth.tar')
        torch.save(ckpt, path)
        res = launch([TRAIN_PY, data, *MODEL_ARGS, '-b', '32', *DST_ARGS, '--output', out, '--experiment', name,
                      '--epochs', '2', '--resume', path], cwd=out, check=False)
        err = [ln for ln in res.stderr.strip().splitlines() if ln.startswith('timm-dst-run:')]
        assert res.returncode == 2 and 'Traceback' not in res.stderr, res.stderr[-2000:]
        assert len(err) == 1 and err[0].startswith(f'timm-dst-run: error: --resume {path}: ') and needle in err[0], err
