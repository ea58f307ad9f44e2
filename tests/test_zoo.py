"""Zoo coverage: the default suite (one small architecture per timm family) and the odd layer types of the zoo."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import CondConv2d, Conv2dSame, ScaledStdConv2d, StdConv2d

import timm_dst
from timm_dst.tools.zoo import DEFAULT_SUITE, check_model, format_table, main


def test_suite_size_and_families():
    assert len(DEFAULT_SUITE) >= 30 and len(set(DEFAULT_SUITE)) == len(DEFAULT_SUITE)
    known = set(timm.list_models())
    assert set(DEFAULT_SUITE) <= known


@pytest.mark.parametrize('name', DEFAULT_SUITE)
def test_zoo_suite(name):
    torch.set_num_threads(2)
    res = check_model(name, img_size=64, batch_size=2)
    assert res.status == 'pass', res.reason
    assert res.sparse_tensors > 0
    assert res.density == pytest.approx(0.1, abs=2e-3)


class _Odd(nn.Module):
    """Every odd layer type of the zoo in one model."""

    def __init__(self):
        super().__init__()
        self.stem = Conv2dSame(3, 16, 3, stride=2)
        self.std = StdConv2d(16, 16, 3, padding=1)
        self.sstd = ScaledStdConv2d(16, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.route = nn.Linear(32, 4)
        self.cond = CondConv2d(32, 32, 3, padding=1, num_experts=4)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.conv1d = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, 1, 1) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 16))
        self.relative_position_bias_table = nn.Parameter(torch.randn(9, 16))
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.sstd(self.std(self.stem(x))) + self.pos_embed
        x = self.dw(self.grouped(x))
        routing = torch.sigmoid(self.route(x.mean((2, 3))))
        x = self.up(self.cond(x, routing))
        y = x.mean((2, 3))
        y = y + self.conv1d(y.unsqueeze(1)).squeeze(1) + self.cls_token
        q, k, v = self.qkv(y).chunk(3, dim=-1)
        y = y + F.softmax(q * k + self.relative_position_bias_table.mean(0), -1) * v
        return self.head(y)


def test_odd_layers():
    torch.manual_seed(0)
    model = _Odd()
    names = [t.name for t in timm_dst.find_targets(model)]
    # sparse: Conv2dSame, grouped, depthwise, ConvTranspose2d, Conv1d, linears (fused qkv included)
    assert names == ['stem.weight', 'grouped.weight', 'dw.weight', 'route.weight', 'up.weight', 'conv1d.weight',
                     'qkv.weight', 'head.weight']
    # dense by default: weight-standardising convs (they would turn masked zeros into non-zeros), CondConv2d's
    # expert bank, position embeddings, tokens and relative-position tables
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl-itop', sparsity=0.9, update_interval=1, total_steps=4)
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert all(t.param.grad is not None for t in sp.targets)
        opt.step()
    assert sp.step == 2 and len(sp.history) == 3
    for t, c in zip(sp.targets, sp.counts):
        assert int(t.mask.sum()) == c
        assert not bool(((getattr(t.module, t.param_name) != 0) & ~t.mask).any())
    fresh = _Odd()
    fresh.load_state_dict(timm_dst.export_state_dict(model), strict=True)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_weight_read_by_parent_gets_gradient():
    """BEiT / EVA / Swin V2 attention read ``self.qkv.weight`` in their own forward (F.linear with a q/v bias)."""
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(8))

        def forward(self, x):
            bias = torch.cat([self.q_bias, torch.zeros(16)])
            return F.linear(x, weight=self.qkv.weight, bias=bias)

    torch.manual_seed(0)
    model = nn.Sequential(Attn(), nn.Linear(24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl-itop', sparsity=0.5, distribution='uniform',
                                    update_interval=1, total_steps=4)
    model(torch.randn(3, 8)).sum().backward()
    qkv = sp.targets[0]
    assert qkv.name == '0.qkv.weight'
    assert qkv.param.grad is not None and bool((qkv.param.grad[qkv.mask] != 0).any())
    assert bool((sp.dense_grads()[0][~qkv.mask] != 0).any())  # RigL sees the dense gradient too
    opt.step()
    with torch.no_grad():
        assert torch.equal(model[0].qkv.weight, qkv.param * qkv.mask)


def test_cli_table(capsys):
    torch.set_num_threads(2)
    assert main(['--models', 'resnet10t', '--img-size', '32', '--threads', '2']) == 0
    out = capsys.readouterr().out
    assert '| resnet10t |' in out and '1 / 1 passed' in out
    assert format_table([], 'csv').startswith('model,params_m')


def test_sweep_replaces_a_grown_worker_and_skips_what_does_not_fit(tmp_path):
    """A worker above --worker-max-rss is replaced between models (every model here: 0 GiB) and no row is lost; a model
    whose weights would not fit in memory is a skip row that says why, not a crash."""
    import timm_dst.tools.zoo as zoo
    out = tmp_path / 'zoo.csv'
    assert main(['--models', 'resnet10t', 'test_vit', '--img-size', '32', '--worker-max-rss', '0',
                 '--output', str(out), '--format', 'csv']) == 0
    rows = zoo._read_csv(str(out))
    assert [r.model for r in rows] == ['resnet10t', 'test_vit'] and all(r.status == 'pass' for r in rows)
    skipped = zoo.run_zoo(['resnet10t'], img_size=32, threads=1, max_memory=0.01)  # needs ~0.1 GiB
    assert skipped[0].status == 'skip' and 'GiB' in skipped[0].reason and '--max-memory' in skipped[0].reason


def test_shared_relative_position_mlp_stays_dense():
    model = timm.create_model('vit_srelpos_small_patch16_224', img_size=64, num_classes=10)
    names = [t.name for t in timm_dst.find_targets(model)]
    assert names and not any('rel_pos' in n for n in names)



class _PositionMLP(nn.Module):
    """A linear layer computing a position encoding from fixed coordinates, declared in ``no_weight_decay()`` (as
    timm's models declare theirs) but under a name the target selection does not know."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.coord_proj = nn.Linear(2, 16)
        self.head = nn.Linear(16, 4)
        self.register_buffer('coords', torch.linspace(-1, 1, 10).view(5, 2))

    def no_weight_decay(self):
        return {'coord_proj'}

    def forward(self, x):
        return self.head(self.fc(x) + self.coord_proj(self.coords).mean(0))


@pytest.mark.parametrize('exclude, fails', [(None, True), (['coord_proj'], False)])
def test_zoo_target_check_can_fail(exclude, fails):
    """The zoo's target check does not re-use the predicate that chose the targets: a position-encoding layer the
    model lists in no_weight_decay() but the selection made sparse fails it."""
    from timm_dst.tools.zoo import _check_invariants
    torch.manual_seed(0)
    model = _PositionMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.5, update_interval=1, total_steps=4,
                                    exclude=exclude)
    assert ('coord_proj.weight' in [t.name for t in sp.targets]) == fails
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 8)).pow(2).mean().backward()
        opt.step()
    if fails:
        with pytest.raises(RuntimeError, match='coord_proj.weight'):
            _check_invariants(sp, 0.5)
    else:
        _check_invariants(sp, 0.5)
