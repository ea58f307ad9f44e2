"""The papers' architectures, registered with timm's ``register_model`` on import."""
from .mlp import ItopMlp

__all__ = ['ItopMlp']
