"""Which tensors of an arbitrary (timm) model are sparse.

Default policy: the >= 2-D ``weight`` of every convolution (``nn.Conv1d/2d/3d``, transposed convs) and linear module,
subclasses included. Never norms, biases, embeddings, class/distillation tokens or position tables (those are not
weights of conv / linear modules), and never the conv / linear layers that *compute* a position encoding (XCiT's Fourier
``pos_embed.token_projection``, Twins' ``pos_block``, CoaT's ``cpe`` / ``crpe``, ConViT's ``pos_proj``, Swin V2's
``cpb_mlp`` / ``meta_mlp`` relative-position MLPs, FastViT's ``pos_enc``: see :data:`POSITION_MODULE_PATTERNS`).
Weight-standardising convs (timm's ``StdConv2d`` / ``ScaledStdConv2d``, whose
forward turns masked zeros into non-zeros) stay dense unless named by ``include``.

Weights held in another form are never made sparse silently:

- **Parametrized weights** (``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` / ``orthogonal``, any
  ``torch.nn.utils.parametrize.register_parametrization``, and the old ``torch.nn.utils.weight_norm`` /
  ``spectral_norm`` hooks) stay dense, with one warning naming them. The forward computes such a weight from other
  tensors (``original``, or weight norm's magnitude ``g`` and direction ``v``); a mask can only sit on one of those, and
  the methods would then rank that input, not the weight (weight norm's direction is rescaled per row, so its
  magnitudes are not the weight's; a row with no active weight would make ``v / ||v||`` NaN; most parametrizations do
  not map zeros to zeros at all). Remove the parametrization first to sparsify the plain weight; ``include=`` naming an
  input tensor (``fc.parametrizations.weight.original``) masks that tensor, at the user's judgement, as it does for
  weight-standardising convs.
- **Low-rank adapters** (LoRA-style modules with ``lora_A`` / ``lora_B``, as peft and loralib name them) whose base
  weight is sparse get one warning naming the weights: the layer adds a dense low-rank product to the masked weight,
  so its effective weight is not sparse. Merge the adapters first to sparsify the merged weights.
- **QAT modules** (``torch.ao.nn.qat.Linear`` / ``Conv2d``, subclasses of the float ones) are ordinary targets: their
  forward fake-quantizes the masked weight, and affine quantization maps zero to exactly zero.
"""
from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..distributed.fsdp import is_dtensor
from .masks import has_mask

__all__ = ['SparseTarget', 'find_targets', 'DEFAULT_MODULE_TYPES', 'POSITION_MODULE_PATTERNS', 'check_unmasked',
           'check_trained', 'check_materialized']

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)

# Module-path components (glob) of position-encoding modules: conv / linear layers under them stay dense by default.
POSITION_MODULE_PATTERNS: tuple[str, ...] = (
    'pos_embed*', 'pos_embd', 'pos_block', 'pos_proj', 'pos_enc', 'pos_conv', 'cpe', 'crpe', 'cpb_mlp', 'meta_mlp',
    'rel_pos*', 'shared_rel_pos', 'relative_position*', 'rpe',
)


@dataclass
class SparseTarget:
    """One sparse tensor: ``module.<param_name>`` known in the model as ``name``."""

    name: str
    module: nn.Module
    param_name: str = 'weight'

    @property
    def param(self):
        """The trainable tensor (``<param>_orig`` once a mask is attached)."""
        orig = getattr(self.module, self.param_name + '_orig', None)
        return orig if orig is not None else getattr(self.module, self.param_name)

    @property
    def mask(self):
        """The bool mask buffer (after attaching)."""
        return getattr(self.module, self.param_name + '_mask')

    @property
    def shape(self):
        return tuple(self.param.shape)

    @property
    def numel(self) -> int:
        return self.param.numel()


def _check_shared_storage(targets: list[SparseTarget]) -> None:
    """Distinct parameters over one storage (``nn.Parameter(other.weight.data)``) would get independent masks."""
    seen: dict[tuple, str] = {}
    for t in targets:
        p = t.param
        if is_dtensor(p):  # an FSDP2 shard: its storage is the local shard's
            p = p.to_local()
        if p.device.type == 'meta' or p.numel() == 0:
            continue
        key = (p.device, p.data_ptr())
        if key in seen:
            raise ValueError(f'model: {seen[key]} and {t.name} are different parameters over the same memory; tie '
                             'them as one parameter (b.weight = a.weight), or exclude= one of them')
        seen[key] = t.name


def _is_weight_standardized(module: nn.Module) -> bool:
    cls_names = {c.__name__ for c in type(module).__mro__}
    return bool(cls_names & {'StdConv2d', 'StdConv2dSame', 'ScaledStdConv2d', 'ScaledStdConv2dSame'})


# the parametrizations whose names the warning uses (any other is named by its class)
_PARAMETRIZATION_KINDS = {'_WeightNorm': 'weight_norm', '_SpectralNorm': 'spectral_norm', '_Orthogonal': 'orthogonal'}


def _reparametrized(module: nn.Module) -> list[tuple[str, str, set[int]]]:
    """The tensors of ``module`` its forward computes from other tensors: ``(tensor name, kind, ids of the parameters
    it is computed from)`` for each ``torch.nn.utils.parametrize`` parametrization and each old-style weight norm /
    spectral norm hook."""
    out = []
    if parametrize.is_parametrized(module):
        for tensor_name, plist in module.parametrizations.items():
            kind = ' + '.join(_PARAMETRIZATION_KINDS.get(type(p).__name__, type(p).__name__) for p in plist)
            out.append((tensor_name, kind, {id(p) for p in plist.parameters()}))
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm | SpectralNorm):
            kind = 'old weight_norm' if isinstance(hook, WeightNorm) else 'old spectral_norm'
            suffixes = ('_g', '_v') if isinstance(hook, WeightNorm) else ('_orig',)
            inputs = {id(getattr(module, hook.name + s)) for s in suffixes if hasattr(module, hook.name + s)}
            out.append((hook.name, kind, inputs))
    return out


def _low_rank_bases(model: nn.Module) -> dict[int, str]:
    """``id(module) -> name of its low-rank adapter module`` of every layer a LoRA-style module (``lora_A`` and
    ``lora_B``, as peft and loralib name them) adds a low-rank product to: peft's ``base_layer``, or the module itself
    (loralib subclasses the layer)."""
    out = {}
    for mod_name, module in model.named_modules():
        a, b = getattr(module, 'lora_A', None), getattr(module, 'lora_B', None)
        if a is None or b is None or (isinstance(a, nn.ModuleDict | nn.ParameterDict) and not len(a)):
            continue
        base = module._modules.get('base_layer')
        out[id(base if isinstance(base, nn.Module) else module)] = mod_name
    return out


def _is_position_module(module_name: str) -> bool:
    return any(fnmatch.fnmatchcase(part, p) for part in module_name.split('.') for p in POSITION_MODULE_PATTERNS)


def _as_list(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [p for p in patterns.split(',') if p]
    return list(patterns)


def _matches(name: str, patterns: list[str]) -> bool:
    module_name = name.rsplit('.', 1)[0] if '.' in name else name
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module_name, p) for p in patterns)


def _module_for_cfg_name(model: nn.Module, cfg_value) -> list[str]:
    """Module names referenced by a timm pretrained_cfg ``first_conv`` / ``classifier`` entry (str or tuple)."""
    values = [cfg_value] if isinstance(cfg_value, str) else list(cfg_value or [])
    out = []
    for value in values:
        for suffix in ('.weight', ''):
            name = value[: -len(suffix)] if suffix and value.endswith(suffix) else value
            out.append(name)
    return out


def find_targets(
        model: nn.Module,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        dense_first_layer: bool = False,
        dense_classifier: bool = False,
) -> list[SparseTarget]:
    """Resolve the sparse tensors of ``model``.

    Args:
        model: The (unwrapped) model.
        include: Glob patterns on parameter names (``'blocks.*.mlp.fc1.weight'``) or module names. When given, only
            matching >= 2-D parameters are sparse (of any module type, weight-standardising convs included).
        exclude: Glob patterns removed from the selection.
        dense_first_layer: Keep the first conv / linear (timm's ``pretrained_cfg['first_conv']`` when present) dense.
        dense_classifier: Keep the classifier (``pretrained_cfg['classifier']`` when present, else the last linear)
            dense.

    Returns:
        The targets, in ``named_modules`` order.
    """
    include_p, exclude_p = _as_list(include), _as_list(exclude)
    candidates: list[SparseTarget] = []
    aliases: dict[int, list[str]] = {}  # id(parameter) -> every name it has (tied weights have several)
    computed: dict[tuple[int, str], tuple[str, str, set[int]]] = {}  # weights the forward computes (parametrized)
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for tensor_name, kind, inputs in _reparametrized(module):
            host = f'{mod_name}.{tensor_name}' if mod_name else tensor_name
            selected = _matches(host, include_p) if include_p else (
                tensor_name == 'weight' and isinstance(module, DEFAULT_MODULE_TYPES)
                and not _is_weight_standardized(module) and not _is_position_module(mod_name))
            if selected:
                computed.setdefault((id(module), tensor_name), (host, kind, inputs))
        for p_name, param in module.named_parameters(recurse=False):
            if param is None:
                continue
            name = f'{mod_name}.{p_name}' if mod_name else p_name
            if p_name.endswith('_orig') and p_name[:-5] + '_mask' in module._buffers:  # masked (not spectral norm's)
                p_name, name = p_name[:-5], name[:-5]
            if id(param) in aliases:  # a weight shared by several modules is one tensor: one target, one mask
                aliases[id(param)].append(name)
                continue
            aliases[id(param)] = [name]
            if param.dim() < 2:
                continue
            if include_p:
                if not _matches(name, include_p):
                    continue
            elif (p_name != 'weight' or not isinstance(module, DEFAULT_MODULE_TYPES) or _is_weight_standardized(module)
                  or _is_position_module(mod_name)):
                continue
            candidates.append(SparseTarget(name=name, module=module, param_name=p_name))
    if exclude_p:  # a tied weight excluded under any of its names is excluded
        candidates = [t for t in candidates if not any(_matches(n, exclude_p) for n in aliases[id(t.param)])]
    frozen = [t.name for t in candidates if not t.param.requires_grad]
    if frozen:
        # a weight that does not train cannot explore: DST would only prune it. Leave it dense, and say so
        warnings.warn(f'timm_dst: {len(frozen)} frozen weight(s) (requires_grad=False) stay dense: '
                      f'{", ".join(frozen[:5])}{" ..." if len(frozen) > 5 else ""}; unfreeze them before creating '
                      'the sparsifier to make them sparse', stacklevel=4)
        candidates = [t for t in candidates if t.param.requires_grad]
    chosen = {id(t.param) for t in candidates}
    dense = [f'{host} ({kind})' for host, kind, inputs in computed.values()
             if not inputs & chosen and not (exclude_p and _matches(host, exclude_p))]
    if dense:
        # a mask sits on a parameter; a parametrized weight is computed from other tensors in the forward
        warnings.warn(f'timm_dst: {len(dense)} parametrized weight(s) stay dense: {", ".join(dense[:5])}'
                      f'{" ..." if len(dense) > 5 else ""}; the forward computes them from other tensors, which the '
                      'masks and methods do not handle: remove the parametrization before creating the sparsifier '
                      '(torch.nn.utils.parametrize.remove_parametrizations, or remove_weight_norm / '
                      'remove_spectral_norm for the old hooks) to make them sparse, or exclude= them', stacklevel=4)
    _check_shared_storage(candidates)

    cfg = getattr(model, 'pretrained_cfg', None) or {}
    drop: set[str] = set()
    if dense_first_layer and candidates:
        names = _module_for_cfg_name(model, cfg.get('first_conv'))
        hits = [t.name for t in candidates if t.name.rsplit('.', 1)[0] in names]
        drop.update(hits or [candidates[0].name])
    if dense_classifier and candidates:
        names = _module_for_cfg_name(model, cfg.get('classifier'))
        hits = [t.name for t in candidates if t.name.rsplit('.', 1)[0] in names]
        if not hits:
            linears = [t for t in candidates if isinstance(t.module, nn.Linear)]
            hits = [(linears or candidates)[-1].name]
        drop.update(hits)
    targets = [t for t in candidates if t.name not in drop]
    bases = _low_rank_bases(model)
    adapted = [f'{t.name} ({bases[id(t.module)]}.lora_A / lora_B)' for t in targets if id(t.module) in bases]
    if adapted:
        warnings.warn(f'timm_dst: {len(adapted)} sparse weight(s) get a dense low-rank product added in the forward: '
                      f'{", ".join(adapted[:5])}{" ..." if len(adapted) > 5 else ""}; the layers\' effective weights '
                      'are not sparse whatever the masks: merge the adapters into the weights first (peft: '
                      'merge_and_unload()) to sparsify the merged weights, or exclude= them', stacklevel=4)
    return targets


# ------------------------------------------------------------------------------------------------------------------
# checks before anything is attached (the controller calls them; each refuses with a one-line ValueError)
def check_unmasked(targets: list[SparseTarget]) -> None:
    """Refuse targets that already carry a mask (the model was sparsified before)."""
    carrying = [t.name for t in targets if has_mask(t.module, t.param_name)]
    if carrying:
        raise ValueError(
            f'model: {", ".join(carrying[:5])}{" ..." if len(carrying) > 5 else ""} already carr'
            f'{"ies" if len(carrying) == 1 else "y"} a mask (the model was sparsified before): continue with that '
            'sparsifier (sp.load_state_dict restores a saved one), or call timm_dst.fold_masks(model) first '
            '(it detaches a live sparsifier and keeps the zeros) to sparsify it again')


def check_trained(targets: list[SparseTarget], optimizer: Any) -> None:
    """Refuse sparse weights the optimizer does not train."""
    held = {id(p) for group in optimizer.param_groups for p in group['params']}
    missing = [t.name for t in targets if id(t.param) not in held]
    if missing:
        hint = (' (under FSDP2, build the optimizer after fully_shard: sharding replaces the parameters)'
                if is_dtensor(targets[0].param) else '')
        raise ValueError(
            f'optimizer: does not hold the sparse weight(s) {", ".join(missing[:5])}'
            f'{" ..." if len(missing) > 5 else ""} ({len(missing)} of {len(targets)}), so they would never '
            f'train: pass the optimizer of this model, or leave them out with exclude={hint}')


def check_materialized(targets: list[SparseTarget]) -> None:
    """Refuse sparse weights on the meta device (a model built under ``torch.device('meta')``, e.g. for FSDP2
    initialisation).

    Not supported: initial masks are chosen from (magnitude) or written into real tensors, counts are read back,
    and ``to_empty`` would later replace the mask buffers by uninitialised memory and the weights by values that
    are not zero where masked. Materialise the model first, then attach.
    """
    on_meta = [t.name for t in targets if t.param.device.type == 'meta']
    if on_meta:
        raise ValueError(
            f'model: {len(on_meta)} sparse weight(s) are on the meta device ({", ".join(on_meta[:5])}'
            f'{" ..." if len(on_meta) > 5 else ""}) and have no values to mask: materialise the model first '
            '(model.to_empty(device=...), then initialise or load its weights), then build the optimizer and call '
            'create_sparsifier')
