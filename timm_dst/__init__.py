"""timm-dst: Dynamic Sparse Training for any timm model."""
from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from . import models as _models  # noqa: F401  (registers the papers' architectures with timm)
from ._registry import (
    ENTRY_POINT_GROUP,
    MethodArgument,
    MethodInfo,
    create_sparsifier,
    get_method_info,
    list_methods,
    method_arguments,
    register_method,
)
from .compression import compress, load_compressed, save_compressed
from .distributions import layer_counts
from .methods import SparseMethod
from .reparam import export_state_dict, fold_masks
from .sparsifier import Sparsifier
from .targets import find_targets

__version__ = '0.1.0'

__all__ = [
    'create_sparsifier', 'list_methods', 'register_method', 'get_method_info', 'method_arguments', 'MethodInfo',
    'MethodArgument', 'ENTRY_POINT_GROUP',
    'Sparsifier', 'SparseMethod', 'export_state_dict', 'fold_masks', 'find_targets', 'layer_counts', '__version__',
    'compress', 'save_compressed', 'load_compressed',
]
