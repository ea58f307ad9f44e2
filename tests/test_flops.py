"""``timm_dst.core.flops`` against hand-computed FLOPs (multiply-add = 2) for an MLP and a small CNN at known
densities."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import timm_dst
from timm_dst.core.flops import TrainingFlops, inference_flops, layer_flops

# MLP 784-300-100-10 (LeNet-300-100), per sample
MLP_LAYERS = {'0': 2 * 784 * 300, '2': 2 * 300 * 100, '4': 2 * 100 * 10}
MLP_DENSE = 470_400 + 60_000 + 2_000


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                 # 8x8 out, 8 ch:   2 * 8*8*8  * 3*3*3 = 27648
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),      # 4x4 out, 16 ch:  2 * 4*4*16 * 8*3*3 = 36864
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),    # depthwise:       2 * 4*4*16 * 1*3*3 = 4608
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),                             #                  2 * 16 * 10        = 320
    )


def test_layer_flops_dense_mlp():
    total, per_module = layer_flops(_mlp(), (784,))
    assert total == MLP_DENSE == 532_400
    assert {k: per_module[k] for k in MLP_LAYERS} == MLP_LAYERS
    # a batch gives the same per-sample numbers
    assert layer_flops(_mlp(), torch.zeros(5, 784))[0] == MLP_DENSE


def test_inference_flops_mlp_uniform_dense_classifier():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, method='static', sparsity=0.8, distribution='uniform',
                                    dense_classifier=True)
    assert [round(s['density'], 6) for s in sp.summary()] == [0.2, 0.2]
    out = inference_flops(model, (784,), sp)
    expected = 0.2 * (470_400 + 60_000) + 2_000        # = 108080
    assert out['dense'] == MLP_DENSE
    assert out['sparse'] == pytest.approx(expected) == 108_080
    assert out['ratio'] == pytest.approx(108_080 / 532_400)
    # densities read back from the mask buffers when no sparsifier is given
    assert inference_flops(model, (784,))['sparse'] == pytest.approx(expected)


def test_inference_flops_mlp_at_sparse_kernel_densities():
    """At 98% the linear layers run CSR kernels, which ``torch.utils.flop_counter`` has no formula for: each layer is
    still counted at its dense cost, scaled by its density."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, method='static', sparsity=0.98, distribution='uniform',
                                    dense_classifier=True)
    assert any('forward' in m.__dict__ for m in model.modules()), 'expected the sparse kernels at 2% density'
    out = inference_flops(model, (784,), sp)
    assert out['dense'] == MLP_DENSE
    assert out['sparse'] == pytest.approx(0.02 * (470_400 + 60_000) + 2_000)


def test_inference_flops_cnn_known_densities():
    model = _cnn()
    total, _ = layer_flops(model, (3, 8, 8))
    assert total == 27_648 + 36_864 + 4_608 + 320 == 69_440
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, method='static', sparsity=0.5, distribution='uniform')
    assert [t.name for t in sp.targets] == ['0.weight', '2.weight', '4.weight', '7.weight']
    g = torch.Generator().manual_seed(0)
    keep = [108, 288, 48, 80]                           # densities 1/2, 1/4, 1/3, 1/2 of 216, 1152, 144, 160
    masks = []
    for t, k in zip(sp.targets, keep):
        m = torch.zeros(t.numel, dtype=torch.bool)
        m[torch.randperm(t.numel, generator=g)[:k]] = True
        masks.append(m.view(t.shape))
    sp.set_masks(masks)
    out = inference_flops(model, (3, 8, 8), sp)
    expected = 27_648 / 2 + 36_864 / 4 + 4_608 / 3 + 320 / 2   # = 24736
    assert out['sparse'] == pytest.approx(expected) == 24_736
    assert out['ratio'] == pytest.approx(24_736 / 69_440)
    assert [r['dense'] for r in out['layers']] == [27_648, 36_864, 4_608, 320]


def test_training_flops_rigl_mlp():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl-itop', sparsity=0.8, distribution='uniform',
                                    dense_classifier=True, update_interval=2, total_steps=10)
    tf = TrainingFlops(model, (784,), sp, samples_per_step=8, attach=True)
    x, y = torch.randn(8, 784), torch.randint(0, 10, (8,))
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    f_s, f_d = 108_080, MLP_DENSE
    # steps 1 and 3: 3 f_S; steps 2 and 4 (the backward before each RigL update computes dense weight gradients):
    # f_S forward + f_S activation gradients + f_D dense weight gradients
    expected = 8 * (2 * 3 * f_s + 2 * (2 * f_s + f_d))  # = 17_164_800
    assert tf.steps == 4 and tf.dense_grad_steps == 2
    assert tf.total == pytest.approx(expected) == 17_164_800
    assert tf.dense_total == pytest.approx(4 * 8 * 3 * f_d)
    assert tf.ratio == pytest.approx(expected / (4 * 8 * 3 * f_d))
    s = tf.summary()
    assert s['inference_flops'] == pytest.approx(f_s) and s['inference_flops_ratio'] == pytest.approx(f_s / f_d)
    tf.remove()


def test_training_flops_dense_and_manual_step():
    model = _mlp()
    tf = TrainingFlops(model, (784,), None, samples_per_step=4)
    assert tf.step() == 4 * 3 * MLP_DENSE
    assert tf.ratio == 1.0
    with pytest.raises(ValueError, match='samples_per_step'):
        TrainingFlops(model, (784,), None, samples_per_step=0)
