"""Shared pieces of the papers' model entries: pretrained cfgs and the timm classifier interface."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ['CIFAR10_MEAN', 'CIFAR10_STD', 'cifar_cfg', 'ClassifierMixin', 'LinearHeadMixin', 'PoolFcHead']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def cifar_cfg(url: str = '', **kwargs: Any) -> dict[str, Any]:
    """A timm pretrained cfg for a 32x32 CIFAR model (no hosted weights: load local files through ``file=``)."""
    return {
        'url': url, 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': None, 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'fixed_input_size': True, 'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc', 'license': 'apache-2.0', **kwargs,
    }


class LinearHeadMixin:
    """timm's classifier interface for models whose classifier is a plain ``self.head`` linear layer."""

    num_features: int
    num_classes: int
    head: nn.Module

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


class ClassifierMixin:
    """timm's classifier interface for models whose head is ``self.head.fc`` after global average pooling."""

    num_features: int
    num_classes: int
    head: nn.Module

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head.pool(x)
        return x if pre_logits else self.head.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PoolFcHead(nn.Module):
    """Global average pool + flatten, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))

