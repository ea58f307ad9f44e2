"""Shared fixtures: tiny models of three kinds (MLP, timm CNN, timm ViT) and their inputs."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_dst  # noqa: F401  (registers itop_mlp)

torch.set_num_threads(1)  # tiny models: one intra-op thread is fastest and does not oversubscribe CI

# name, create_model kwargs, input shape
TINY_MODELS = {
    'mlp': ('itop_mlp', dict(in_chans=1, img_size=8), (4, 1, 8, 8)),
    'cnn': ('test_resnet', dict(), (4, 3, 32, 32)),
    'vit': ('test_vit', dict(img_size=32), (4, 3, 32, 32)),
}


def make_tiny(kind: str, seed: int = 0):
    """A tiny model of ``kind`` and a fixed batch for it."""
    name, kwargs, shape = TINY_MODELS[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*shape, generator=g)
    y = torch.randint(0, 10, (shape[0],), generator=g)
    return model, x, y


@pytest.fixture(params=list(TINY_MODELS))
def tiny_kind(request) -> str:
    return request.param


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_accelerate_state():
    """In-process CLI runs each build their own Accelerator: start and end with none."""
    _reset_accelerate()
    yield
    _reset_accelerate()


def run_cli(argv: list[str], out, *extra) -> None:
    """``timm-dst-train`` in this process with ``argv`` and ``--output out`` plus ``extra`` flags."""
    from timm_dst.train import main
    main(list(argv) + ['--output', str(out), *map(str, extra)])
    _reset_accelerate()


def train_steps(model, opt, x, y, steps: int) -> None:
    """``steps`` plain training steps on one batch (the loop a user writes)."""
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def check_exact_resume(build, x, y, before: int, after: int):
    """``before`` steps, save, ``after`` more; a fresh build loaded from the save and trained ``after`` steps must
    match: masks identical, weights equal up to float nondeterminism, R_s equal. ``build()`` returns
    ``(model, optimizer, sparsifier)``. Returns both sparsifiers."""
    model, opt, sp = build()
    train_steps(model, opt, x, y, before)
    ckpt = copy.deepcopy({'model': model.state_dict(), 'opt': opt.state_dict(), 'sp': sp.state_dict()})
    train_steps(model, opt, x, y, after)
    model2, opt2, sp2 = build()
    model2.load_state_dict(ckpt['model'])
    opt2.load_state_dict(ckpt['opt'])
    sp2.load_state_dict(ckpt['sp'])
    assert sp2.step == before
    train_steps(model2, opt2, x, y, after)
    for t1, t2 in zip(sp.targets, sp2.targets):
        assert torch.equal(t1.mask, t2.mask), t1.name
    for (n, p1), p2 in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=n)
    assert sp.itop_rate == sp2.itop_rate
    return sp, sp2


def check_export(model, kind: str, x) -> dict:
    """``export_state_dict(model)`` loads strictly into a fresh timm model of ``kind`` with equal outputs on ``x``."""
    exported = timm_dst.export_state_dict(model)
    assert not any(k.endswith(('_orig', '_mask')) for k in exported)
    name, kwargs, _ = TINY_MODELS[kind]
    plain = timm.create_model(name, num_classes=10, **kwargs)
    plain.load_state_dict(exported, strict=True)
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))
    return exported
