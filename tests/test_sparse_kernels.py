"""CSR kernels for low-density ``nn.Linear`` layers: same outputs and gradients as the dense masked layer, the dense
path wherever the sparse one would differ, and training that matches the dense kernels."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import train_steps

import timm_dst
from timm_dst.kernels.sparse_linear import SparseLinearForward


def _mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96, bias=bias), nn.ReLU(), nn.Linear(96, 64, bias=bias), nn.ReLU(),
                         nn.Linear(64, 10, bias=bias))


def _sparsify(model: nn.Module, density: float = timm_dst.Sparsifier.__init__.__kwdefaults__['sparse_kernel_density'],
              method: str = 'static', **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sp = timm_dst.create_sparsifier(model, opt, method=method, sparsity=0.97, distribution='uniform',
                                    total_steps=100, sparse_kernel_density=density, **kw)
    return opt, sp


def _kernels(model: nn.Module) -> list[bool]:
    return [isinstance(m.__dict__.get('forward'), SparseLinearForward) for m in model.modules()
            if isinstance(m, nn.Linear)]


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('shape', [(5, 48), (2, 3, 48)])
def test_outputs_and_gradients_equal_the_dense_masked_layer(bias: bool, shape: tuple[int, ...]):
    model = _mlp(bias)
    _sparsify(model)
    assert all(_kernels(model))
    ref = _mlp(bias)
    ref.load_state_dict(timm_dst.export_state_dict(model))
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = model(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    masked = [m for m in model.modules() if hasattr(m, 'weight_mask')]
    for m, r in zip(masked, [m for m in ref.modules() if isinstance(m, nn.Linear)]):
        assert not bool(m.weight_orig.grad[~m.weight_mask].any()), 'gradient non-zero outside the mask'
        torch.testing.assert_close(m.weight_orig.grad, r.weight.grad * m.weight_mask)
        if bias:
            torch.testing.assert_close(m.bias.grad, r.bias.grad)


@pytest.mark.parametrize('method', ['set-itop', 'rigl-itop', 'snfs'])
def test_training_matches_the_dense_kernels(method: str):
    """Same masks, R_s and (up to float summation order) weights as ``sparse_kernel_density=0``; RigL / SNFS read the
    dense gradient, which the sparse kernels would not give, so those steps take the dense path."""
    x, y = torch.randn(16, 48, generator=torch.Generator().manual_seed(1)), torch.randint(0, 10, (16,))
    runs = []
    for density in (0.05, 0.0):
        model = _mlp()
        opt, sp = _sparsify(model, density=density, method=method, update_interval=3)
        train_steps(model, opt, x, y, 10)
        runs.append((model, sp))
    (m1, s1), (m0, s0) = runs
    # kernels exactly where the budget is at most 5% (SNFS moves budgets between layers; the rest pay nothing)
    expected = {id(t.module): c <= 0.05 * t.numel for t, c in zip(s1.targets, s1.counts)}
    assert _kernels(m1) == [expected[id(m)] for m in m1.modules() if isinstance(m, nn.Linear)]
    assert any(expected.values()) and not any(_kernels(m0))
    assert len(s1.history) == len(s0.history) > 1
    for t1, t0 in zip(s1.targets, s0.targets):
        assert torch.equal(t1.mask, t0.mask), t1.name
    assert s1.itop_rate == s0.itop_rate > s1.density
    torch.testing.assert_close(timm_dst.export_state_dict(m1), timm_dst.export_state_dict(m0), rtol=1e-4, atol=1e-5)


def test_dense_path_for_copies_autocast_and_dense_layers():
    model = _mlp()
    _sparsify(model)
    x = torch.randn(4, 48)
    # an EMA-style copy is not kept zero by the sparsifier: it computes orig * mask on the dense path
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for m in ema.modules():
            if hasattr(m, 'weight_orig'):
                m.weight_orig.add_(1.0)  # averaged weights are non-zero at masked positions
    assert torch.equal(timm_dst.export_state_dict(ema)['0.weight'] == 0, ~model[0].weight_mask)
    ref = _mlp()
    ref.load_state_dict(timm_dst.export_state_dict(ema))
    torch.testing.assert_close(ema(x), ref(x))
    # bf16 autocast: the dense kernels, so the result is what autocast gives for the dense layer
    ref.load_state_dict(timm_dst.export_state_dict(model))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, out_ref = model(x), ref(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref)
    # layers above the density limit keep nn.Linear's own forward (nothing to check per call)
    wide = _mlp()
    _sparsify(wide, density=0.01)
    assert not any(_kernels(wide))


def test_folding_restores_the_plain_forward_and_bad_values_fail():
    model = _mlp()
    _sparsify(model)
    timm_dst.fold_masks(model)
    assert not any(_kernels(model)) and all('forward' not in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match='sparse_kernel_density'):
        _sparsify(_mlp(), density=1.5)


def test_itop_mlp_uses_the_kernels_at_the_paper_sparsity():
    model = timm.create_model('itop_mlp', num_classes=10, in_chans=1, img_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='set-itop', sparsity=0.98, distribution='er', total_steps=10)
    on = {t.name: isinstance(t.module.__dict__.get('forward'), SparseLinearForward) and
          t.module.forward.method.csr(t.mask, sp.sparse_kernel_density) is not None for t in sp.targets}
    assert on == {'features.0.weight': True, 'features.2.weight': True, 'head.weight': False}  # ER: head ~70% dense
    loss = F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.arange(4))
    loss.backward()
    assert all(not bool(t.param.grad[~t.mask].any()) for t in sp.targets)


def test_compiled_model_takes_the_dense_path_and_matches_eager():
    model = _mlp()
    opt, sp = _sparsify(model)
    x = torch.randn(6, 48)
    eager = model(x)
    compiled = torch.compile(model, backend='aot_eager')
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.square().sum().backward()
    assert all(not bool(t.param.grad[~t.mask].any()) for t in sp.targets)


def test_kernel_gradient_is_masked_once_and_sums_with_other_contributions_are_masked(monkeypatch):
    """The kernels' weight gradient is produced masked, so the accumulation hook leaves it alone; anything else summed
    into ``.grad`` (another read of the weight, an earlier micro-batch, a user's tensor hook) is masked there."""
    from timm_dst.core.masks import DSTMask
    calls = []
    real = DSTMask.mask_grad_
    monkeypatch.setattr(DSTMask, 'mask_grad_', lambda self, g, m: calls.append(g.shape) or real(self, g, m))
    model = _mlp()
    _sparsify(model)
    lin = model[0]
    x = torch.randn(8, 48)
    model(x).square().sum().backward()
    assert calls == [], 'the kernels produced masked gradients; masking them again is wasted work'
    good = lin.weight_orig.grad.clone()
    assert not good[~lin.weight_mask].any()

    def outside(g: torch.Tensor) -> bool:
        return bool(g[~lin.weight_mask].any())

    # a second read of the weight in the same graph: its (dense) gradient is summed with the kernel's
    model.zero_grad(set_to_none=True)
    (model(x).square().sum() + (lin.weight + 1.0).sum()).backward()
    assert not outside(lin.weight_orig.grad)
    torch.testing.assert_close(lin.weight_orig.grad, (good + 1.0) * lin.weight_mask)
    # accumulation over micro-batches, the second one reading the weight again
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    (model(x).square().sum() + (lin.weight + 1.0).sum()).backward()
    torch.testing.assert_close(lin.weight_orig.grad, (2 * good + 1.0) * lin.weight_mask)
    # a user's hook that returns a different gradient
    model.zero_grad(set_to_none=True)
    handle = lin.weight_orig.register_hook(lambda g: g + 1.0)
    model(x).square().sum().backward()
    handle.remove()
    torch.testing.assert_close(lin.weight_orig.grad, (good + 1.0) * lin.weight_mask)
