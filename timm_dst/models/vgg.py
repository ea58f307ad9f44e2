"""The CIFAR VGG-16 of Lee et al. (2019) as used by Dettmers & Zettlemoyer (2019) and the ITOP paper.

Fully connected layers reduced to 512 and dropout replaced with batch norm. ``vgg16_cifar`` is configuration D
(13 3x3 convs); ``vgg16c_cifar`` is configuration C (three of the convs are 1x1), the ``vgg-c`` of the
sparse-learning reference code.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import LinearHeadMixin, cifar_cfg

__all__ = ['CifarVgg']

_CONFIGS: dict[str, list] = {
    'D': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'],
    'C': [64, 64, 'M', 128, 128, 'M', 256, 256, (1, 256), 'M', 512, 512, (1, 512), 'M', 512, 512, (1, 512), 'M'],
}


class CifarVgg(LinearHeadMixin, nn.Module):
    """VGG-16 for 32x32 inputs: conv-BN-ReLU stacks, then FC 512 - BN - FC 512 - BN - classifier.

    Args:
        cfg: ``'D'`` or ``'C'`` (channel / kernel plan, ``(k, c)`` tuples are k x k convs).
        num_classes: Output classes.
        in_chans: Input channels.
        fc_dim: Width of the fully connected layers.
    """

    def __init__(self, cfg: str = 'D', num_classes: int = 10, in_chans: int = 3, fc_dim: int = 512, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        layers: list[nn.Module] = []
        width = in_chans
        for v in _CONFIGS[cfg]:
            if v == 'M':
                layers.append(nn.MaxPool2d(2, 2))
                continue
            k, c = v if isinstance(v, tuple) else (3, v)
            layers += [nn.Conv2d(width, c, k, padding=k // 2), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            width = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.pre_logits = nn.Sequential(
            nn.Linear(width, fc_dim), nn.ReLU(inplace=True), nn.BatchNorm1d(fc_dim),
            nn.Linear(fc_dim, fc_dim), nn.ReLU(inplace=True), nn.BatchNorm1d(fc_dim),
        )
        self.num_features = fc_dim
        self.head = nn.Linear(fc_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    'vgg16_cifar': cifar_cfg(first_conv='features.0', classifier='head', fixed_input_size=False),
    'vgg16c_cifar': cifar_cfg(first_conv='features.0', classifier='head', fixed_input_size=False),
})


@register_model
def vgg16_cifar(pretrained: bool = False, **kwargs) -> CifarVgg:
    """VGG-16 (configuration D) of Lee et al. for CIFAR: FC 512, batch norm instead of dropout."""
    return build_model_with_cfg(CifarVgg, 'vgg16_cifar', pretrained, **dict(cfg='D', **kwargs))


@register_model
def vgg16c_cifar(pretrained: bool = False, **kwargs) -> CifarVgg:
    """VGG-16 configuration C (with 1x1 convs) for CIFAR: the sparse-learning code's ``vgg-c``."""
    return build_model_with_cfg(CifarVgg, 'vgg16c_cifar', pretrained, **dict(cfg='C', **kwargs))
