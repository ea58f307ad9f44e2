"""Baselines through the same hooks: SNIP, LTH (one-shot, rewinding), GMP (cubic schedule), the -set-itop combos."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import check_exact_resume, check_export, make_tiny
from conftest import train_steps as _train

import timm_dst
from timm_dst.methods.gmp import cubic_sparsity
from timm_dst.methods.lth import capture_weights, lottery_ticket, save_weights


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a machine shared with other test runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




def _global_topk(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Independent global top-k: threshold at the k-th largest score (random floats: no ties)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    threshold = torch.sort(flat, descending=True).values[k - 1]
    return {n: s >= threshold for n, s in scores.items()}


def _target_names(model) -> list[str]:
    return [t.name for t in timm_dst.find_targets(model)]


# ----------------------------------------------------------------------------------------------------------------
# SNIP
@pytest.mark.parametrize('kind', ['mlp', 'cnn'])
def test_snip_mask_is_global_topk_of_sensitivity(kind: str):
    model, x, y = make_tiny(kind)
    ref = copy.deepcopy(model)
    names = _target_names(ref)
    params = dict(ref.named_parameters())
    F.cross_entropy(ref(x), y).backward()
    scores = {n: (params[n].grad * params[n]).abs().detach() for n in names}
    k = round(0.1 * sum(s.numel() for s in scores.values()))
    expected = _global_topk(scores, k)

    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='snip', sparsity=0.9, snip_batches=(x, y))
    assert sum(sp.counts) == k and not sp.method.explores
    for t in sp.targets:
        assert torch.equal(t.mask, expected[t.name]), t.name
        # weights unchanged (only masked), no gradient left behind
        assert torch.equal(t.param.detach(), before[t.name] * t.mask)
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    for key, value in before.items():
        if key not in names:
            assert torch.equal(after[key], value), key  # biases, norms, BN running stats
    assert torch.equal(torch.get_rng_state(), rng)  # SNIP does not shift the run's random stream
    counts = list(sp.counts)
    _train(model, opt, x, y, 3)
    assert sp.counts == counts and sp.itop_rate == pytest.approx(sp.density)  # static afterwards


def test_snip_several_batches_from_a_loader():
    model, _, _ = make_tiny('mlp')
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(
        torch.randn(12, 1, 8, 8, generator=g), torch.randint(0, 10, (12,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    for i, (x, y) in enumerate(loader):
        if i == 2:
            break
        F.cross_entropy(ref(x), y).backward()
    names = _target_names(ref)
    expected = _global_topk({n: (params[n].grad * params[n]).abs().detach() for n in names},
                            round(0.2 * sum(params[n].numel() for n in names)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = timm_dst.create_sparsifier(model, opt, method='snip', sparsity=0.8, snip_batches=loader, snip_num_batches=2)
    for t in sp.targets:
        assert torch.equal(t.mask, expected[t.name]), t.name
    assert sp.method.batches is None  # the loader is not kept


def test_snip_needs_batches():
    model, _, _ = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match='snip_batches'):
        timm_dst.create_sparsifier(model, opt, method='snip', sparsity=0.9)
    with pytest.raises(ValueError, match='snip_loss_fn'):
        timm_dst.create_sparsifier(model, opt, method='snip', sparsity=0.9, snip_loss_fn='no_such_loss')


# ----------------------------------------------------------------------------------------------------------------
# LTH
def test_lth_same_process_prunes_trained_and_rewinds_to_init():
    model, x, y = make_tiny('cnn')
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    init = capture_weights(model)
    _train(model, opt, x, y, 4)  # the dense phase
    trained = capture_weights(model)
    names = _target_names(model)
    expected = _global_topk({n: trained[n].abs() for n in names}, round(0.1 * sum(trained[n].numel() for n in names)))
    assert any(not torch.equal(init[k], trained[k]) for k in init if 'running' in k)  # BN stats moved

    sp = lottery_ticket(model, opt, rewind_state=init, sparsity=0.9)
    assert not opt.state  # momentum of the dense phase is gone
    for t in sp.targets:
        assert torch.equal(t.mask, expected[t.name]), t.name
        assert torch.equal(t.param.detach(), init[t.name] * t.mask), t.name  # survivors at their initial values
    state = model.state_dict()
    for key, value in init.items():
        if key not in names:
            assert torch.equal(state[key], value), key  # biases, norms and buffers rewound too
    counts = list(sp.counts)
    _train(model, opt, x, y, 3)
    assert sp.counts == counts and sp.itop_rate == pytest.approx(sp.density)


def test_lth_two_runs_from_files_late_rewinding(tmp_path):
    # run 1: dense, saving the step-k rewind point and the trained weights (timm-dst-train checkpoint layout)
    model, x, y = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    timm_dst.create_sparsifier(model, opt, method='dense')
    _train(model, opt, x, y, 2)
    save_weights(model, tmp_path / 'rewind.pth')
    step_k = capture_weights(model)
    _train(model, opt, x, y, 4)
    torch.save({'model': model.state_dict(), 'epoch': 1}, tmp_path / 'last.pth.tar')
    trained = capture_weights(model)
    # run 2: a fresh model of another seed, pruned by the trained weights and rewound to step k
    model2, _, _ = make_tiny('mlp', seed=7)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sp = timm_dst.create_sparsifier(model2, opt2, method='lth', sparsity=0.95,
                                    lth_trained_state=str(tmp_path / 'last.pth.tar'),
                                    lth_rewind_state=str(tmp_path / 'rewind.pth'))
    names = [t.name for t in sp.targets]
    expected = _global_topk({n: trained[n].abs() for n in names}, sum(sp.counts))
    assert sum(sp.counts) == round(0.05 * sum(trained[n].numel() for n in names))
    for t in sp.targets:
        assert torch.equal(t.mask, expected[t.name]), t.name
        assert torch.equal(t.param.detach(), step_k[t.name] * t.mask), t.name
    assert 'rewind.pth' in repr(sp.method)


def test_lth_bad_input():
    model, _, _ = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match='lth_trained_state'):
        timm_dst.create_sparsifier(model, opt, method='lth', sparsity=0.9)
    other, _, _ = make_tiny('cnn')
    with pytest.raises(ValueError, match='lth_trained_state'):
        timm_dst.create_sparsifier(model, opt, method='lth', sparsity=0.9, lth_trained_state=other.state_dict())


# ----------------------------------------------------------------------------------------------------------------
# GMP
@pytest.mark.parametrize('end,is_global', [(14, False), (13, False), (14, True)])
def test_gmp_follows_cubic_schedule_exactly(end: int, is_global: bool):
    model, x, y = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start, interval, sparsity = 2, 3, 0.9
    sp = timm_dst.create_sparsifier(model, opt, method='gmp', sparsity=sparsity, update_interval=interval,
                                    update_start=start, update_end=end, gmp_global=is_global)
    numels = [t.numel for t in sp.targets]
    total = sum(numels)
    assert sp.density == 1.0 and all(t.mask.all() for t in sp.targets)  # dense start (s_i = 0)
    final = timm_dst.layer_counts([t.shape for t in sp.targets], sparsity, 'uniform')
    # the first update at t0 itself (where the cubic schedule is still at s_i), then every ΔT, and one at the end
    update_steps = {s for s in range(max(start, 1), end + 1) if (s - start) % interval == 0} | {end}
    seen, prev = [], [t.mask.clone() for t in sp.targets]

    def check(o, args, kwargs):
        t = sp.step
        decay = (1 - min(max((t - start) / (end - start), 0), 1)) ** 3
        if t in update_steps:
            if is_global:
                assert sum(sp.counts) == sum(final) + round((total - sum(final)) * decay), t
            else:
                assert sp.counts == [f + round((n - f) * decay) for n, f in zip(numels, final)], t
            seen.append(t)
            assert abs((1 - sp.density) - cubic_sparsity(t, 0.0, sparsity, start, end)) <= len(numels) / total
        for i, tgt in enumerate(sp.targets):
            assert int(tgt.mask.sum()) == sp.counts[i]
            assert not (tgt.mask & ~prev[i]).any()  # pruned weights never regrow
            assert not tgt.param[~tgt.mask].any()
            prev[i] = tgt.mask.clone()

    opt.register_step_post_hook(check)
    _train(model, opt, x, y, end + 3)
    assert sorted(seen) == sorted(update_steps)
    assert sp.counts == final or (is_global and sum(sp.counts) == sum(final))
    assert sp.density == pytest.approx(1 - sparsity, abs=1 / total)
    assert len(sp.history) == 1 + len(update_steps)


def test_gmp_initial_sparsity_and_bad_input():
    model, _, _ = make_tiny('mlp')
    before = {k: v.abs() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = timm_dst.create_sparsifier(model, opt, method='gmp', sparsity=0.9, gmp_initial_sparsity=0.5,
                                    update_interval=2, update_end=10)
    assert sp.counts == timm_dst.layer_counts([t.shape for t in sp.targets], 0.5, 'uniform')
    for t in sp.targets:  # the largest-magnitude weights survive
        w = before[t.name]
        assert w[t.mask].min() >= w[~t.mask].max(), t.name
    for kwargs, arg in [(dict(), 'total_steps'), (dict(update_end=10, gmp_initial_sparsity=0.95), 'gmp_initial'),
                        (dict(update_end=10, update_start=10), 'update_end')]:
        model, _, _ = make_tiny('mlp')
        with pytest.raises(ValueError, match=arg):
            timm_dst.create_sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), method='gmp',
                                       sparsity=0.9, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# SNIP / LTH + SET-ITOP
@pytest.mark.parametrize('base', ['snip', 'lth'])
def test_combined_start_from_base_mask_then_explore(base: str):
    model, x, y = make_tiny('mlp')
    init = capture_weights(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, x, y, 3)
    trained = capture_weights(model)
    extra = dict(snip_batches=[(x, y)]) if base == 'snip' else dict(lth_trained_state=trained, lth_rewind_state=init)

    def build(method: str):
        m, _, _ = make_tiny('mlp', seed=5)
        m.load_state_dict(init)
        o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        return m, o, timm_dst.create_sparsifier(m, o, method=method, sparsity=0.9, total_steps=30, **extra)

    _, _, sp_base = build(base)
    model2, opt2, sp = build(f'{base}-set-itop')
    assert sp.schedule.interval == 1500 and sp.prune_rate_initial == 0.5 and sp.prune_rate_schedule == 'cosine'
    for t1, t2 in zip(sp_base.targets, sp.targets):
        assert torch.equal(t1.mask, t2.mask), t2.name
        assert torch.equal(t1.param, t2.param), t2.name
    counts, rates = list(sp.counts), [sp.itop_rate]
    assert rates[0] == pytest.approx(sp.density)
    sp.schedule.interval = 2  # explore quickly in the test
    for _ in range(4):
        _train(model2, opt2, x, y, 2)
        rates.append(sp.itop_rate)
    assert sp.counts == counts  # SET keeps each tensor's SNIP / LTH count exactly
    assert all(b > a for a, b in zip(rates, rates[1:]))


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and exports
@pytest.mark.parametrize('method', ['snip', 'lth', 'gmp', 'snip-set-itop', 'lth-set-itop'])
def test_exact_resume_and_export(method: str):
    base, x, y = make_tiny('cnn')
    init = capture_weights(base)
    extra = {'snip': dict(snip_batches=(x, y)), 'lth': dict(lth_trained_state=init),
             'gmp': dict(update_start=1, update_end=12)}[method.split('-')[0]]

    def build():
        model, _, _ = make_tiny('cnn', seed=1)
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        sp = timm_dst.create_sparsifier(model, opt, method=method, sparsity=0.9, update_interval=2, total_steps=16,
                                        seed=5, **extra)
        return model, opt, sp

    sp, sp2 = check_exact_resume(build, x, y, before=7, after=7)
    model = sp.model
    assert sp.counts == sp2.counts and sp.itop_rate == sp2.itop_rate and sp.summary() == sp2.summary()
    assert sp.density == pytest.approx(0.1, abs=1e-3)

    check_export(model, 'cnn', x)
