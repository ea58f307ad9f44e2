"""Wide ResNet WRN-d-k for CIFAR (Zagoruyko & Komodakis 2016): DSR's WRN-28-2 (Mostafa & Wang 2019)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import ClassifierMixin, PoolFcHead, cifar_cfg

__all__ = ['WideResNet']


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3, 1x1 projection shortcut on shape change."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act1(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(o)
        o = self.conv1(o)
        o = self.act2(self.bn2(o))
        if self.drop_rate > 0:
            o = F.dropout(o, p=self.drop_rate, training=self.training)
        return self.conv2(o) + shortcut


class WideResNet(ClassifierMixin, nn.Module):
    """WRN-depth-widen for 32x32 inputs: stem conv 16, three stages of (depth - 4) / 6 blocks, BN-ReLU, pool, FC.

    Args:
        depth: Total depth (6n + 4).
        widen_factor: Width multiplier k (stage widths 16k, 32k, 64k).
        num_classes: Output classes.
        in_chans: Input channels.
        drop_rate: Dropout inside blocks.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 2, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, **kwargs):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f'depth={depth} must be 6n + 4')
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stem = nn.Sequential()
        self.stem.add_module('conv', nn.Conv2d(in_chans, 16, 3, padding=1, bias=False))
        stages, chs = [], 16
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(*[
                WideBasicBlock(chs if j == 0 else w, w, stride=(2 if i > 0 and j == 0 else 1), drop_rate=drop_rate)
                for j in range(n)]))
            chs = w
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(chs)
        self.act = nn.ReLU(inplace=True)
        self.num_features = chs
        self.head = PoolFcHead(chs, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.stages(self.stem(x))))


default_cfgs = generate_default_cfgs({
    'wrn28_2': cifar_cfg(fixed_input_size=False),
})


@register_model
def wrn28_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-2, the CIFAR-10 model of DSR (Mostafa & Wang 2019)."""
    return build_model_with_cfg(WideResNet, 'wrn28_2', pretrained, **dict(depth=28, widen_factor=2, **kwargs))
