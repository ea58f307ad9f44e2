"""Pretrained starts: a dense checkpoint saved by the test, loaded offline through timm, sparsified by magnitude."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_dst

NAME = 'test_resnet'


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=10)
    path = tmp_path_factory.mktemp('ckpt') / 'dense.pth'
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, path)
    return str(path), state


def _load(path: str) -> torch.nn.Module:
    # a different random init: everything must come from the file (the overlay's num_classes keeps timm from
    # dropping the classifier of a checkpoint with a non-default head)
    torch.manual_seed(123)
    return timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=10),
                             num_classes=10)


def _sparsify(model, mask_init: str):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl-itop', sparsity=0.8, distribution='erk',
                                    mask_init=mask_init, update_interval=2, total_steps=10)
    return sp, opt


def test_checkpoint_loads_offline(checkpoint):
    path, state = checkpoint
    model = _load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_global_magnitude_keeps_largest(checkpoint):
    path, state = checkpoint
    model = _load(path)
    sp, _ = _sparsify(model, 'global-magnitude')
    assert sp.density == pytest.approx(0.2, abs=1e-4)
    ref = [state[t.name] for t in sp.targets]
    k = sum(sp.counts)
    flat = torch.cat([w.abs().flatten() for w in ref])
    threshold = torch.topk(flat, k).values.min()
    assert int((flat > threshold).sum()) < k <= int((flat >= threshold).sum())
    for t, w in zip(sp.targets, ref):
        mask = t.mask
        assert torch.equal(mask, w.abs() >= threshold), t.name   # exactly the global top-k (no ties in random init)
        assert torch.equal(t.param[mask], w[mask]), t.name       # kept weights are the checkpoint's values
        assert bool((t.param[~mask] == 0).all())


def test_per_tensor_magnitude_keeps_largest(checkpoint):
    path, state = checkpoint
    model = _load(path)
    sp, _ = _sparsify(model, 'magnitude')
    assert sp.density == pytest.approx(0.2, abs=1e-3)
    for t, count in zip(sp.targets, sp.counts):
        w = state[t.name]
        top = torch.topk(w.abs().flatten(), count).indices
        expected = torch.zeros(w.numel(), dtype=torch.bool)
        expected[top] = True
        assert torch.equal(t.mask.flatten(), expected), t.name
        assert torch.equal(t.param[t.mask], w[t.mask]), t.name


def test_random_erk_start_keeps_checkpoint_values_then_fine_tunes(checkpoint):
    path, state = checkpoint
    model = _load(path)
    sp, opt = _sparsify(model, 'random')
    assert sp.density == pytest.approx(0.2, abs=1e-3)
    for t in sp.targets:
        assert torch.equal(t.param[t.mask], state[t.name][t.mask]), t.name
    # DST fine-tuning from the pretrained start: two topology updates keep exact counts and explore
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    counts = list(sp.counts)
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert sp.counts == counts
    assert [int(t.mask.sum()) for t in sp.targets] == counts
    assert sp.itop_rate > sp.density
