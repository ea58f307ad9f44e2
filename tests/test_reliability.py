"""Faults and bad input (issue 13, library side): skipped steps, model copies and conversions, odd models, bad
arguments. Each test reproduces a failure seen on commit 0955442."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import ModelEma, ModelEmaV2, ModelEmaV3

import timm_dst
from timm_dst import fold_masks


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def _batch(seed: int = 1, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def _step(model, opt, x, y, scaler=None, poison: str | None = None) -> None:
    """One step of a user's loop; ``poison`` makes the backward overflow (in every gradient, or only in a bias)."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    if poison == 'loss':
        loss = loss * math.inf
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    if poison == 'bias':
        model[1].bias.grad[0] = math.inf  # the capture of the sparse weights does not see this one
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def _masks(sp) -> list[torch.Tensor]:
    return [t.mask.clone() for t in sp.targets]


def _nonfinite_warnings(rec) -> list[str]:
    return [str(w.message) for w in rec if 'non-finite' in str(w.message)]


# --------------------------------------------------------------------------------------------------------------------
# 1, 2: a step skipped by GradScaler leaves no trace
@pytest.mark.parametrize('poison', ['loss', 'bias'])
def test_rigl_skipped_step_leaves_no_trace(poison):
    def run(skip: bool):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = timm_dst.create_sparsifier(model, opt, 'rigl', sparsity=0.8, update_interval=2, total_steps=100,
                                        sparse_kernel_density=0)
        scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
        x, y = _batch(1)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter('always')
            _step(model, opt, x, y, scaler)
            if skip:  # an overflowing batch: GradScaler skips optimizer.step
                xb, yb = _batch(7)
                _step(model, opt, xb, yb, scaler, poison=poison)
                assert sp.step == 1
            _step(model, opt, x, y, scaler)
        return sp, model, _nonfinite_warnings(rec)

    ref, ref_model, _ = run(False)
    sp, model, warned = run(True)
    assert sp.step == 2 and warned == []
    assert len(sp.history) == len(ref.history) == 2  # the update happened at step 2
    for a, b in zip(_masks(sp), _masks(ref)):
        assert torch.equal(a, b)  # growth scores came from the real step only


def test_snfs_momentum_stays_finite_after_skipped_step():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, 'snfs', sparsity=0.8, update_interval=3, total_steps=100,
                                    sparse_kernel_density=0)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
    x, y = _batch(1)
    _step(model, opt, x, y, scaler)
    _step(model, opt, x, y, scaler, poison='loss')
    for _ in range(4):
        _step(model, opt, x, y, scaler)
    assert sp.step == 5
    assert all(torch.isfinite(m).all() for m in sp.method.momentum)
    assert sum(sp.counts) == sum(int(t.mask.sum()) for t in sp.targets)


def test_nonfinite_dense_grad_never_reaches_momentum():
    """A real step whose dense gradient is non-finite (no GradScaler): the window is dropped with a warning."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = timm_dst.create_sparsifier(model, opt, 'snfs', sparsity=0.8, update_interval=3, total_steps=100,
                                    sparse_kernel_density=0)
    x, y = _batch(1)
    _step(model, opt, x, y)
    x_bad = x.clone()
    x_bad[0, 0] = math.inf
    with pytest.warns(UserWarning, match='non-finite'):
        _step(model, opt, x_bad, y)
    assert all(torch.isfinite(m).all() for m in sp.method.momentum)


class _NoStep(torch.optim.SGD):
    """An optimizer whose step changes nothing (the step hooks still run): non-finite gradients leave the weights
    finite, so only the sparsifier's handling is seen."""

    def step(self, closure=None):
        return None


@pytest.mark.parametrize('method', ['gmp', 'rigl'])
def test_update_postponed_by_nonfinite_gradient_runs_at_next_step(method):
    model = _mlp()
    opt = _NoStep(model.parameters(), lr=0.1)
    kwargs = dict(update_end=4, update_start=0) if method == 'gmp' else dict(total_steps=100)
    sp = timm_dst.create_sparsifier(model, opt, method, sparsity=0.8, update_interval=2, sparse_kernel_density=0,
                                    **kwargs)
    x, y = _batch(1)
    x_bad = x.clone()
    x_bad[0, 0] = math.inf
    for _ in range(3):
        _step(model, opt, x, y)
    with pytest.warns(UserWarning, match='postponed'):
        _step(model, opt, x_bad, y)  # step 4: an update step with a non-finite gradient
    assert sp.history[-1]['step'] == 2
    _step(model, opt, x, y)
    assert sp.history[-1]['step'] == 5  # the update ran at the next real step
    if method == 'gmp':
        assert sp.density == pytest.approx(0.2, abs=0.01)  # the schedule still ends at the target
    assert all(int(t.mask.sum()) == c for t, c in zip(sp.targets, sp.counts))


# --------------------------------------------------------------------------------------------------------------------
# 3: copies that average buffers
@pytest.mark.parametrize('ema_cls', [ModelEma, ModelEmaV2, ModelEmaV3])
def test_ema_copy_evaluates_and_exports_at_live_sparsity(ema_cls):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.9, update_interval=1, total_steps=100,
                                    prune_rate_schedule='constant', sparse_kernel_density=0)
    ema = ema_cls(model, decay=0.9)
    x, y = _batch(1)
    for _ in range(20):
        _step(model, opt, x, y)
        ema.update(model)
    copy_model = ema.ema if ema_cls is ModelEma else ema.module
    exported = timm_dst.export_state_dict(copy_model)
    for t in sp.targets:
        w = exported[t.name]
        assert not w[~t.mask].any(), t.name  # never nonzero where the live model is masked
    live_nnz = sum(int(t.mask.sum()) for t in sp.targets)
    assert sum(int((exported[t.name] != 0).sum()) for t in sp.targets) <= live_nnz
    # evaluation: the copy's forward equals a plain model loaded with the export
    plain = _mlp()
    plain.load_state_dict(exported)
    copy_model.eval()
    assert torch.allclose(copy_model(x), plain(x), atol=1e-6)
    # a copy's own state_dict exports the same way
    sd_export = timm_dst.export_state_dict(copy_model.state_dict())
    for k, v in exported.items():
        assert torch.equal(sd_export[k], v), k


def test_snapshot_copy_keeps_its_own_mask():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.9, update_interval=1, total_steps=100,
                               prune_rate_schedule='constant', sparse_kernel_density=0)
    x, y = _batch(1)
    _step(model, opt, x, y)
    snap = copy.deepcopy(model)
    before = timm_dst.export_state_dict(snap)
    out = snap(x)
    for _ in range(3):
        _step(model, opt, x, y)
    after = timm_dst.export_state_dict(snap)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(snap(x), out)


# --------------------------------------------------------------------------------------------------------------------
# 4: conversions after attaching
def test_channels_last_after_attaching():
    model, _, _ = _tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, 'rigl', sparsity=0.8, update_interval=2, total_steps=20)
    model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.tensor([1, 2])
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert len(sp.history) == 3
    for i, t in enumerate(sp.targets):
        assert int(t.mask.sum()) == sp.counts[i]
        assert not t.param[~t.mask].any()
        state = opt.state[t.param]['momentum_buffer']
        assert not state[~t.mask].any()


def _tiny_cnn():
    torch.manual_seed(0)
    return timm.create_model('test_resnet', num_classes=10), None, None


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_dtype_conversion_after_attaching(dtype):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, 'rigl', sparsity=0.8, update_interval=2, total_steps=20,
                                    sparse_kernel_density=0)
    model.to(dtype)
    x, y = _batch(1)
    for _ in range(4):
        _step(model, opt, x.to(dtype), y)
    assert len(sp.history) == 3
    for i, t in enumerate(sp.targets):
        assert t.param.dtype == dtype and t.mask.dtype == torch.bool
        assert int(t.mask.sum()) == sp.counts[i] and not t.param[~t.mask].any()


# --------------------------------------------------------------------------------------------------------------------
# 8: frozen target weights; atomic attaching
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_frozen_weight_is_not_a_target():
    model = _mlp()
    model[3].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.warns(UserWarning, match=r'3\.weight'):
        sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, total_steps=10, update_interval=2)
    assert [t.name for t in sp.targets] == ['1.weight', '5.weight']
    x, y = _batch(1)
    for _ in range(3):
        _step(model, opt, x, y)


def test_failed_attach_leaves_model_untouched():
    model = _mlp()
    before = _state(model)
    keys = list(model.state_dict())
    opt = torch.optim.SGD(list(model[1].parameters()), lr=0.1)  # does not hold 3.weight / 5.weight
    with pytest.raises(ValueError, match=r'optimizer.*3\.weight'):
        timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, total_steps=10)
    assert list(model.state_dict()) == keys
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())
    # a retry with a good optimizer works
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, total_steps=10)


# --------------------------------------------------------------------------------------------------------------------
# 9: tied weights
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.b.weight = self.a.weight
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x[:, :32])))))


def test_tied_weight_is_one_target():
    model = _Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.9, total_steps=10, update_interval=2,
                                    sparse_kernel_density=0)
    assert [t.name for t in sp.targets] == ['a.weight', 'head.weight']
    x, y = _batch(1)
    for _ in range(4):
        _step(model, opt, x, y)
    for i, t in enumerate(sp.targets):
        assert int((t.param != 0).sum()) <= sp.counts[i] == int(t.mask.sum())
    assert model.b.weight is sp.targets[0].param  # b trains the same masked tensor
    exported = timm_dst.export_state_dict(model)
    assert torch.equal(exported['a.weight'], exported['b.weight'])
    plain = _Tied()
    plain.load_state_dict(exported)
    assert torch.allclose(plain(x), model(x))


def test_tied_weight_excluded_under_either_name():
    model = _Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.5, total_steps=10, exclude='b.weight')
    assert [t.name for t in sp.targets] == ['head.weight']


def test_parameters_sharing_memory_are_refused():
    model = _Tied()
    model.b.weight = nn.Parameter(model.a.weight.data)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match='same memory'):
        timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.5, total_steps=10)


# --------------------------------------------------------------------------------------------------------------------
# 10: an optimizer that does not hold the sparse weights
def test_optimizer_without_the_sparse_weights_is_refused():
    model = _mlp()
    other = _mlp(1)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match='optimizer'):
        timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, total_steps=10)
    assert not any(m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------------------------------------------------
# 11: bad argument values name the argument
@pytest.mark.parametrize('kwargs, name', [
    (dict(prune_rate_min=2.0), 'prune_rate_min'),
    (dict(prune_rate_min=-0.1), 'prune_rate_min'),
    (dict(prune_rate='0.5'), 'prune_rate'),
    (dict(prune_rate=math.nan), 'prune_rate'),
    (dict(seed=None), 'seed'),
    (dict(seed=1.5), 'seed'),
    (dict(update_interval=math.nan), 'update_interval'),
    (dict(update_interval=2.5), 'update_interval'),
    (dict(update_interval='10'), 'update_interval'),
    (dict(update_interval=True), 'update_interval'),
    (dict(total_steps=2.5), 'total_steps'),
    (dict(total_steps='100'), 'total_steps'),
    (dict(sparsity=math.nan), 'sparsity'),
    (dict(sparsity='0.9'), 'sparsity'),
    (dict(update_start='0'), 'update_start'),
    (dict(update_end=math.nan), 'update_end'),
    (dict(update_end=True), 'update_end'),
    (dict(update_milestones=[(10,)]), 'update_milestones'),
    (dict(update_milestones=5), 'update_milestones'),
    (dict(distribution=['erk']), 'distribution'),
    (dict(prune_rate_schedule='cosin'), 'prune_rate_schedule'),
    (dict(include=3), 'include'),
    (dict(exclude=[1]), 'exclude'),
    (dict(dense_classifier='false'), 'dense_classifier'),
    (dict(grow_unexplored_first='yes'), 'grow_unexplored_first'),
    (dict(remask_every_step=1), 'remask_every_step'),
    (dict(sparse_kernel_density='0.05'), 'sparse_kernel_density'),
    (dict(mask_init=None), 'mask_init'),
])
def test_bad_controller_values_name_the_argument(kwargs, name):
    model = _mlp()
    before = _state(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = dict(sparsity=0.8, total_steps=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        timm_dst.create_sparsifier(model, opt, 'set', **args)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize('method, kwargs, name', [
    ('snfs', dict(snfs_momentum='0.9'), 'snfs_momentum'),
    ('snfs', dict(snfs_momentum=math.nan), 'snfs_momentum'),
    ('dsr', dict(dsr_np=2.5), 'dsr_np'),
    ('dsr', dict(dsr_np='100'), 'dsr_np'),
    ('dsr', dict(dsr_threshold=math.nan), 'dsr_threshold'),
    ('dsr', dict(dsr_threshold=math.inf), 'dsr_threshold'),
    ('dsr', dict(dsr_tolerance='0.1'), 'dsr_tolerance'),
    ('gmp', dict(gmp_initial_sparsity='0'), 'gmp_initial_sparsity'),
    ('gmp', dict(gmp_global='no'), 'gmp_global'),
    ('snip', dict(snip_num_batches=0), 'snip'),
    ('set', dict(sparsity=0.8, nonsense=1), 'nonsense'),
])
def test_bad_method_values_name_the_argument(method, kwargs, name):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = dict(sparsity=0.8, total_steps=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        timm_dst.create_sparsifier(model, opt, method, **args)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_bad_model_and_method_arguments():
    opt_model = _mlp()
    opt = torch.optim.SGD(opt_model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match='model'):
        timm_dst.create_sparsifier('resnet18', opt, 'set', total_steps=10)
    with pytest.raises(ValueError, match='method'):
        timm_dst.create_sparsifier(opt_model, opt, 'sett', total_steps=10)
    with pytest.raises(ValueError, match='optimizer'):
        timm_dst.create_sparsifier(opt_model, None, 'set', total_steps=10)


def test_integral_float_interval_is_accepted():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, total_steps=100.0, update_interval=4.0)
    assert sp.schedule.interval == 4 and sp.total_steps == 100


def test_empty_layers_warn():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match='no active weight'):
        timm_dst.create_sparsifier(model, opt, 'static', sparsity=0.9999, distribution='uniform')


# --------------------------------------------------------------------------------------------------------------------
# 12: folding while a sparsifier is live; sparsifying again
def test_fold_masks_with_live_sparsifier_then_train():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, update_interval=1, total_steps=100,
                                    sparse_kernel_density=0)
    x, y = _batch(1)
    _step(model, opt, x, y)
    fold_masks(model)
    assert not any(k.endswith('_mask') for k in model.state_dict())
    _step(model, opt, x, y)  # the sparsifier is detached: a plain step
    assert sp.step == 1
    with pytest.raises(RuntimeError, match='fold_masks|removed'):
        sp.update()
    # sparsify again
    sp2 = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.5, update_interval=1, total_steps=100,
                                     sparse_kernel_density=0)
    _step(model, opt, x, y)
    assert sp2.step == 1


def test_sparsify_again_after_remove():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, update_interval=1, total_steps=100,
                                    sparse_kernel_density=0)
    x, y = _batch(1)
    _step(model, opt, x, y)
    with pytest.raises(ValueError, match='fold_masks'):
        timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.5, total_steps=100)
    sp.remove()
    _step(model, opt, x, y)
    assert sp.step == 1
    fold_masks(model)
    sp2 = timm_dst.create_sparsifier(model, opt, 'rigl', sparsity=0.5, update_interval=1, total_steps=100,
                                     sparse_kernel_density=0)
    _step(model, opt, x, y)
    assert sp2.step == 1 and len(sp2.history) == 2


# --------------------------------------------------------------------------------------------------------------------
# Also: optimizer state that cannot be reset
def test_factored_optimizer_state_warns_once():
    from timm.optim import Adafactor
    model = _mlp()
    opt = Adafactor(model.parameters(), lr=1e-2)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, update_interval=1, total_steps=100,
                                    sparse_kernel_density=0)
    x, y = _batch(1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        for _ in range(3):
            _step(model, opt, x, y)
    msgs = [str(w.message) for w in rec if 'cannot be reset' in str(w.message)]
    assert len(msgs) == 1 and 'exp_avg_sq_row' in msgs[0]
    for t in sp.targets:  # masked weights stay zero all the same
        assert not t.param[~t.mask].any()


# --------------------------------------------------------------------------------------------------------------------
# more copies and conversions after attaching
def test_state_dict_round_trip_into_fresh_copy():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, update_interval=1, total_steps=100,
                               sparse_kernel_density=0)
    x, y = _batch(1)
    for _ in range(3):
        _step(model, opt, x, y)
    other = _mlp(5)
    timm_dst.create_sparsifier(other, torch.optim.SGD(other.parameters(), lr=0.1), 'set', sparsity=0.8,
                               total_steps=100, sparse_kernel_density=0)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(x), model(x))


def test_functional_call_after_attaching():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, total_steps=100, sparse_kernel_density=0)
    x, _ = _batch(1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    out = torch.func.functional_call(model, params, (x,))
    assert torch.allclose(out, model(x))


# --------------------------------------------------------------------------------------------------------------------
# more bad input: files, non-finite initial scores, an empty schedule
@pytest.mark.parametrize('content', [b'', b'garbage bytes', b'PK\x03\x04 truncated zip'])
def test_unreadable_files_name_the_argument(tmp_path, content):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(content)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match='lth_trained_state'):
        timm_dst.create_sparsifier(model, opt, 'lth', sparsity=0.8, lth_trained_state=str(bad))
    with pytest.raises(ValueError, match='snip_batches'):
        timm_dst.create_sparsifier(model, opt, 'snip', sparsity=0.8, snip_batches=str(bad))
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_nonfinite_initial_scores_are_refused():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch(1)
    x[0, 0] = math.nan
    with pytest.raises(ValueError, match='not finite'):
        timm_dst.create_sparsifier(model, opt, 'snip', sparsity=0.8, snip_batches=(x, y))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    trained['3.weight'][0, 0] = math.nan
    with pytest.raises(ValueError, match='not finite'):
        timm_dst.create_sparsifier(model, opt, 'lth', sparsity=0.8, lth_trained_state=trained)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_update_end_before_start_is_refused():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match='update_end'):
        timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, total_steps=100, update_start=0.8,
                                   update_end=0.5)


@pytest.mark.parametrize('opt_name', ['adabelief', 'rmsproptf', 'adafactor', 'lamb', 'adamp'])
def test_masked_weights_stay_zero_under_timm_optimizers(opt_name):
    from timm.optim import create_optimizer_v2
    model = _mlp()
    opt = create_optimizer_v2(model, opt_name, lr=1e-2, weight_decay=0.01)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, update_interval=2, total_steps=100,
                                    sparse_kernel_density=0)
    x, y = _batch(1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for _ in range(5):
            _step(model, opt, x, y)
    for i, t in enumerate(sp.targets):
        assert int(t.mask.sum()) == sp.counts[i]
        assert not t.param[~t.mask].any()


def test_whole_model_pickle_round_trip():
    import io
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, total_steps=10, sparse_kernel_density=0)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x, _ = _batch(1)
    assert torch.equal(loaded(x), model(x))


def test_damaged_sparsifier_state_is_refused():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, total_steps=10)
    state = sp.state_dict()
    del state['masks']
    with pytest.raises(ValueError, match='masks'):
        sp.load_state_dict(state)


def test_model_load_state_dict_updates_the_sparsifier():
    """Masks loaded with model.load_state_dict (not sp.load_state_dict): counts and R_s follow them."""
    src = _mlp()
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    timm_dst.create_sparsifier(src, opt, 'set', sparsity=0.8, update_interval=1, total_steps=100, distribution='er',
                               sparse_kernel_density=0)
    x, y = _batch(1)
    for _ in range(3):
        _step(src, opt, x, y)
    dst = _mlp(3)
    opt2 = torch.optim.SGD(dst.parameters(), lr=0.1, momentum=0.9)
    sp = timm_dst.create_sparsifier(dst, opt2, 'set', sparsity=0.5, update_interval=1, total_steps=100,
                                    distribution='uniform', seed=9, sparse_kernel_density=0)
    _step(dst, opt2, x, y)
    dst.load_state_dict(src.state_dict())
    assert sp.counts == [int(t.mask.sum()) for t in sp.targets]
    assert all(bool((e | ~t.mask).all()) for e, t in zip(sp.explored, sp.targets))
    for t in sp.targets:
        assert not opt2.state[t.param]['momentum_buffer'][~t.mask].any()
    _step(dst, opt2, x, y)
    assert sp.counts == [int(t.mask.sum()) for t in sp.targets]


_ALL = ['dense', 'static', 'set', 'rigl', 'snfs', 'dsr', 'set-itop', 'rigl-itop', 'snip', 'lth', 'gmp',
        'snip-set-itop', 'lth-set-itop']


@pytest.mark.parametrize('method', _ALL)
def test_skipped_steps_leave_no_trace_for_every_method(method):
    """GradScaler skips two overflowing steps (one at an update step): no warning, exact counts, finite state, and
    (except SNFS, whose momentum mixes gradient scales) the same masks as a run that never saw the bad batches."""
    def run(skip: bool):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _batch(1)
        extra = {'snip': dict(snip_batches=(x, y)), 'snip-set-itop': dict(snip_batches=(x, y)),
                 'lth': dict(lth_rewind_state=_mlp(4).state_dict()),
                 'lth-set-itop': dict(lth_rewind_state=_mlp(4).state_dict()),
                 'gmp': dict(update_end=6, update_start=0)}.get(method, {})
        sp = timm_dst.create_sparsifier(model, opt, method, sparsity=0.8, update_interval=2, total_steps=10,
                                        sparse_kernel_density=0, **extra)
        scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter('always')
            for i in range(8):
                if skip and i in (1, 4):
                    _step(model, opt, *_batch(7), scaler, poison='loss' if i == 1 else 'bias')
                _step(model, opt, x, y, scaler)
        assert _nonfinite_warnings(rec) == []
        return sp, model

    sp, model = run(True)
    ref, _ = run(False)
    assert sp.step == ref.step == (8 if sp.method.attaches else 0)  # dense attaches no hook at all
    assert [h['step'] for h in sp.history] == [h['step'] for h in ref.history]
    if sp.method.attaches:
        for i, t in enumerate(sp.targets):
            assert int(t.mask.sum()) == sp.counts[i]
            assert not t.param[~t.mask].any()
    for m in getattr(sp.method, 'momentum', None) or []:
        assert torch.isfinite(m).all()
    if method != 'snfs' and sp.method.attaches:
        assert all(torch.equal(a, b) for a, b in zip(_masks(sp), _masks(ref)))


def test_attach_masks_is_all_or_nothing():
    from timm_dst.core.masks import attach_masks
    model = _mlp()
    before = _state(model)
    good = torch.rand(48, 64) > 0.5
    bad = torch.ones(3, 3, dtype=torch.bool)  # wrong shape for the second layer
    with pytest.raises(ValueError, match='shape'):
        attach_masks([(model[1], 'weight', good), (model[3], 'weight', bad)])
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert isinstance(model[1].weight, nn.Parameter)
