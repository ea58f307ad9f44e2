"""Objects that are copied, pickled or moved, and weights held in another form (issue 25, items 2, 3 and 5).

Each test reproduces a failure seen on commit c679ab5, except where a test says it guards behaviour that already
worked (QAT modules, ``include=`` of a parametrization's input).
"""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_reliability import _batch, _mlp
from timm.utils import ModelEmaV2
from torch.nn.utils import parametrizations, parametrize

import timm_dst
from timm_dst.core.masks import DSTMask


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _build(method: str = 'set', **kwargs) -> tuple[nn.Module, torch.optim.Optimizer, timm_dst.Sparsifier]:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    kw = dict(sparsity=0.9, update_interval=2, total_steps=40, prune_rate_schedule='constant')
    kw.update(kwargs)
    sp = timm_dst.create_sparsifier(model, opt, method, **kw)
    return model, opt, sp


def _pickled(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._load_state_dict_post_hooks) + len(m._state_dict_hooks)
               for m in model.modules())


# --------------------------------------------------------------------------------------------------------------------
# item 2: copies of (model, optimizer, sparsifier)
@pytest.mark.parametrize('method', ['set', 'rigl'])  # rigl: the dense-gradient capture is on when copied
@pytest.mark.parametrize('how', ['deepcopy', 'deepcopy_sparsifier_first', 'torch_save'])
def test_copy_of_model_optimizer_sparsifier_continues_exactly(method, how):
    model, opt, sp = _build(method)
    x, y = _batch()
    for _ in range(3):
        _step(model, opt, x, y)
    if how == 'deepcopy':
        model2, opt2, sp2 = copy.deepcopy((model, opt, sp))
    elif how == 'deepcopy_sparsifier_first':
        sp2, opt2, model2 = copy.deepcopy((sp, opt, model))
    else:
        model2, opt2, sp2 = _pickled((model, opt, sp))
    assert sp2.model is model2 and sp2.optimizer is opt2
    for _ in range(7):
        _step(model, opt, x, y)
        _step(model2, opt2, x, y)
    assert sp2.step == sp.step == 10
    assert len(sp2.history) == len(sp.history) == 6  # the copy's topology updates ran (1 at attaching + 5)
    for t, t2 in zip(sp.targets, sp2.targets):
        assert torch.equal(t.mask, t2.mask), t.name
        assert not t2.param[~t2.mask].any(), t.name
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, v2), k
    assert sp2.itop_rate == sp.itop_rate and sp2.counts == sp.counts


def test_sparsifier_copied_alone_controls_its_own_model_and_optimizer():
    model, opt, sp = _build()
    x, y = _batch()
    _step(model, opt, x, y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for sp2 in (copy.deepcopy(sp), _pickled(sp), pickle.loads(pickle.dumps(sp))):
        assert sp2.model is not model and sp2.optimizer is not opt
        for _ in range(4):
            _step(sp2.model, sp2.optimizer, x, y)
        assert sp2.step == 5 and len(sp2.history) == 3
        assert all(int(t.mask.sum()) == c for t, c in zip(sp2.targets, sp2.counts))
    assert sp.step == 1 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_shallow_copy_of_sparsifier_is_refused():
    _, _, sp = _build()
    with pytest.raises(TypeError, match=r'shallow copy.*copy\.deepcopy\(\(model, optimizer, sparsifier\)\)'):
        copy.copy(sp)


def test_copy_of_removed_sparsifier_stays_removed():
    model, opt, sp = _build()
    x, y = _batch()
    _step(model, opt, x, y)
    sp.remove()
    model2, opt2, sp2 = copy.deepcopy((model, opt, sp))
    assert not opt2._optimizer_step_post_hooks
    for _ in range(3):
        _step(model2, opt2, x, y)
    assert sp2.step == 1
    for t in sp2.targets:  # the copy's masks still mask its gradients: masked weights stay zero
        assert not t.param[~t.mask].any(), t.name
        assert getattr(t.module, t.param_name) is t.param


def test_ema_copied_with_its_model_follows_the_copy():
    model, opt, sp = _build('set', update_interval=1)
    ema = ModelEmaV2(model, decay=0.9)  # averages the bool masks too: it must follow a live mask
    x, y = _batch()
    _step(model, opt, x, y)
    ema.update(model)
    model2, opt2, sp2, ema2 = copy.deepcopy((model, opt, sp, ema))
    for _ in range(3):
        _step(model2, opt2, x, y)
        ema2.update(model2)
    for _ in range(3):  # the original moves on to other masks
        _step(model, opt, x, y)
        ema.update(model)
    exported = timm_dst.export_state_dict(ema2.module)
    for t in sp2.targets:
        assert not exported[t.name][~t.mask].any(), t.name


def test_copy_of_a_sharded_sparsifier_is_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rdv', rank=0, world_size=1)
    try:
        model = _mlp()
        for i in (1, 3, 5):
            fully_shard(model[i])
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, total_steps=10)
        for copier in (copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match='fully_shard.*cannot be copied or pickled.*state_dict'):
                copier(sp)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# item 3: weights held in another form
class Double(nn.Module):  # a custom parametrization: named by its class in the warning
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w + 0.01  # zeros do not stay zeros


def _parametrize(model: nn.Module, kind: str) -> None:
    layer = model[3]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        if kind == 'weight_norm':
            parametrizations.weight_norm(layer)
        elif kind == 'spectral_norm':
            parametrizations.spectral_norm(layer)
        elif kind == 'orthogonal':
            parametrizations.orthogonal(layer)
        elif kind == 'Double':
            parametrize.register_parametrization(layer, 'weight', Double())
        elif kind == 'old weight_norm':
            torch.nn.utils.weight_norm(layer)
        elif kind == 'old spectral_norm':
            torch.nn.utils.spectral_norm(layer)


KINDS = ['weight_norm', 'spectral_norm', 'orthogonal', 'Double', 'old weight_norm', 'old spectral_norm']


@pytest.mark.parametrize('kind', KINDS)
def test_parametrized_weight_stays_dense_with_a_warning(kind):
    model = _mlp()
    _parametrize(model, kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=rf'1 parametrized weight\(s\) stay dense: 3\.weight \({kind}\).*remove'):
        sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.9, update_interval=2, total_steps=10)
    assert [t.name for t in sp.targets] == ['1.weight', '5.weight']
    x, y = _batch()
    for _ in range(3):
        _step(model, opt, x, y)
    assert all(not t.param[~t.mask].any() for t in sp.targets)
    # excluded by its name: no warning
    model = _mlp()
    _parametrize(model, kind)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        timm_dst.create_sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), 'set', sparsity=0.9,
                                   total_steps=10, exclude='3.weight')


@pytest.mark.parametrize('kind, name', [('spectral_norm', '3.parametrizations.weight.original'),
                                        ('old spectral_norm', '3.weight_orig')])
def test_include_of_a_parametrization_input_masks_it(kind, name):
    """``include=`` naming the input of a parametrization that keeps zeros masks it (the new-style case guards
    behaviour that already worked; the old hook's ``weight_orig`` was refused as 'already carries a mask')."""
    model = _mlp()
    _parametrize(model, kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.8, update_interval=2, total_steps=10,
                                        include=['1.weight', name, '5.weight'])
    assert [t.name for t in sp.targets] == ['1.weight', name, '5.weight']
    x, y = _batch()
    for _ in range(5):
        _step(model, opt, x, y)
    target = sp.targets[1]
    assert int(target.mask.sum()) == sp.counts[1] < target.numel
    assert not model[3].weight[~target.mask].any()  # the weight the forward uses is zero where masked
    # a copy (an EMA's average is not zero where masked) computes the weight from orig * mask
    with torch.no_grad():
        model(x)  # torch refuses to deepcopy the non-leaf weight an old hook leaves after a training forward
    twin = copy.deepcopy(model)
    with torch.no_grad():
        getattr(twin.get_submodule(name.rsplit('.', 1)[0]), target.param_name + '_orig').add_(1.0)
        twin(x)
        assert not twin[3].weight[~target.mask].any()


class _PeftLora(nn.Module):
    """A LoRA layer laid out as peft's: ``base_layer`` plus ``lora_A`` / ``lora_B`` adapters (ModuleDicts)."""

    def __init__(self, base: nn.Linear, r: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({'default': nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({'default': nn.Linear(r, base.out_features, bias=False)})
        nn.init.normal_(self.lora_B['default'].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B['default'](self.lora_A['default'](x))


class _LoralibLinear(nn.Linear):
    """A LoRA layer laid out as loralib's: the layer itself with ``lora_A`` / ``lora_B`` parameters."""

    def __init__(self, n_in: int, n_out: int, r: int = 2):
        super().__init__(n_in, n_out)
        self.lora_A = nn.Parameter(torch.randn(r, n_in))
        self.lora_B = nn.Parameter(torch.randn(n_out, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.lora_A.t() @ self.lora_B.t()


@pytest.mark.parametrize('layout', ['peft', 'loralib'])
def test_low_rank_adapter_on_a_sparse_weight_is_named(layout):
    model = _mlp()
    torch.manual_seed(1)
    model[3] = _PeftLora(model[3]) if layout == 'peft' else _LoralibLinear(48, 32)
    name = '3.base_layer.weight' if layout == 'peft' else '3.weight'
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=rf'dense low-rank product.*{name} \(3\.lora_A / lora_B\).*merge'):
        sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.9, total_steps=10)
    assert name in [t.name for t in sp.targets]


def test_qat_layers_are_sparse_through_fake_quantization():
    """Guards behaviour that already worked: QAT layers are targets, and the fake-quantized weight the forward uses is
    zero wherever the mask is."""
    from torch.ao.nn import qat
    model = _mlp()
    qconfig = torch.ao.quantization.get_default_qat_qconfig('x86')
    model[3] = qat.Linear(48, 32, qconfig=qconfig)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.9, update_interval=2, total_steps=10)
    assert '3.weight' in [t.name for t in sp.targets]
    x, y = _batch()
    for _ in range(5):
        _step(model, opt, x, y)
    target = sp.targets[[t.name for t in sp.targets].index('3.weight')]
    with torch.no_grad():
        fake = model[3].weight_fake_quant(model[3].weight)
    assert not fake[~target.mask].any()
    assert int(target.mask.sum()) == sp.counts[1]


# --------------------------------------------------------------------------------------------------------------------
# item 5: a model on the meta device
def test_meta_model_is_refused_before_anything_is_touched():
    with torch.device('meta'):
        model = _mlp()
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r'^model: 3 sparse weight\(s\) are on the meta device \(1\.weight, 3\.weight, '
                                         r'5\.weight\).*to_empty.*create_sparsifier$'):
        timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.9, total_steps=10)
    assert list(model.state_dict()) == keys and _hooks(model) == 0
    assert not any(isinstance(h, DSTMask) for m in model.modules() for h in m._forward_pre_hooks.values())
    # materialised and initialised, the same model is sparsified
    model.to_empty(device='cpu')
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, 'set', sparsity=0.9, update_interval=1, total_steps=10)
    x, y = _batch()
    _step(model, opt, x, y)
    assert sp.step == 1 and all(not t.param[~t.mask].any() for t in sp.targets)
