"""The papers' architectures, registered with timm's ``register_model`` on import."""
from .mlp import ItopMlp
from .resnet_cifar import CifarResNet
from .vgg import CifarVgg
from .wrn import WideResNet

__all__ = ['ItopMlp', 'CifarVgg', 'CifarResNet', 'WideResNet']
