"""The invariants of docs/design.md, for every method, on an MLP, a timm CNN and a timm ViT."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import check_exact_resume, check_export, make_tiny, record_updates
from conftest import train_steps as _train

import timm_dst

METHODS = [n for n in timm_dst.list_methods() if timm_dst.get_method_info(n).cls.__module__.startswith('timm_dst.')]
# from the registry's capabilities
MOVING_BUDGETS = {n for n in METHODS if timm_dst.get_method_info(n).moves_budget}  # the global total stays exact
SHRINKING = {'gmp'}  # the budget follows the cubic schedule down to the target
STATIC = {n for n in METHODS if timm_dst.get_method_info(n).attaches and not timm_dst.get_method_info(n).explores}


def _make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == 'sgd':
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)


def _state_tensors(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v) and v.shape == p.shape}


class InvariantChecker:
    """Registered after the sparsifier's hook: inspects masks, weights and optimizer state after every step."""

    def __init__(self, sp: timm_dst.Sparsifier, opt: torch.optim.Optimizer, method: str):
        self.sp, self.opt, self.method = sp, opt, method
        self.initial_counts = list(sp.counts)
        self.total = sum(sp.counts)
        self.prev_masks = [t.mask.clone() for t in sp.targets]
        self.prev_rs = sp.itop_rate
        self.prev_explored = [e.clone() for e in sp.explored]
        self.n_updates = 0
        self.n_grown = 0
        self.budgets_moved = False
        self.n_kept_in_place = 0
        opt.register_step_post_hook(self)
        apply = sp._writer.apply_update

        def checked(optimizer, targets, explored, counts, explored_counts, drops, grows, sharded):
            # a position dropped and regrown in the same update never leaves the mask: weight and state unchanged
            again = [g[torch.isin(g, d)] for d, g in zip(drops, grows)]
            before = [(t.param.detach().reshape(-1)[a].clone(),
                       {k: v.reshape(-1)[a].clone() for k, v in _state_tensors(optimizer, t.param).items()})
                      for t, a in zip(targets, again)]
            apply(optimizer, targets, explored, counts, explored_counts, drops, grows, sharded)
            for t, a, (w, state) in zip(targets, again, before):
                self.n_kept_in_place += a.numel()
                assert t.mask.reshape(-1)[a].all() and torch.equal(t.param.detach().reshape(-1)[a], w), t.name
                for k, v in _state_tensors(optimizer, t.param).items():
                    assert torch.equal(v.reshape(-1)[a], state[k]), (t.name, k)

        sp._writer.apply_update = checked

    def __call__(self, opt, args, kwargs):
        sp = self.sp
        for i, t in enumerate(sp.targets):
            mask, orig = t.mask, t.param
            assert mask.dtype == torch.bool
            # 1. exact counts
            assert int(mask.sum()) == sp.counts[i], t.name
            if self.method in SHRINKING:
                assert sp.counts[i] <= self.initial_counts[i], t.name
            elif self.method not in MOVING_BUDGETS:
                assert sp.counts[i] == self.initial_counts[i], t.name
            # 2. no stale values: zero in weight_orig and in the effective weight
            assert not orig[~mask].any(), t.name
            assert not getattr(t.module, t.param_name)[~mask].any(), t.name
            # optimizer state at masked positions is zero
            for key, v in _state_tensors(self.opt, orig).items():
                assert not v[~mask].any(), (t.name, key)
            grown = mask & ~self.prev_masks[i]
            self.n_grown += int(grown.sum())
            # 3. grown connections start at zero, with zero optimizer state (checked right after the update)
            assert not orig[grown].any(), t.name
            for key, v in _state_tensors(self.opt, orig).items():
                assert not v[grown].any(), (t.name, key)
            # 5. per-tensor R_s never decreases
            assert (sp.explored[i] >= self.prev_explored[i]).all()
            assert (sp.explored[i] >= mask).all()
        if self.method in SHRINKING:
            assert sum(sp.counts) <= self.total
            self.total = sum(sp.counts)
        else:
            assert sum(sp.counts) == self.total
        assert sp.itop_rate >= self.prev_rs - 1e-12
        if sp.counts != self.initial_counts:
            self.budgets_moved = True
        if any(not torch.equal(t.mask, m) for t, m in zip(sp.targets, self.prev_masks)):
            self.n_updates += 1
        self.prev_masks = [t.mask.clone() for t in sp.targets]
        self.prev_explored = [e.clone() for e in sp.explored]
        self.prev_rs = sp.itop_rate




@pytest.mark.parametrize('opt_name', ['sgd', 'adamw'])
@pytest.mark.parametrize('method', METHODS)
def test_invariants(tiny_kind: str, method: str, opt_name: str):
    model, x, y = make_tiny(tiny_kind)
    opt = _make_optimizer(opt_name, model)
    trained = model.state_dict()  # LTH: the current weights stand in for a trained dense model
    kwargs = {'dsr': dict(dsr_np=2000), 'gmp': dict(update_end=10),
              'snip': dict(snip_batches=(x, y)), 'snip-set-itop': dict(snip_batches=(x, y)),
              'lth': dict(lth_trained_state=trained), 'lth-set-itop': dict(lth_trained_state=trained)}.get(method, {})
    kwargs = {'update_end': 40, **kwargs}
    sp = timm_dst.create_sparsifier(model, opt, method=method, sparsity=0.9, update_interval=2, total_steps=40,
                                    seed=3, **kwargs)
    if method == 'dense':
        assert sp.density == 1.0 and sp.itop_rate == 1.0
        assert not any(k.endswith('_mask') for k in model.state_dict())
        _train(model, opt, x, y, 2)
        return
    total = sum(t.numel for t in sp.targets)
    if method not in SHRINKING:
        assert sum(sp.counts) == round(0.1 * total)
    assert sp.itop_rate == pytest.approx(sp.density)  # 5. R_s starts at the density
    checker = InvariantChecker(sp, opt, method)
    _train(model, opt, x, y, 12)
    assert sp.step == 12
    if method in SHRINKING:
        assert sum(sp.counts) == round(0.1 * total)  # the cubic schedule ended at step 10
    elif method in STATIC:
        assert checker.n_updates == 0
        assert sp.itop_rate == pytest.approx(sp.density)
    else:
        assert checker.n_updates >= 3, 'topology never changed'
        assert checker.n_grown > 0, 'nothing grew: the grown-weight checks checked nothing'
        assert sp.itop_rate > sp.density
    if method == 'dsr':
        assert checker.budgets_moved, 'DSR should move budget between tensors'
        assert checker.n_kept_in_place == 0, 'DSR never regrows where it just dropped'


def test_set_drops_smallest_magnitude():
    model, x, y = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.9, update_interval=1000,
                                    prune_rate=0.3, prune_rate_schedule='constant', seed=0)
    _train(model, opt, x, y, 3)
    before = [(t.mask.clone(), t.param.detach().clone(), opt.state[t.param]['momentum_buffer'].clone())
              for t in sp.targets]
    updates = record_updates(sp)
    sp.update()
    (drops, grows), = updates
    n_both = 0
    for (mask, w, mom), t, count, drop, grow in zip(before, sp.targets, sp.counts, drops, grows):
        k = round(0.3 * count)
        assert drop.numel() == grow.numel() == k  # exactly k dropped and k grown
        dropped = torch.zeros(mask.numel(), dtype=torch.bool)
        dropped[drop] = True
        dropped = dropped.view_as(mask)
        assert bool(mask[dropped].all())  # only active weights are dropped ...
        if (mask & ~dropped).any():  # ... and every dropped weight is no larger than every kept one
            assert w[dropped].abs().max() <= w[mask & ~dropped].abs().min()
        both = torch.isin(grow, drop)
        n_both += int(both.sum())
        w_now, m_now = t.param.detach().reshape(-1), opt.state[t.param]['momentum_buffer'].reshape(-1)
        gone, new, again = drop[~torch.isin(drop, grow)], grow[~both], grow[both]
        assert not t.mask.reshape(-1)[gone].any() and not w_now[gone].any() and not m_now[gone].any()
        assert t.mask.reshape(-1)[new].all() and not w_now[new].any() and not m_now[new].any()  # grown at zero
        # dropped and regrown in the same update: never left the mask, so its weight and momentum stay
        assert t.mask.reshape(-1)[again].all()
        assert torch.equal(w_now[again], w.reshape(-1)[again]) and torch.equal(m_now[again], mom.reshape(-1)[again])
    assert n_both > 0  # the classifier is dense enough that random growth lands on just-dropped positions


def test_ties_at_zero_never_keep_inactive():
    model, x, y = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.95, prune_rate=0.5,
                                    prune_rate_schedule='constant', update_interval=1000)
    with torch.no_grad():
        for t in sp.targets:
            t.param.zero_()  # every active weight ties with every inactive one at |w| = 0
    for i, t in enumerate(sp.targets):
        drop, kept = sp._drop_lowest(i, sp.counts[i] // 2)
        assert t.mask.view(-1)[drop].all() and drop.unique().numel() == drop.numel()
        assert (kept <= t.mask).all()
        assert int(kept.sum()) == sp.counts[i] - sp.counts[i] // 2


def test_rigl_grows_largest_dense_gradient():
    model, x, y = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl', sparsity=0.9, update_interval=2, total_steps=100,
                                    prune_rate=0.2, prune_rate_schedule='constant', seed=0)
    _train(model, opt, x, y, 1)
    old = [t.mask.clone() for t in sp.targets]
    # the dense gradient the update will use, computed independently at the weights of step 2's forward
    ref = timm.create_model('itop_mlp', num_classes=10, in_chans=1, img_size=8)
    ref.load_state_dict(timm_dst.export_state_dict(model))
    F.cross_entropy(ref(x), y).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    _train(model, opt, x, y, 1)  # step 2: update
    n_grown = 0
    for t, m_old in zip(sp.targets, old):
        g = ref_grads[t.name].abs()
        grown = t.mask & ~m_old
        not_grown = ~t.mask & ~m_old
        n_grown += int(grown.sum())
        if grown.any():  # (a tensor may regrow exactly what it dropped)
            assert g[grown].min() >= g[not_grown].max() - 1e-6
    assert n_grown > 0, 'nothing grew: the check checked nothing'


def test_rs_static_stays_at_density_and_snfs_totals():
    model, x, y = make_tiny('cnn')
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='static', sparsity=0.8)
    _train(model, opt, x, y, 4)
    assert sp.itop_rate == pytest.approx(sp.density) == pytest.approx(0.2, abs=1e-4)
    assert all(e == c for e, c in zip(sp.explored_counts, sp.counts))


def test_grow_unexplored_first_raises_rs():
    rates = {}
    for flag in (False, True):
        model, x, y = make_tiny('mlp')
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.5, update_interval=1, total_steps=100,
                                        prune_rate=0.5, prune_rate_schedule='constant', grow_unexplored_first=flag)
        _train(model, opt, x, y, 3)
        rates[flag] = sp.itop_rate
    # with room to explore, SET+ grows only never-active positions: R_s rises by exactly the grown count
    assert rates[True] > rates[False]
    assert rates[True] == pytest.approx(1.0, abs=0.01)  # 0.5 + 3 * 0.25 > 1: everything explored


@pytest.mark.parametrize('method', ['set', 'rigl', 'snfs', 'dsr'])
def test_exact_resume(method: str):
    def build():
        model, _, _ = make_tiny('cnn')
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return model, opt, timm_dst.create_sparsifier(model, opt, method=method, sparsity=0.9, update_interval=2,
                                                      total_steps=20, seed=5)

    _, x, y = make_tiny('cnn')
    check_exact_resume(build, x, y, before=9, after=7)


def test_state_dict_round_trip(tiny_kind: str):
    model, x, y = make_tiny(tiny_kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl-itop', sparsity=0.9, update_interval=2, total_steps=20)
    _train(model, opt, x, y, 5)
    state = sp.state_dict()
    model2, _, _ = make_tiny(tiny_kind, seed=9)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sp2 = timm_dst.create_sparsifier(model2, opt2, method='rigl-itop', sparsity=0.9, update_interval=2,
                                     total_steps=20)
    sp2.load_state_dict(state)
    assert sp2.step == sp.step and sp2.counts == sp.counts and sp2.explored_counts == sp.explored_counts
    assert sp2.summary() == sp.summary()
    for t1, t2 in zip(sp.targets, sp2.targets):
        assert torch.equal(t1.mask, t2.mask)
        assert not t2.param[~t2.mask].any()


def test_export_loads_strictly_into_plain_timm(tiny_kind: str):
    model, x, y = make_tiny(tiny_kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.9, update_interval=2, total_steps=20)
    _train(model, opt, x, y, 5)
    exported = check_export(model, tiny_kind, x)
    zeros = sum(int((exported[t.name] == 0).sum()) for t in sp.targets)
    assert zeros >= sum(t.numel for t in sp.targets) - sum(sp.counts)


def test_export_strips_wrapper_prefixes():
    model, x, _ = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    timm_dst.create_sparsifier(model, opt, method='static', sparsity=0.5)
    wrapped = {'module._orig_mod.' + k: v for k, v in model.state_dict().items()}
    exported = timm_dst.export_state_dict(wrapped)
    assert set(exported) == set(timm_dst.export_state_dict(model))


def test_deepcopy_and_ema_compatible():
    from timm.utils import ModelEmaV3
    model, x, y = make_tiny('cnn')
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.9, update_interval=1, total_steps=10)
    ema = ModelEmaV3(model, decay=0.9)
    _train(model, opt, x, y, 2)
    ema.update(model)
    for t in sp.targets:
        ema_mask = ema.module.get_buffer(t.name + '_mask')
        assert ema_mask.dtype == torch.bool and torch.equal(ema_mask, t.mask)
    # the averaged weight_orig is not zero at positions dropped since: the EMA model's forward still masks them
    with torch.no_grad():
        ema.module(x)
    stale = 0
    for t in sp.targets:
        mod_name, p_name = t.name.rsplit('.', 1)
        ema_mod = ema.module.get_submodule(mod_name)
        masked = ~ema_mod.get_buffer(p_name + '_mask')
        stale += int(getattr(ema_mod, p_name + '_orig')[masked].ne(0).sum())
        assert not getattr(ema_mod, p_name)[masked].any()
    assert stale > 0


def test_weight_is_the_trained_parameter_and_functional_call_overrides_it():
    """On the controlled model ``module.weight`` is ``weight_orig`` itself (no second registered parameter); copies get
    their own; ``torch.func.functional_call`` still substitutes the parameters it is given."""
    import copy
    model, x, y = make_tiny('cnn')
    n_params = len(list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.9, update_interval=1, total_steps=10)
    _train(model, opt, x, y, 2)  # two topology updates
    assert len(list(model.parameters())) == n_params
    for t in sp.targets:
        assert getattr(t.module, t.param_name) is t.param
        assert t.param_name not in t.module._parameters
    twin = copy.deepcopy(model)
    for t in sp.targets:
        sub = twin.get_submodule(t.name.rsplit('.', 1)[0])
        assert getattr(sub, t.param_name) is getattr(sub, t.param_name + '_orig') is not t.param
    model.eval()
    params = {k: v.detach() * 2 for k, v in model.named_parameters()}
    doubled = copy.deepcopy(model)
    with torch.no_grad():
        for p in doubled.parameters():
            p.mul_(2)
        torch.testing.assert_close(torch.func.functional_call(model, params, (x,)), doubled(x))
        torch.testing.assert_close(model(x), twin.eval()(x))  # the original parameters are back


def test_non_finite_gradient_skips_update():
    model, x, y = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.9, update_interval=1, total_steps=10)
    F.cross_entropy(model(x), y).backward()
    sp.targets[0].param.grad[0, 0] = float('nan')
    before = [t.mask.clone() for t in sp.targets]
    with pytest.warns(UserWarning, match='non-finite'):
        sp.update()
    assert all(torch.equal(b, t.mask) for b, t in zip(before, sp.targets))


def test_only_optimizer_steps_count():
    model, x, y = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl', sparsity=0.9, update_interval=2, total_steps=10)
    for _ in range(3):  # micro-steps: backward without an optimizer step
        F.cross_entropy(model(x), y).backward()
    assert sp.step == 0
    opt.step()
    assert sp.step == 1


def test_update_end_freezes_topology():
    model, x, y = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl', sparsity=0.9, update_interval=1, total_steps=8)
    assert sp.schedule.end == 6  # rigl's official 75%
    _train(model, opt, x, y, 6)
    frozen = [t.mask.clone() for t in sp.targets]
    _train(model, opt, x, y, 2)
    assert all(torch.equal(f, t.mask) for f, t in zip(frozen, sp.targets))
    assert len(sp.history) == 1 + 6


def test_summary_rows(tiny_kind: str):
    model, _, _ = make_tiny(tiny_kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = timm_dst.create_sparsifier(model, opt, method='set-itop', sparsity=0.9, total_steps=100)
    rows = sp.summary()
    assert [r['name'] for r in rows] == [t.name for t in sp.targets]
    assert sum(r['density'] * r['numel'] for r in rows) == pytest.approx(sum(sp.counts))
    assert all(set(r) == {'name', 'shape', 'numel', 'density', 'explored', 'structure'} for r in rows)
    names = {n for n, _ in model.named_parameters()}
    assert not any(('pos_embed' in r['name'] or 'cls_token' in r['name'] or 'norm' in r['name']) for r in rows)
    assert all(r['name'] + '_orig' in names for r in rows)


@pytest.mark.parametrize('kind', ['rand', 'sorted', 'ties', 'mostly_blocked'])
def test_topk_indices_is_exact(kind: str):
    from timm_dst.core.controller import topk_indices
    g = torch.Generator().manual_seed(0)
    n, k = 300_000, 2_000
    x = torch.rand(n, generator=g)
    if kind == 'sorted':  # a strided sample of a sorted tensor is maximally unrepresentative
        x = torch.sort(x).values
    elif kind == 'ties':
        x = (x * 4).floor()
    elif kind == 'mostly_blocked':
        x[torch.rand(n, generator=g) < 0.995] = -float('inf')
    idx = topk_indices(x, k)
    assert idx.numel() == k == idx.unique().numel()
    torch.testing.assert_close(torch.sort(x[idx]).values, torch.sort(torch.topk(x, k).values).values)


@pytest.mark.parametrize('density', [0.0, 0.02, 0.3, 0.6, 0.97, 1.0])
def test_masked_grad_equals_where_and_follows_mask_changes(density: float):
    """The CPU gradient mask (cached active indices or float mask) gives exactly ``where(mask, grad, 0)``, in place,
    also after the mask changes."""
    from timm_dst.core.masks import DSTMask
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(37, 53, generator=gen) < density
    method = DSTMask(mask)

    def masked(g, m):
        return method.mask_grad_(g.clone(), m)

    for _ in range(2):
        grad = torch.randn(37, 53, generator=gen)
        buf = grad.clone()
        out = method.mask_grad_(buf, mask)
        assert torch.equal(out, torch.where(mask, grad, 0.0))
        assert out.data_ptr() == buf.data_ptr() and torch.equal(buf, out)  # in place
    mask.view(-1)[:100] = ~mask.view(-1)[:100]  # in place (a topology update): the cache must notice
    grad = torch.randn(37, 53, generator=gen)
    assert torch.equal(masked(grad, mask), torch.where(mask, grad, 0.0))
    other = mask.clone()  # a replaced buffer (module.to()): recomputed too
    other.view(-1)[-50:] = True
    assert torch.equal(masked(grad, other), torch.where(other, grad, 0.0))
    cl_grad = torch.randn(4, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    cl_mask = torch.rand(4, 3, 5, 5, generator=gen) < density
    assert torch.equal(masked(cl_grad, cl_mask), torch.where(cl_mask, cl_grad, 0.0))
