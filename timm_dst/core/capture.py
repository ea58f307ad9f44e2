"""Dense-gradient capture: the gradient of each sparse weight at every position, inactive ones included.

RigL and SNFS score growth by the dense gradient, which ``.grad`` no longer has (it is masked). The controller asks
for it on the steps a method needs it (``needs_dense_grad``) and reads it through :class:`GradCapture`, the interface
that both captures implement: :class:`LocalCapture` (one process or DDP: a tensor hook on the parameter itself) and
:class:`~timm_dst.distributed.fsdp.ShardedCapture` (FSDP2: the reduce-scattered shard, before it is masked). A capture
owns its buffers (``grads``); nothing else writes them.

The capture window is the lifetime of ``.grad``: micro-steps are summed while ``.grad`` is the tensor the last capture
accumulated into, and zeroing the gradients starts a new window (docs/design.md, invariant 7).
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ..distributed.fsdp import full, is_dtensor, shard_like

__all__ = ['GradCapture', 'LocalCapture', 'like_param']


@runtime_checkable
class GradCapture(Protocol):
    """What the controller needs of a dense-gradient capture (one buffer per sparse tensor).

    Attributes:
        grads: The captured gradient of each sparse tensor (float32, shaped like its weight; a ``DTensor`` shard under
            FSDP2), None where nothing was captured in the current window. Read-only for everyone but the capture.
        handles: The removable hooks while capturing (empty otherwise: truthy exactly while capturing).
    """

    grads: list[torch.Tensor | None]
    handles: list[Any]

    @property
    def active(self) -> bool:
        """Whether the hooks are installed."""

    def start(self, targets: Sequence[Any], dst_masks: Sequence[Any]) -> None:
        """Install the hooks on the sparse tensors (``targets``, with their attached ``DSTMask`` s)."""

    def stop(self) -> None:
        """Remove the hooks; the captured gradients stay."""

    def clear(self) -> None:
        """Forget the captured gradients."""

    def load(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Replace the captured gradients (a restored state)."""


class LocalCapture:
    """The capture of unsharded weights (one process, DDP): a tensor hook on each parameter sees its whole gradient,
    from every use in the graph (the child's forward or a parent reading the child's weight), before it accumulates
    into ``.grad`` and is masked there; a post-accumulate hook (after the masking one) notes which ``.grad`` the
    capture belongs to.

    Under DDP each rank holds its own rank's gradient; the controller averages over the ranks when a method reads it.
    """

    def __init__(self, n: int):
        self.grads: list[torch.Tensor | None] = [None] * n
        self.marks: list[tuple[Any, int] | None] = [None] * n  # .grad (weak) and its version after the last capture
        self.handles: list[Any] = []
        self._targets: list[Any] = []

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def start(self, targets: Sequence[Any], dst_masks: Sequence[Any]) -> None:
        self.stop()
        self._targets = list(targets)
        for i, t in enumerate(targets):
            self.handles.append(t.param.register_hook(functools.partial(self._accumulate, i)))
            self.handles.append(t.param.register_post_accumulate_grad_hook(functools.partial(self._mark, i)))

    def stop(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._targets = []

    def clear(self) -> None:
        self.grads = [None] * len(self.grads)

    def load(self, grads: Sequence[torch.Tensor | None]) -> None:
        self.grads = list(grads)

    def _accumulate(self, i: int, grad: torch.Tensor) -> None:
        """Capture window = lifetime of ``.grad``: the capture sums micro-steps only while ``.grad`` is the tensor the
        last capture accumulated into, unchanged since. Zeroing the gradients (``zero_grad``, set to None or to zero)
        starts a new window, so a backward whose step was skipped (``GradScaler`` after an overflow) leaves no trace.
        """
        g = grad.detach().float()
        held, mark, current = self.grads[i], self.marks[i], self._targets[i].param.grad
        same = (held is not None and mark is not None and current is not None and mark[0]() is current
                and mark[1] == current._version)
        if same:
            held.add_(g)
        else:
            self.grads[i] = g.clone()

    def _mark(self, i: int, param: torch.Tensor) -> None:
        grad = param.grad
        self.marks[i] = (weakref.ref(grad), grad._version) if grad is not None else None

    def __getstate__(self) -> dict[str, Any]:
        """Copies keep the captured gradients; hooks and weak references to this model's gradients are not copied
        (the controller starts the copy's capture again)."""
        return {'grads': self.grads, 'marks': [None] * len(self.grads), 'handles': [], '_targets': []}


def like_param(x: torch.Tensor, param: torch.Tensor, sharded: bool) -> torch.Tensor:
    """``x`` (float32, shaped like ``param``) on its device, sharded like it when the weight is."""
    if sharded:
        return x.to(param.device) if is_dtensor(x) else shard_like(x.to(param.device), param)
    return full(x).to(param.device)
