"""CIFAR ResNet-18 / 34 (He et al. 2016, CIFAR variant): 3x3 stride-1 stem, no max pool, four stages of basic blocks."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import ClassifierMixin, PoolFcHead, cifar_cfg

__all__ = ['CifarResNet', 'BasicBlock']


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual connection (1x1 conv-BN projection when the shape changes)."""

    expansion = 1

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(ClassifierMixin, nn.Module):
    """ResNet with basic blocks for 32x32 inputs.

    Args:
        layers: Blocks per stage.
        num_classes: Output classes.
        in_chans: Input channels.
        widths: Channels per stage.
    """

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, in_chans: int = 3,
                 widths: tuple[int, ...] = (64, 128, 256, 512), **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stem = nn.Sequential()
        self.stem.add_module('conv', nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False))
        self.stem.add_module('bn', nn.BatchNorm2d(widths[0]))
        self.stem.add_module('act', nn.ReLU(inplace=True))
        stages, chs = [], widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = [BasicBlock(chs if j == 0 else w, w, stride=(1 if i == 0 or j > 0 else 2)) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            chs = w
        self.stages = nn.Sequential(*stages)
        self.num_features = chs
        self.head = PoolFcHead(chs, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


default_cfgs = generate_default_cfgs({
    'resnet18_cifar': cifar_cfg(fixed_input_size=False),
    'resnet34_cifar': cifar_cfg(num_classes=100, fixed_input_size=False),
})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-18 (basic blocks 2-2-2-2)."""
    return build_model_with_cfg(CifarResNet, 'resnet18_cifar', pretrained, **dict(layers=(2, 2, 2, 2), **kwargs))


@register_model
def resnet34_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-34 (basic blocks 3-4-6-3), the ITOP paper's CIFAR-100 model."""
    return build_model_with_cfg(CifarResNet, 'resnet34_cifar', pretrained, **dict(layers=(3, 4, 6, 3), **kwargs))
