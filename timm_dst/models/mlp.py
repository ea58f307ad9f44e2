"""The ITOP paper's MLP (Appendix A.1): hidden 1024-512, ReLU, no batch norm or dropout."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import LinearHeadMixin, cifar_cfg

__all__ = ['ItopMlp']


class ItopMlp(LinearHeadMixin, nn.Module):
    """Three-layer MLP; the input size comes from the data (``in_chans * img_size ** 2``).

    Args:
        num_classes: Output classes.
        in_chans: Input channels.
        img_size: Input height / width.
        hidden: Hidden widths.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int | tuple[int, int] = 32,
                 hidden: tuple[int, ...] = (1024, 512), **kwargs):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.in_features = in_chans * h * w
        layers, width = [], self.in_features
        for hdim in hidden:
            layers += [nn.Linear(width, hdim), nn.ReLU(inplace=True)]
            width = hdim
        self.features = nn.Sequential(*layers)
        self.num_features = width
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x.flatten(1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    'itop_mlp': cifar_cfg(first_conv=None, classifier='head', fixed_input_size=True),
})


@register_model
def itop_mlp(pretrained: bool = False, **kwargs) -> ItopMlp:
    """ITOP MLP (1024-512) for 32x32x3 inputs by default; pass ``in_chans=1, img_size=28`` for (Fashion-)MNIST."""
    return build_model_with_cfg(ItopMlp, 'itop_mlp', pretrained, **kwargs)
