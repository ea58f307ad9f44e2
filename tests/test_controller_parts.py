"""The controller's parts (issue #26): the capture interface, the selectors chosen once per tensor, copies that keep
the parts' state, and old names that stay importable."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_dst
from timm_dst.core.capture import GradCapture, LocalCapture
from timm_dst.core.select import BlockSelector, ElementPlan, ElementSelector, GroupSelector, NMSelector, StructuredPlan
from timm_dst.distributed.fsdp import ShardedCapture


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_both_captures_implement_the_interface():
    assert isinstance(LocalCapture(3), GradCapture)
    assert isinstance(ShardedCapture(3), GradCapture)
    for capture in (LocalCapture(2), ShardedCapture(2)):
        assert not capture.active and capture.grads == [None, None]
        capture.load([torch.ones(1), None])
        assert capture.grads[0] is not None
        capture.clear()
        assert capture.grads == [None, None]


def test_the_controller_captures_through_its_part():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl', sparsity=0.8, update_interval=1000, total_steps=2000)
    sp._set_capture(True)
    assert sp._capture.active and sp._capture_handles
    _step(model, opt, 0)
    assert sp.has_dense_grads and sp._dense_grads is sp._capture.grads
    grads = sp.dense_grads()
    assert all(g.shape == t.shape for g, t in zip(grads, sp.targets))
    assert any(bool((g[~t.mask] != 0).any()) for g, t in zip(grads, sp.targets))  # inactive positions too
    sp.remove()
    assert not sp._capture.active and not sp._capture_handles


@pytest.mark.parametrize('structure, kinds', [
    (None, (ElementSelector,)), ('2:4', (NMSelector,)), ('fan-in', (GroupSelector,)), ('1x4', (BlockSelector,)),
])
def test_one_selector_per_tensor_chosen_once(structure, kinds):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = {'sparsity': 0.5} if structure == '2:4' else {'sparsity': 0.8}
    sp = timm_dst.create_sparsifier(model, opt, method='set', structure=structure, update_interval=2, total_steps=10,
                                    **kw)
    assert len(sp._selectors) == len(sp.targets)
    assert all(isinstance(sel, kinds) and sel.i == i for i, sel in enumerate(sp._selectors))
    assert isinstance(sp._plan, StructuredPlan if structure else ElementPlan)
    assert [sel.layout for sel in sp._selectors] == sp._layouts
    assert all(sp._bounds(i) == (sel.quantum, sel.cap) for i, sel in enumerate(sp._selectors))


def test_copies_keep_the_parts_state_and_continue_alike():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl-itop', sparsity=0.8, update_interval=2, total_steps=20)
    for s in range(3):
        _step(model, opt, s)
    assert sp._capture.active  # step 4 is an update: the capture is on
    for m2, o2, sp2 in (copy.deepcopy((model, opt, sp)), pickle.loads(pickle.dumps((model, opt, sp)))):
        assert sp2._capture is not sp._capture and sp2._capture.active
        assert sp2._guard is not sp._guard and sp2._writer is not sp._writer
        for s in range(3, 8):
            _step(m2, o2, s)
        assert sp2.step == 8
    for s in range(3, 8):
        _step(model, opt, s)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(sp.targets, sp2.targets))


def test_old_names_stay_importable():
    from timm_dst.core import controller
    from timm_dst.core.guard import NonFiniteGradientError
    from timm_dst.core.hooks import _AfterModelLoad, _ParentRefresh
    assert controller.NonFiniteGradientError is NonFiniteGradientError
    assert controller._ParentRefresh is _ParentRefresh and controller._AfterModelLoad is _AfterModelLoad
    assert callable(controller.topk_indices) and controller.MASK_INITS == ('random', 'magnitude', 'global-magnitude')
