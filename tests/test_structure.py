"""Structured sparsity (issue 17, item 1): every method keeps N:M, constant fan-in and block structure exactly through
every update, on an MLP, a timm ViT and a timm CNN; budgets in whole units; checkpoints; errors; the CLI flag."""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from conftest import check_exact_resume, make_tiny, record_updates, run_cli
from conftest import train_steps as _train

import timm_dst
import timm_dst.integrations.timm
from timm_dst.core.structure import parse_structure, quantize_counts
from timm_dst.methods import SparseMethod

METHODS = [n for n in timm_dst.list_methods()
           if timm_dst.get_method_info(n).cls.__module__.startswith('timm_dst.') and n != 'dense']
STRUCTURES = ['2:4', 'fan-in', '16x16', '1x4']
MOVING = {n for n in METHODS if timm_dst.get_method_info(n).moves_budget}
STATIC = {n for n in METHODS if not timm_dst.get_method_info(n).explores}


def _matrix(x: torch.Tensor) -> torch.Tensor:
    """The documented view, written out independently: [out, in, *k] -> [out, *k, in] -> [out, k * in]."""
    return x if x.dim() == 2 else x.permute(0, *range(2, x.dim()), 1).reshape(x.shape[0], -1)


def _fits(spec: str, shape: tuple[int, ...]) -> bool:
    out, in_ch = shape[0], shape[1]
    if ':' in spec:
        return in_ch % int(spec.split(':')[1]) == 0
    if 'x' in spec:
        r, c = map(int, spec.split('x'))
        return out % r == 0 and in_ch % c == 0
    return True


def _check_structure(spec: str, mask: torch.Tensor, at_target: bool = True) -> None:
    """The structure holds exactly on one mask (``at_target``: an N:M mask is at most N per group, not above)."""
    m = _matrix(mask).to(torch.int64)
    if spec == 'fan-in':
        rows = m.sum(dim=1)
        assert (rows == rows[0]).all(), f'fan-in rows hold {rows.min()}..{rows.max()}'
    elif ':' in spec:
        n, mm = map(int, spec.split(':'))
        groups = m.reshape(m.shape[0], -1, mm).sum(dim=-1)
        assert (groups == groups.flatten()[0]).all(), 'N:M groups differ'
        if at_target:
            assert int(groups.max()) <= n
    else:
        r, c = map(int, spec.split('x'))
        blocks = m.reshape(m.shape[0] // r, r, m.shape[1] // c, c).sum(dim=(1, 3))
        assert ((blocks == 0) | (blocks == r * c)).all(), 'a block is partly active'


def _quantum(spec: str, shape: tuple[int, ...]) -> int:
    if spec == 'fan-in':
        return shape[0]
    if ':' in spec:
        return math.prod(shape) // int(spec.split(':')[1])
    r, c = map(int, spec.split('x'))
    return r * c


def _kwargs(method: str, model, x, y) -> dict:
    extra = {'dsr': dict(dsr_np=2000), 'gmp': dict(update_end=10),
             'snip': dict(snip_batches=(x, y)), 'snip-set-itop': dict(snip_batches=(x, y)),
             'lth': dict(lth_trained_state=model.state_dict()),
             'lth-set-itop': dict(lth_trained_state=model.state_dict())}.get(method, {})
    return {'update_end': 40, **extra}


def _make(kind: str, method: str, structure: str, **kw):
    model, x, y = make_tiny(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sparsity = {} if ':' in structure else {'sparsity': 0.9}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the misfit warning is tested on its own
        kwargs = {'update_interval': 2, 'total_steps': 40, 'seed': 3, **sparsity, **_kwargs(method, model, x, y), **kw}
        sp = timm_dst.create_sparsifier(model, opt, method=method, structure=structure, **kwargs)
    return model, opt, sp, x, y


def _check_all(sp: timm_dst.Sparsifier, structure: str, at_target: bool = True) -> None:
    summary = sp.summary()
    for t, c, row, dst_mask in zip(sp.targets, sp.counts, summary, sp._dst_masks):
        fits = _fits(structure, t.shape)
        canonical = parse_structure(structure).spec
        assert row['structure'] == (canonical if fits else None), t.name
        assert dst_mask.structure == row['structure'], t.name
        assert int(t.mask.sum()) == c, t.name  # counts exact
        assert not t.param[~t.mask].any(), t.name  # masked weights stay zero
        assert not getattr(t.module, t.param_name)[~t.mask].any(), t.name
        if fits:
            _check_structure(structure, t.mask, at_target)
            assert c % _quantum(structure, t.shape) == 0, (t.name, c)  # whole units
    # R_s in elements: the union of every mask ever active over all sparse elements
    explored = sum(int(e.sum()) for e in sp.explored)
    assert sp.itop_rate == pytest.approx(explored / sum(t.numel for t in sp.targets))
    assert all((e >= t.mask).all() for e, t in zip(sp.explored, sp.targets))


@pytest.mark.parametrize('structure', STRUCTURES)
@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('kind', ['mlp', 'vit'])
def test_structure_holds_through_updates(kind: str, method: str, structure: str):
    model, opt, sp, x, y = _make(kind, method, structure)
    budget = list(sp.counts)
    if method not in ('snip', 'snip-set-itop', 'lth', 'lth-set-itop', 'gmp'):  # global rankings set their own
        assert budget == sp.layer_budgets(sp.sparsity)
    if ':' in structure:
        assert sp.sparsity == 0.5 and sp.density == pytest.approx(0.5 if method != 'gmp' else 1.0, abs=1e-3)
    _check_all(sp, structure, at_target=method != 'gmp')
    masks = [t.mask.clone() for t in sp.targets]
    changed = 0
    for _ in range(12):
        _train(model, opt, x, y, 1)
        _check_all(sp, structure, at_target=method != 'gmp' or sp.step >= 10)
        if method not in MOVING and method != 'gmp':
            assert sp.counts == budget  # the budget exactly, in every tensor
        if method in MOVING:
            # a reallocation keeps the total within one unit of the budget
            assert abs(sum(sp.counts) - sum(budget)) < max(_quantum(structure, t.shape) for t in sp.targets)
        changed += any(not torch.equal(t.mask, m) for t, m in zip(sp.targets, masks))
        masks = [t.mask.clone() for t in sp.targets]
    if method == 'gmp':
        assert sp.counts == sp.method.final_counts  # pruned to the target in whole units
    elif method in STATIC:
        assert changed == 0
    elif method != 'dsr':  # (DSR drops only below its threshold, which may take a while to find)
        assert changed >= 3, 'topology never changed'
        assert sp.itop_rate > sp.density


@pytest.mark.parametrize('structure', STRUCTURES)
@pytest.mark.parametrize('method', ['set', 'rigl', 'gmp', 'snfs'])
def test_structure_on_convs(method: str, structure: str):
    """Conv weights [out, in, kh, kw] keep it in the documented view [out, kh * kw * in]; the 3-channel stem does not
    fit N:M or blocks and stays unstructured."""
    model, opt, sp, x, y = _make('cnn', method, structure)
    for _ in range(12):
        _train(model, opt, x, y, 1)
        _check_all(sp, structure, at_target=method != 'gmp' or sp.step >= 10)
    if structure != 'fan-in':
        assert sp.summary()[0]['structure'] is None


def test_unit_scores_are_pooled():
    """Blocks drop the active blocks of lowest summed |w| and RigL grows the blocks of largest summed |grad|."""
    model, opt, sp, x, y = _make('mlp', 'rigl', '16x16', prune_rate=0.3, prune_rate_schedule='constant',
                                 update_interval=1000)
    _train(model, opt, x, y, 2)
    t, i = sp.targets[1], 1
    sp._set_capture(True)
    _train(model, opt, x, y, 1)
    grads = sp.dense_grads()[i].abs().clone()
    w = t.param.detach().abs().clone()
    before = t.mask.clone()
    updates = record_updates(sp)
    sp.update()
    pool = sp._layouts[i].pool
    (drops, grows), = updates

    def units(index: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(before.numel(), dtype=torch.int32)
        m[index] = 1
        return pool(m.view_as(before)) > 0

    dropped, grown = units(drops[i]), units(grows[i])
    survived = (pool(before.int()) > 0) & ~dropped
    assert dropped.any() and grown.any()
    w_sum, g_sum = pool(w), pool(grads)
    assert w_sum[dropped].max() <= w_sum[survived].min()
    never = ~(pool(before.int()) > 0) & ~grown
    assert g_sum[grown].min() >= g_sum[never].max() - 1e-6


def test_nm_keeps_n_per_group_and_fan_in_per_row():
    """N:M with sparsity left out is 1 - N/M, every group exactly N; fan-in follows the distribution per layer."""
    model, opt, sp, x, y = _make('mlp', 'set', '1:4')
    assert sp.sparsity == 0.75
    for t in sp.targets:
        groups = _matrix(t.mask).reshape(t.shape[0], -1, 4).sum(-1)
        assert (groups == 1).all()
    model, opt, sp, x, y = _make('mlp', 'set', 'fan-in', distribution='erk')
    erk = timm_dst.layer_counts([t.shape for t in sp.targets], 0.9, 'erk')
    for t, c, want in zip(sp.targets, sp.counts, erk):
        assert c % t.shape[0] == 0 and abs(c - want) <= t.shape[0] // 2 + t.shape[0]


def test_custom_method_gets_structure():
    """A third-party method (only scores overridden) keeps the structure through the shared machinery."""

    class GradDrop(SparseMethod):
        uses_dense_grads = True

        def before_update(self, sp):
            self._g = sp.dense_grads()

        def drop_score(self, sp, i):
            return sp.targets[i].param.detach().abs() + self._g[i].abs()

        def grow_score(self, sp, i):
            return self._g[i].abs()

    for structure in STRUCTURES:
        model, x, y = make_tiny('mlp')
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sparsity = {} if ':' in structure else {'sparsity': 0.9}
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            sp = timm_dst.Sparsifier(model, opt, GradDrop(), update_interval=2, total_steps=20, structure=structure,
                                     **sparsity)
        budget = list(sp.counts)
        for _ in range(6):
            _train(model, opt, x, y, 1)
            _check_all(sp, structure)
            assert sp.counts == budget
        assert sp.itop_rate > sp.density


def test_unstructured_is_unchanged():
    """structure=None (and 'none') is today's behaviour: the same masks as without the argument."""
    masks = []
    for kw in ({}, {'structure': None}, {'structure': 'none'}):
        model, x, y = make_tiny('mlp')
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = timm_dst.create_sparsifier(model, opt, method='rigl', sparsity=0.9, update_interval=2,
                                        total_steps=20, seed=1, **kw)
        _train(model, opt, x, y, 6)
        masks.append([t.mask.clone() for t in sp.targets])
        assert sp._dst_masks[0].structure is None and sp.summary()[0]['structure'] is None
        assert 'structure' not in repr(sp)
    for other in masks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(masks[0], other))


def test_misfit_warns_once_and_is_reported():
    model, x, y = make_tiny('mlp')  # head.weight is 10 x 512: 10 rows are not a multiple of 16
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(UserWarning, match=r"structure='16x16' does not fit 1 of 3 .*head\.weight") as rec:
        sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.9, structure='16X16', total_steps=10)
    assert len([w for w in rec if 'does not fit' in str(w.message)]) == 1
    assert [r['structure'] for r in sp.summary()] == ['16x16', '16x16', None]
    assert "structure='16x16' (unstructured: head.weight; 2 of 3 structured)" in repr(sp)


@pytest.mark.parametrize('method,structure', [('set', '16x16'), ('rigl-itop', 'fan-in'), ('snfs', '2:4'),
                                              ('dsr', 'fan-in')])
def test_structured_exact_resume(method: str, structure: str):
    def build():
        model, _, _ = make_tiny('mlp')
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        sparsity = {} if ':' in structure else {'sparsity': 0.9}
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            sp = timm_dst.create_sparsifier(model, opt, method=method, update_interval=2, total_steps=20, seed=5,
                                            structure=structure, **sparsity,
                                            **({'dsr_np': 2000} if method == 'dsr' else {}))
        return model, opt, sp

    _, x, y = make_tiny('mlp')
    sp, sp2 = check_exact_resume(build, x, y, before=5, after=6)
    assert sp2.state_dict()['config']['structure'] == parse_structure(structure).spec
    _check_all(sp2, structure)


def test_state_with_another_structure_is_refused():
    model, opt, sp, x, y = _make('mlp', 'set', 'fan-in')
    _train(model, opt, x, y, 3)
    state = sp.state_dict()
    for other in (None, '16x16'):
        model2, x2, _ = make_tiny('mlp')
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            sp2 = timm_dst.create_sparsifier(model2, opt2, method='set', sparsity=0.9, update_interval=2,
                                             total_steps=40, seed=3, structure=other)
        with pytest.raises(ValueError, match=r"structure='fan-in'.*structure=('16x16'|None)"):
            sp2.load_state_dict(state)


def test_set_masks_must_keep_structure():
    model, opt, sp, x, y = _make('mlp', 'static', '16x16')
    masks = [t.mask.clone() for t in sp.targets]
    sp.set_masks(masks)  # unchanged: fine
    flat = masks[0].view(-1)
    on = flat.nonzero()[0]
    flat[on] = False  # one weight off inside an active block
    with pytest.raises(ValueError, match=r'features\.0\.weight breaks structure=.16x16.'):
        sp.set_masks(masks)


@pytest.mark.parametrize('spec', ['abc', '4:2', '0:4', '2:4:8', '0x4', '1x1', '16 by 16', 124, 2.5, True])
def test_bad_specs(spec):
    model, x, y = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"structure=.*accepted: None or 'none'.*'N:M'.*'fan-in'.*'RxC'"):
        timm_dst.create_sparsifier(model, opt, method='set', structure=spec)


def test_nm_sparsity_must_agree():
    model, x, y = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"structure='2:4' fixes sparsity at 0.5.*sparsity=0.5 or leave sparsity out"):
        timm_dst.create_sparsifier(model, opt, method='set', structure='2:4', sparsity=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='set', structure='2:8', sparsity=0.75, total_steps=10)
    assert sp.density == 0.25


def test_dense_ignores_structure():
    model, x, y = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = timm_dst.create_sparsifier(model, opt, method='dense', structure='2:4')
    assert sp.density == 1.0 and sp.structure is None


def test_quantize_counts():
    counts, exact = quantize_counts([100, 260, 7], [16, 16, 1], [0, 0, 0], [512, 512, 64], 367)
    assert exact and sum(counts) == 367 and counts[0] % 16 == 0 and counts[1] % 16 == 0
    counts, exact = quantize_counts([100, 260], [16, 16], [0, 0], [512, 512], 367)
    assert not exact and abs(sum(counts) - 367) < 16


# --------------------------------------------------------------------------------------------------------------------
# the CLI
TINY = [
    '--dataset', 'synthetic', '--input-size', '1', '8', '8', '--num-classes', '4', '--synthetic-train-size', '96',
    '--synthetic-test-size', '32', '--val-fraction', '0.25', '--model', 'itop_mlp', '--model-kwargs',
    'hidden=[32,16]', '-b', '24', '--lr', '0.05', '--update-interval', '2', '--no-progress', '--epochs', '2',
]


@pytest.mark.usefixtures('fresh_accelerate_state')
def test_cli_structure(tmp_path, capsys):
    import json

    from timm_dst.train import main

    for argv, message in (
            (['--structure', '3:2'], "--structure '3:2' is not accepted; accepted: None or 'none'"),
            (['--structure', '124'], 'quote it'),
            (['--structure', '2:4', '--sparsity', '0.9'], '--structure 2:4 fixes the sparsity at 0.5')):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(TINY + ['--dst', 'set', '--output', str(tmp_path / 'bad')] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert 'Traceback' not in err and message in err
        assert len([ln for ln in err.strip().splitlines() if ln and not ln.startswith('usage:')]) == 1
    for structure in ('2:4', 'fan-in', '8x8'):
        out = tmp_path / structure.replace(':', '-')
        run_cli(TINY + ['--dst', 'rigl-itop', '--structure', structure]
                + ([] if ':' in structure else ['--sparsity', '0.8']), out)
        results = json.loads((out / 'results.json').read_text())
        ckpt = timm_dst.integrations.timm.read_checkpoint(str(out / 'last.pth.tar'))
        state = ckpt[timm_dst.integrations.timm.DST_KEY]['sparsifier']
        assert state['config']['structure'] == structure
        for mask in state['masks'].values():
            if _fits(structure, tuple(mask.shape)):
                _check_structure(structure, mask)
        if structure == '2:4':
            assert results['density'] == pytest.approx(0.5, abs=1e-3)
    # a resume continues with the same structure and refuses another one (one line, exit 2)
    out = tmp_path / '8x8'
    run_cli(TINY + ['--dst', 'rigl-itop', '--structure', '8x8', '--sparsity', '0.8', '--epochs', '3',
                    '--resume', str(out)], tmp_path / 'resumed')
    from timm_dst.integrations.timm import DST_KEY, read_checkpoint
    state = read_checkpoint(str(tmp_path / 'resumed' / 'last.pth.tar'))[DST_KEY]
    assert state['sparsifier']['config']['structure'] == '8x8' and state['step'] == 9  # 3 epochs of 3 steps
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(TINY + ['--dst', 'rigl-itop', '--structure', 'fan-in', '--sparsity', '0.8', '--epochs', '3',
                     '--resume', str(out), '--output', str(tmp_path / 'other')])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "trained with structure='8x8'" in err and 'Traceback' not in err


def test_cli_flag_in_shared_group():
    """--structure is in the DST flag group shared by timm-dst-train and the launcher for timm's train.py."""
    from timm_dst.integrations.timm import dst_option_strings
    assert dst_option_strings()['--structure'] == 1


def test_launcher_structure(tmp_path):
    """timm's own train.py through the launcher keeps fan-in on every conv of resnet10t and records it."""
    from test_timm_run import TRAIN_PY, train, write_fmnist_folder
    if not os.path.isfile(TRAIN_PY) or not os.path.isdir('/usr/share/datasets/fashion-mnist'):
        pytest.skip('../shared/clients/timm/train.py or Fashion-MNIST absent')
    data = write_fmnist_folder(str(tmp_path / 'data'), 64, 32)
    out = str(tmp_path / 'out')
    os.makedirs(out)
    train(data, out, 'fanin', '--epochs', '1', '--structure', 'fan-in')
    ckpt = timm_dst.integrations.timm.read_checkpoint(os.path.join(out, 'fanin', 'last.pth.tar'))
    state = ckpt[timm_dst.integrations.timm.DST_KEY]['sparsifier']
    assert state['config']['structure'] == 'fan-in'
    assert len(state['masks']) > 5
    for mask in state['masks'].values():
        _check_structure('fan-in', mask)


@pytest.mark.parametrize('structure', ['16x16', 'fan-in'])
def test_set_plus_grows_unexplored_units_first(structure: str):
    model, opt, sp, x, y = _make('mlp', 'set', structure, grow_unexplored_first=True, prune_rate=0.3,
                                 prune_rate_schedule='constant', update_interval=1)
    explored = [e.clone() for e in sp.explored]
    updates = record_updates(sp)
    _train(model, opt, x, y, 1)
    n_grown = 0
    for t, e, row in zip(sp.targets, explored, sp.summary()):
        if row['structure'] is None or row['density'] > 0.5:  # (a dense-ish tensor has no never-explored room)
            continue
        grown = t.mask & ~e
        n_grown += int(grown.sum())
        (_, grows), = updates
        assert not e.reshape(-1)[grows[sp.targets.index(t)]].any(), t.name  # plenty of never-explored room
    assert n_grown > 0
    _check_all(sp, structure)


@pytest.mark.parametrize('structure', STRUCTURES)
@pytest.mark.parametrize('variant', ['magnitude', 'global-magnitude', 'gmp-global', 'gmp-initial'])
def test_initial_topologies_and_gmp_variants(variant: str, structure: str):
    method, kw = {'magnitude': ('set', dict(mask_init='magnitude')),
                  'global-magnitude': ('set', dict(mask_init='global-magnitude')),
                  'gmp-global': ('gmp', dict(gmp_global=True)),
                  'gmp-initial': ('gmp', dict(gmp_initial_sparsity=0.25 if ':' in structure else 0.5))}[variant]
    model, opt, sp, x, y = _make('vit', method, structure, **kw)
    _check_all(sp, structure, at_target=method != 'gmp')
    for _ in range(12):
        _train(model, opt, x, y, 1)
        _check_all(sp, structure, at_target=method != 'gmp' or sp.step >= 10)
    if method == 'gmp' and ':' in structure:  # every fitting tensor ends at exactly N per group
        for t, c, row in zip(sp.targets, sp.counts, sp.summary()):
            assert row['structure'] is None or c == t.numel // 2
    elif method == 'gmp':
        assert sp.density == pytest.approx(0.1, abs=0.01)


def test_sweep_grid_keeps_nm_text():
    from timm_dst.tools.sweep import parse_grid
    assert parse_grid(['structure=none,2:4,fan-in,16x16'])['structure'] == ['none', '2:4', 'fan-in', '16x16']
    assert parse_grid(['epochs=2,8'])['epochs'] == [2, 8]
