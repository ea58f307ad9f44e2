"""Shared fixtures: tiny models of three kinds (MLP, timm CNN, timm ViT) and their inputs."""
from __future__ import annotations

import pytest
import timm
import torch

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
