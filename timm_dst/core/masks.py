"""``torch.nn.utils.prune`` glue: the mask pruning method (DSTMask), attach / fold / export.

A sparse tensor ``module.<name>`` becomes, after :func:`attach_mask`, the usual ``torch.nn.utils.prune`` triple:
``<name>_orig`` (the trainable parameter), ``<name>_mask`` (a **bool** buffer) and ``<name>`` (recomputed as
``orig * mask`` by a forward pre-hook). Masks are attached once and afterwards only changed in place, so the hook,
compiled graphs and DDP keep referencing the same buffer.
"""
from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.utils import prune

from ..distributed.fsdp import (
    flat_fill_,  # noqa: F401  (re-exported: it moved to distributed.fsdp)
    full,
    is_dtensor,
)
from ..distributed.fsdp import fsdp_modules as _fsdp_modules
from ..distributed.fsdp import rename_fsdp_params as _fsdp_rename
from ..kernels.sparse_linear import (
    BLOCK_TRAIN_MIN_AREA,
    DEFAULT_BLOCK_MAX_DENSITY,
    BlockStructure,
    CsrStructure,
    SparseLinearForward,
    block_structure,
    csr_structure,
    find_block_size,
)

__all__ = [
    'DSTMask', 'attach_mask', 'attach_masks', 'effective_weight', 'refresh_weight', 'fold_masks', 'export_state_dict',
    'unwrap_model', 'has_mask', 'flat_fill_',
]

_WRAPPER_PREFIXES = ('module.', '_orig_mod.')
INDEX_MAX_DENSITY = 0.05  # masks at most this dense keep their active indices (gradient gather / CSR kernels)


class DSTMask(prune.BasePruningMethod):
    """A pruning method whose mask is given (a bool tensor of the parameter's shape).

    Used once per tensor by :func:`attach_mask`; later topology changes write into the ``<name>_mask`` buffer.
    Unlike ``prune.custom_from_mask``, the forward pre-hook does not compute ``orig * mask`` (a full copy and
    multiply per forward, and another in the backward): on the module the sparsifier controls, ``module.<name>`` *is*
    the parameter ``<name>_orig`` (an instance attribute, not a second registered parameter), so its forward pre-hook
    has nothing to do, and a hook on ``<name>_orig`` masks its gradient as it accumulates. That is exact because the
    sparsifier keeps ``orig`` zero wherever the mask is False (docs/design.md, invariant 2), so ``orig == orig * mask``
    and the masked ``orig.grad`` is the gradient ``orig * mask`` would give.
    """

    PRUNING_TYPE = 'unstructured'
    #: The structure this tensor's mask keeps (set by the sparsifier): a canonical spec (``'2:4'``, ``'fan-in'``,
    #: ``'32x32'``) or None (unstructured, by choice or because the tensor's shape does not fit).
    structure: str | None = None

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self._grad_hook = None
        self._owner: weakref.ref | None = None
        self._index_cache: tuple | None = None
        self._masked_grad: tuple[int, int] | None = None  # (data_ptr, version) of a gradient produced masked
        self.dense_grad_wanted = False  # set by the sparsifier on steps whose method reads the dense gradient
        self.capture: Any = None  # sharded (FSDP2) tensors: the dense-gradient capture, run around the masking
        self.sharded = False  # attached to an FSDP2 shard (set by the sparsifier)
        self._hooked: weakref.ref | None = None  # the parameter the gradient hook sits on
        self._replaced_ok = False  # that parameter was replaced, not by fully_shard: checked once
        self.controller: weakref.ref | None = None  # the Sparsifier controlling the owner (fold_masks detaches it)
        self.root: weakref.ref | None = None  # the model the sparsifier was attached to (the late-shard check)
        # copies only: the module the copy was taken from, and whether the copy follows its live mask (see sync_copy)
        self._source: weakref.ref | None = None
        self._follow = False
        self._seen: tuple[weakref.ref, int] | None = None  # (mask buffer, version) last seen on the copy
        self._handles: list = []

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        if self.mask.shape != t.shape:
            raise ValueError(f'mask shape {tuple(self.mask.shape)} does not match tensor shape {tuple(t.shape)}')
        return self.mask.to(device=t.device, dtype=torch.bool)

    def __call__(self, module: nn.Module, inputs: object) -> None:
        """Forward pre-hook: on the controlled module, check that ``module.<name>`` still is ``<name>_orig`` (a
        conversion that replaced the parameter object would have left a stale alias); on copies, ``orig * mask``."""
        if self.owns(module):
            if not self.sharded:
                self._check_not_sharded_later(module)
            _alias_orig(module, self._tensor_name)
        else:
            setattr(module, self._tensor_name, self.apply_mask(module))

    def _check_not_sharded_later(self, module: nn.Module) -> None:
        """Refuse a model that ``fully_shard`` sharded after the masks were attached: FSDP2 replaced the parameter the
        gradient hook sits on, so masked weights would train (one identity check per forward).

        The check reads only the model (the parameter now registered is a ``DTensor``, or the model the masks were
        attached to holds ``fully_shard`` modules), never the sparsifier or the replaced parameter, which may have
        been garbage collected: masks left on a model whose sparsifier is gone keep a static sparse model (gradients
        stay masked, the topology stops changing), and sharding it afterwards is refused all the same.
        """
        if self._replaced_ok:
            return
        current = module._parameters.get(self._tensor_name + '_orig')
        hooked = self._hooked() if self._hooked is not None else None
        if current is None or current is hooked:
            return
        root = self.root() if self.root is not None else None
        if is_dtensor(current) or (root is not None and _fsdp_modules(root)):
            raise RuntimeError(
                'model: fully_shard (FSDP2) was applied after create_sparsifier, which is not supported (the masks '
                'stay whole and their gradient hooks stay on the replaced parameters): fully_shard the blocks and the '
                'model first, then build the optimizer, then call create_sparsifier (docs/distributed.md)')
        self._replaced_ok = True

    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is the one the sparsifier controls (not a ``deepcopy`` of it, such as timm's EMA)."""
        return self._owner is not None and self._owner() is module

    def apply_mask(self, module: nn.Module) -> torch.Tensor:
        """``orig`` itself on the module the sparsifier controls; ``orig * mask`` on copies of it (timm's EMA
        averages ``orig``, which is then not exactly zero at positions dropped since)."""
        orig = getattr(module, self._tensor_name + '_orig')
        if self.owns(module):
            return orig
        self.sync_copy(module)
        return orig * getattr(module, self._tensor_name + '_mask')

    def sync_copy(self, module: nn.Module) -> None:
        """On a copy of the controlled module: keep its mask buffer at the live model's mask once the copy is being
        averaged.

        timm's ``ModelEma`` / ``ModelEmaV2`` average every ``state_dict`` entry, bool masks included: written back as
        bool, the average is the union of every mask ever used. A copy whose mask buffer was written by anything but
        ``load_state_dict`` (an EMA's update; ``ModelEmaV3`` copies the mask exactly) therefore follows the mask of the
        module it was copied from while that one is alive, like ``ModelEmaV3``. A copy nobody writes into (a
        ``deepcopy`` snapshot, a loaded checkpoint) keeps its own mask.
        """
        source = self._source() if self._source is not None else None
        if source is None:
            return
        mask = module._buffers.get(self._tensor_name + '_mask')
        if mask is None:
            return
        seen = self._seen
        if seen is not None and seen[0]() is mask and seen[1] != mask._version:
            self._follow = True  # written since we last looked, and not by load_state_dict
        if self._follow:
            live = source._buffers.get(self._tensor_name + '_mask')
            if live is not None and live.shape == mask.shape and not torch.equal(live.to(mask.device), mask):
                with torch.no_grad():
                    mask.copy_(live)
        self._seen = (weakref.ref(mask), mask._version)

    def note_loaded(self, module: nn.Module) -> None:
        """``load_state_dict`` wrote the copy's mask: it keeps that mask from now on."""
        mask = module._buffers.get(self._tensor_name + '_mask')
        self._follow = False
        self._seen = (weakref.ref(mask), mask._version) if mask is not None else None

    _NOT_COPIED = ('_owner', '_grad_hook', '_index_cache', '_masked_grad', 'controller', '_source', '_seen', 'capture',
                   '_hooked', 'root')

    def __getstate__(self) -> dict:
        # copies (deepcopy, pickling) are not kept zero by a sparsifier: they fall back to orig * mask. The handles of
        # the state-dict hooks stay: they are (hooks dict, key) pairs, and the dicts are copied with the module
        state = dict(self.__dict__)
        state.update({k: None for k in self._NOT_COPIED})
        return state

    def __deepcopy__(self, memo: dict) -> DSTMask:
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__getstate__().items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        # a copy remembers the module it was taken from (weak: the copy does not keep it alive). A copy of a copy
        # follows the same module, or that module's own copy when both are copied in one call (deepcopy((model, ema)))
        if self._owner is not None:
            new._source = self._owner
        else:
            module = self._source() if self._source is not None else None
            new._source = weakref.ref(memo[id(module)]) if module is not None and id(module) in memo else self._source
        return new

    def install_grad_mask(self, module: nn.Module) -> None:
        """Mask ``<name>_orig.grad`` in place right after each accumulation into it, before DDP's reducer reads it
        (buffers are looked up per call: ``module.to()`` swaps them), and make ``module`` the controlled one."""
        self._install_grad_hook(module)
        self._handles = [module.register_state_dict_post_hook(_sync_copies),
                         module.register_load_state_dict_post_hook(_note_loaded)]

    def adopt(self, module: nn.Module) -> None:
        """Make this mask of a copied model the controlled one of ``module`` (the copy): used when a
        :class:`~timm_dst.Sparsifier` is copied or unpickled together with its model.

        The gradient hook (which a copy does not carry: tensor hooks are not copied) is installed on the copy's
        ``<name>_orig``, ``module.<name>`` becomes that parameter again, and the copy stops following the mask of the
        module it was copied from. The state-dict hooks came with the copy (their handles too).
        """
        if self._owner is not None and self._owner() is not None:
            raise RuntimeError(f'{type(module).__name__}.{self._tensor_name}: this mask is controlled already')
        self._source, self._follow, self._seen = None, False, None
        self._install_grad_hook(module)
        _alias_orig(module, self._tensor_name)

    def _install_grad_hook(self, module: nn.Module) -> None:
        name = self._tensor_name

        def _mask_grad(param: torch.Tensor) -> None:
            grad, produced, self._masked_grad = param.grad, self._masked_grad, None
            if grad is None:
                return
            # the sparse kernels' gradient is masked already; it is still .grad, unchanged, only when autograd stored
            # it as it was: any other contribution (a parent reading the weight, an earlier micro-batch, a user hook)
            # means a different tensor or a bumped version, and then the sum is masked here
            if produced is not None and produced == (grad.data_ptr(), grad._version):
                return
            capture = self.capture
            if capture is not None:  # FSDP2: the reduce-scattered shard, before it is masked
                capture.before(param)
            self.mask_grad_(grad, getattr(module, name + '_mask'))
            if capture is not None:
                capture.after(param)

        self._grad_hook = getattr(module, name + '_orig').register_post_accumulate_grad_hook(_mask_grad)
        self._hooked = weakref.ref(getattr(module, name + '_orig'))
        self._owner = weakref.ref(module)

    def note_masked_grad(self, grad: torch.Tensor) -> None:
        """Record a weight gradient produced already masked (by the sparse kernels), for the accumulation hook."""
        self._masked_grad = (grad.data_ptr(), grad._version)

    def mask_grad_(self, grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Zero ``grad`` where ``mask`` is False, in place; returns ``grad``.

        In place, because a new tensor per weight and step is a fresh allocation whose page faults cost more than the
        masking itself on CPU. Two CPU forms are cached per mask version (rebuilt only after the mask changes):

        - at most :data:`INDEX_MAX_DENSITY` active: the sorted int64 indices of the active positions (8 bytes per
          active weight, at most 0.4 per weight): gather them, zero the tensor, scatter them back;
        - denser: a copy of the mask in the gradient's dtype (4 bytes per float32 weight) and one multiply, 2-4x
          faster than ``torch.where`` with the bool mask.

        On accelerators, and for layouts other than contiguous, a multiply by the bool mask.
        """
        if is_dtensor(grad):  # an FSDP2 gradient shard and the mask shard of the same rows
            with torch.no_grad():
                grad.to_local().mul_(mask.to_local())
            return grad
        if grad.device.type != 'cpu' or not grad.is_contiguous() or grad.shape != mask.shape:
            return grad.mul_(mask)
        cache = self._mask_cache(mask)
        if cache['index'] is not None:
            flat = grad.view(-1)
            kept = flat.index_select(0, cache['index'])
            return flat.zero_().index_copy_(0, cache['index'], kept).view_as(grad)
        scale = cache.get(grad.dtype)
        if scale is None:
            scale = cache[grad.dtype] = mask.to(grad.dtype)
        return grad.mul_(scale)

    def _mask_cache(self, mask: torch.Tensor) -> dict:
        """Per-version facts about ``mask``: ``n_active``, ``index`` (sorted active flat indices when at most
        :data:`INDEX_MAX_DENSITY` is active, else None) and, filled on demand, the mask in gradient dtypes and the CSR
        structure of the sparse kernels."""
        cache = self._index_cache
        if cache is not None and cache['ref']() is mask and cache['version'] == mask._version:
            return cache
        n_active = int(torch.count_nonzero(mask))
        index = mask.reshape(-1).nonzero().squeeze(1) if n_active <= INDEX_MAX_DENSITY * mask.numel() else None
        self._index_cache = {'ref': weakref.ref(mask), 'version': mask._version, 'n_active': n_active, 'index': index}
        return self._index_cache

    def install_sparse_kernels(self, module: nn.Module, max_density: float, n_active: int) -> bool:
        """Give a plain ``nn.Linear`` CSR kernels while at most ``max_density`` of it is active, or block kernels while
        its mask is made of whole blocks at most ``DEFAULT_BLOCK_MAX_DENSITY`` dense (see
        :mod:`timm_dst.kernels.sparse_linear`; both off when ``max_density`` is 0); take them away otherwise, so denser
        layers pay nothing per call. Called again whenever the layer's budget changes (DSR moves budgets between
        layers).

        Args:
            module: The module this mask is attached to.
            max_density: Density limit of the kernels (0: never).
            n_active: Active weights in the mask now.

        Returns:
            Whether the kernels are installed (only on exact ``nn.Linear`` modules, masked on ``weight``).
        """
        installed = isinstance(module.__dict__.get('forward'), SparseLinearForward)
        mask = getattr(module, self._tensor_name + '_mask')
        numel = mask.numel()
        wanted = (type(module) is nn.Linear and self._tensor_name == 'weight' and max_density > 0
                  and (n_active <= max_density * numel
                       or self.blocks(mask, DEFAULT_BLOCK_MAX_DENSITY) is not None))
        if wanted and not installed:
            module.forward = SparseLinearForward(module, self, max_density)
        elif installed and not wanted:
            del module.forward
        return wanted

    def csr(self, mask: torch.Tensor, max_density: float) -> CsrStructure | None:
        """The cached CSR structure of ``mask``, or None when its density is above ``max_density``."""
        cache = self._mask_cache(mask)
        if mask.dim() != 2 or cache['n_active'] > max_density * mask.numel():
            return None
        if cache['index'] is None:  # a limit above INDEX_MAX_DENSITY: the kernels need the indices all the same
            cache['index'] = mask.reshape(-1).nonzero().squeeze(1)
        if 'csr' not in cache:  # per mask version, like the rest of the cache
            cache['csr'] = csr_structure(cache['index'], tuple(mask.shape))
        return cache['csr']

    def blocks(self, mask: torch.Tensor, max_density: float) -> BlockStructure | None:
        """The cached active blocks of ``mask`` when it is made of whole blocks (``R x C`` with ``R * C >= 1024``,
        :data:`~timm_dst.kernels.sparse_linear.BLOCK_TRAIN_MIN_AREA`) and at most ``max_density`` dense; None otherwise.

        The block size is the declared :attr:`structure` when it is ``'RxC'``; a mask declared ``'N:M'`` or
        ``'fan-in'`` has no blocks; an unstructured one (None: masks set by hand, by ``set_masks``, or by a method of
        its own) is looked at for the block sizes of :data:`timm_dst.kernels.sparse_linear.BLOCK_CANDIDATES`, once per
        mask version (the first block row is checked first, so an unstructured mask costs little).
        """
        cache = self._mask_cache(mask)
        if max_density <= 0 or mask.dim() != 2 or cache['n_active'] > max_density * mask.numel():
            return None
        if 'blocks' not in cache:  # per mask version
            cache['blocks'] = None
            declared = getattr(self, 'structure', None)
            if declared is None:
                found = find_block_size(mask, min_area=BLOCK_TRAIN_MIN_AREA)
            else:
                size = _block_size(declared)
                found = find_block_size(mask, (size,), BLOCK_TRAIN_MIN_AREA) if size is not None else None
            if found is not None:
                cache['blocks'] = block_structure(found[1], found[0], tuple(mask.shape))
        return cache['blocks']

    def remove(self, module: nn.Module) -> None:
        if isinstance(module.__dict__.get('forward'), SparseLinearForward):
            del module.forward
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        super().remove(module)


def _block_size(structure: object) -> tuple[int, int] | None:
    """``(R, C)`` of a block structure spec ``'RxC'``; None for any other spec (or None)."""
    if not isinstance(structure, str) or 'x' not in structure:
        return None
    r, _, c = structure.partition('x')
    return (int(r), int(c)) if r.isdigit() and c.isdigit() else None


def _sync_copies(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook: copies of a controlled module report (and EMAs average) the live mask."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, DSTMask) and not hook.owns(module):
            hook.sync_copy(module)


def _note_loaded(module: nn.Module, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook: a copy keeps the mask it was loaded with."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, DSTMask) and not hook.owns(module):
            hook.note_loaded(module)


def has_mask(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` carries a mask (ours or any ``torch.nn.utils.prune`` method)."""
    return name + '_orig' in module._parameters or name + '_mask' in module._buffers


def _find_dst_mask(module: nn.Module, name: str) -> DSTMask | None:
    """The :class:`DSTMask` attached to ``module.<name>``, if any."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, DSTMask) and hook._tensor_name == name:
            return hook
    return None


def effective_weight(module: nn.Module, name: str) -> torch.Tensor:
    """The weight the forward of ``module`` uses for its masked tensor ``name`` (see :meth:`DSTMask.apply_mask`)."""
    dst_mask = _find_dst_mask(module, name)
    if dst_mask is not None:
        return dst_mask.apply_mask(module)
    orig = getattr(module, name + '_orig')
    return orig * getattr(module, name + '_mask')


def attach_mask(module: nn.Module, name: str, mask: torch.Tensor) -> DSTMask:
    """Attach a bool mask to ``module.<name>`` through :class:`DSTMask` and zero the masked values of ``<name>_orig``.

    Args:
        module: Module owning the parameter.
        name: Parameter name inside ``module`` (e.g. ``'weight'``).
        mask: Bool tensor of the parameter's shape, True = active.

    Returns:
        The :class:`DSTMask` now attached.
    """
    return attach_masks([(module, name, mask)])[0]


def attach_masks(items: list[tuple[nn.Module, str, torch.Tensor]]) -> list[DSTMask]:
    """Attach several masks all or none (see :func:`attach_mask`): on an error, the masks attached so far are taken
    off again and the parameters restored, values included.

    Args:
        items: ``(module, name, mask)`` triples.

    Returns:
        The attached :class:`DSTMask` of each item.
    """
    for module, name, _ in items:
        if has_mask(module, name):
            raise ValueError(f'{type(module).__name__}.{name} already carries a mask; attach masks only once '
                             '(timm_dst.fold_masks(model) makes a model plain again)')
    done: list[tuple[nn.Module, str, DSTMask]] = []
    orders = {id(module): (module, list(module._parameters)) for module, _, _ in items}  # to restore on failure
    try:
        for module, name, mask in items:
            dst_mask = DSTMask.apply(module, name, mask=mask)
            done.append((module, name, dst_mask))
            dst_mask.install_grad_mask(module)
            refresh_weight(module, name)  # the alias now: prune's apply left a dense orig * mask copy there
    except BaseException:
        for module, name, dst_mask in reversed(done):
            _detach(module, name, dst_mask)
        for module, order in orders.values():  # parameter order is state_dict order (timm's EMA zips by position)
            params = dict(module._parameters)
            module._parameters.clear()
            module._parameters.update((k, params[k]) for k in order if k in params)
            module._parameters.update((k, v) for k, v in params.items() if k not in order)
        raise
    with torch.no_grad():
        for module, name, _ in done:
            getattr(module, name + '_orig').mul_(getattr(module, name + '_mask'))
            refresh_weight(module, name)
    return [m for _, _, m in done]


def _detach(module: nn.Module, name: str, dst_mask: DSTMask) -> None:
    """Undo :meth:`DSTMask.apply` without folding: the parameter comes back unchanged."""
    if dst_mask._grad_hook is not None:
        dst_mask._grad_hook.remove()
    for handle in dst_mask._handles:
        handle.remove()
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is dst_mask:
            del module._forward_pre_hooks[key]
    orig = module._parameters.pop(name + '_orig')
    module._buffers.pop(name + '_mask', None)
    module.__dict__.pop(name, None)
    module._parameters[name] = orig


def _alias_orig(module: nn.Module, name: str) -> None:
    """Make ``module.<name>`` the parameter ``<name>_orig`` itself, as a plain instance attribute (``nn.Module``'s
    ``__setattr__`` would register it as a second parameter). ``copy.deepcopy`` and pickling keep the alias pointing
    at the copy's own ``<name>_orig``."""
    orig = getattr(module, name + '_orig')  # looked up per call: torch.func.functional_call substitutes it
    if module.__dict__.get(name) is not orig:
        object.__setattr__(module, name, orig)


def refresh_weight(module: nn.Module, name: str) -> None:
    """Reset ``module.<name>``: ``<name>_orig`` itself on the module the sparsifier controls (its forward and any
    parent reading ``module.<name>`` then train ``<name>_orig`` directly), a detached ``orig * mask`` elsewhere."""
    dst_mask = _find_dst_mask(module, name)
    if dst_mask is not None and dst_mask.owns(module):
        _alias_orig(module, name)
        return
    with torch.no_grad():
        setattr(module, name, getattr(module, name + '_orig') * getattr(module, name + '_mask'))


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / FSDP-style ``.module`` and ``torch.compile``'s ``._orig_mod`` wrappers."""
    while True:
        if hasattr(model, '_orig_mod') and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, 'module') and isinstance(model.module, nn.Module) and len(model._modules) == 1:
            model = model.module
        else:
            return model


def fold_masks(model: nn.Module) -> nn.Module:
    """Make every attached mask permanent (``prune.remove``): the model becomes a plain model with zeros in it.

    A live :class:`~timm_dst.Sparsifier` controlling the model is detached first (its hooks are removed; its read-outs
    stay, its updates raise). Afterwards the model can be sparsified again with a new sparsifier.
    """
    for module in unwrap_model(model).modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, DSTMask) and hook.owns(module):
                controller = hook.controller() if hook.controller is not None else None
                if controller is not None:
                    controller._detach_masks()
    renamed = []
    for module in unwrap_model(model).modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.PruningContainer | DSTMask):
                if getattr(hook, 'sharded', False):
                    renamed.append((module, hook._tensor_name))
                prune.remove(module, hook._tensor_name)
    if renamed:  # FSDP2 manages the parameter under its own name again
        _fsdp_rename(unwrap_model(model), renamed, suffix='')
    return model


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
        key = key.replace('._orig_mod.', '.')
    return key


def export_state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor],
                      rank0_only: bool = False) -> OrderedDict[str, torch.Tensor]:
    """Plain timm state_dict of a sparse model: ``x_orig * x_mask -> x``, masks dropped, wrapper prefixes stripped.

    Args:
        model_or_state: A (possibly wrapped) model, or a state_dict taken from one.
        rank0_only: On a sharded model, only rank 0 keeps the gathered entries (the others return an empty dict):
            no other rank ever holds more than one whole tensor.

    On a model sharded with FSDP2 (``fully_shard``), every sharded entry is gathered, one at a time: a collective,
    call it on every rank; each rank gets the whole plain state dict (rank 0 alone with ``rank0_only``).

    Returns:
        A state_dict with the keys of the unpruned model, loadable strictly into ``timm.create_model(name)``.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():  # FSDP2 shards gathered one entry at a time, the rest as is
        if key.endswith('_mask') and key[:-5] + '_orig' in state:
            continue
        value = full(value)
        if key.endswith('_orig') and key[:-5] + '_mask' in state:
            value = value * full(state[key[:-5] + '_mask']).to(value.dtype)
            key = key[:-5]
        if keep:
            out[_strip_prefix(key)] = value.detach().clone()
    return out
