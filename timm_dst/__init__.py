"""timm-dst: Dynamic Sparse Training for any timm model.

Layout (docs/design.md, "Layers"): ``kernels`` and ``distributed`` at the bottom, ``core`` (the controller and the
engine), ``methods`` (the methods and their registry), ``integrations.timm`` (flags, checkpoint layout, launcher), and
the front ends ``cli`` (``timm-dst-train``) and ``tools`` (zoo, sweep) on top. Old module paths stay importable as
deprecated aliases for one release (:mod:`timm_dst._compat`).
"""
from . import _compat
from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from . import models as _models  # noqa: F401  (registers the papers' architectures with timm)
from .core.compression import compress, load_compressed, save_compressed
from .core.controller import Sparsifier
from .core.distributions import layer_counts, register_distribution
from .core.masks import export_state_dict, fold_masks
from .core.schedules import register_prune_rate_schedule
from .core.structure import register_structure
from .core.targets import find_targets
from .methods import SparseMethod
from .methods._registry import (
    ENTRY_POINT_GROUP,
    MethodArgument,
    MethodInfo,
    create_sparsifier,
    get_method_info,
    list_methods,
    method_arguments,
    register_method,
)

__version__ = '0.1.0'

_compat.install()  # the old module paths, as deprecated aliases

__all__ = [
    'create_sparsifier', 'list_methods', 'register_method', 'get_method_info', 'method_arguments', 'MethodInfo',
    'MethodArgument', 'ENTRY_POINT_GROUP', 'register_distribution', 'register_prune_rate_schedule',
    'register_structure',
    'Sparsifier', 'SparseMethod', 'export_state_dict', 'fold_masks', 'find_targets', 'layer_counts', '__version__',
    'compress', 'save_compressed', 'load_compressed',
]
