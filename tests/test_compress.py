"""``timm_dst.compress``: same outputs as the sparse model, representation by structure, what stays dense and why,
save / load round trip; block kernels in training: same outputs and gradients as the dense masked layer."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY_MODELS, make_tiny

import timm_dst
from timm_dst.core.compression import CompressedLinear, detect_structure, format_report
from timm_dst.core.masks import DSTMask
from timm_dst.kernels.sparse_linear import (
    BLOCK_ROW_GEMM_MIN_ROWS,
    BlockStructure,
    SparseLinearForward,
    block_matmul,
    csr_matmul,
)


def _mask(shape: tuple[int, int], structure: str | None, density: float, g: torch.Generator) -> torch.Tensor:
    rows, cols = shape
    if structure is None:
        return torch.rand(rows, cols, generator=g) < density
    if structure == 'fan-in':
        k = max(1, round(density * cols))
        idx = torch.rand(rows, cols, generator=g).argsort(1)[:, :k]
        return torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, idx, True)
    if structure == '2:4':
        idx = torch.rand(rows, cols // 4, 4, generator=g).argsort(2)[..., :2]
        return torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, idx, True).view(rows, cols)
    r, c = (int(v) for v in structure.split('x'))
    grid = torch.zeros((rows // r) * (cols // c), dtype=torch.bool)
    grid[torch.randperm(grid.numel(), generator=g)[:max(1, round(density * grid.numel()))]] = True
    return grid.view(rows // r, cols // c).repeat_interleave(r, 0).repeat_interleave(c, 1)


def _zero_linears(model: nn.Module, structure: str | None, density: float = 0.15) -> list[str]:
    """Zero every linear layer but the head outside a random mask of ``structure`` (a plain sparse model)."""
    g = torch.Generator().manual_seed(0)
    head = model.get_classifier()
    names = []
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and m is not head:
                m.weight.mul_(_mask(tuple(m.weight.shape), structure, density, g))
                names.append(name)
    return names


def _compressed(model: nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def test_compress_reproduces_a_trained_sparse_model(tiny_kind: str):
    model, x, y = make_tiny(tiny_kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='set-itop', sparsity=0.9, update_interval=2, total_steps=10)
    for _ in range(3):  # an update in between: grown weights start at zero, the mask still says active
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert sp.history
    model.eval()
    comp = timm_dst.compress(model)
    with torch.no_grad():
        torch.testing.assert_close(comp(x), model(x), rtol=1e-4, atol=1e-5)
    report = {r.name: r for r in comp.compression_report}
    masked = {n for n, m in model.named_modules() if hasattr(m, 'weight_mask') and not m.weight_mask.all()}
    assert set(report) == masked  # every sparse layer is reported, dense ones (ERK's density 1) are not
    for name, layer in _compressed(comp).items():
        assert report[name].kind == layer.kind == 'csr' and layer.structure is None
        assert layer.n_active == int(model.get_submodule(name).weight_mask.sum())  # the mask, not the nonzeros
    for r in report.values():
        if r.kind is None:
            assert r.reason
        if r.module == 'Conv2d':
            assert r.kind is None and 'nn.Linear only' in r.reason
    if tiny_kind != 'cnn':
        assert _compressed(comp)
    # the sparse model is untouched and still trains with its sparsifier
    assert all(isinstance(h, DSTMask) for m in model.modules() if hasattr(m, 'weight_mask')
               for h in m._forward_pre_hooks.values())
    assert not any(isinstance(m, CompressedLinear) for m in model.modules())
    assert not any(m.training for m in comp.modules()) and not any(p.requires_grad for p in comp.parameters())


@pytest.mark.parametrize('structure,kind', [('16x16', 'bsr'), ('fan-in', 'csr'), (None, 'csr'), ('2:4', None)])
def test_representation_follows_the_structure_found_in_the_zeros(structure: str | None, kind: str | None):
    model, x, _ = make_tiny('vit')
    model.eval()
    names = _zero_linears(model, structure, density=0.5 if structure == '2:4' else 0.15)
    comp = timm_dst.compress(model)
    with torch.no_grad():
        torch.testing.assert_close(comp(x), model(x), rtol=1e-4, atol=1e-5)
    report = {r.name: r for r in comp.compression_report}
    for name in names:
        assert report[name].structure == structure and report[name].kind == kind
        if kind is None:  # 2:4 on CPU: 50% dense, no CPU kernel beats dense there
            assert 'CUDA' in report[name].reason and isinstance(comp.get_submodule(name), nn.Linear)
        else:
            layer = comp.get_submodule(name)
            assert isinstance(layer, CompressedLinear) and layer.kind == kind
            torch.testing.assert_close(layer.weight, model.get_submodule(name).weight)
    if kind == 'bsr':
        assert comp.get_submodule(names[0]).block == (16, 16)


def test_blocks_of_a_plain_model_may_hold_zeros():
    model, x, _ = make_tiny('vit')
    model.eval()
    names = _zero_linears(model, '16x16')
    layer = model.get_submodule(names[0])
    with torch.no_grad():
        r, c = layer.weight.nonzero()[0].tolist()
        layer.weight[r, c] = 0.0  # a trained weight that is exactly zero inside an active block
    comp = timm_dst.compress(model)
    assert comp.compression_report[[r.name for r in comp.compression_report].index(names[0])].kind == 'bsr'
    with torch.no_grad():
        torch.testing.assert_close(comp(x), model(x), rtol=1e-4, atol=1e-5)
    # with a mask, the mask is exact: a block mask with a hole is not a block mask
    hole = torch.ones(32, 32, dtype=torch.bool)
    hole[0, 0] = False
    assert detect_structure(torch.block_diag(hole, torch.zeros(32, 32, dtype=torch.bool))) is None
    assert detect_structure(torch.block_diag(hole, torch.zeros(32, 32, dtype=torch.bool)), from_values=True) == '32x32'


def test_declared_structure_is_used_and_checked():
    g = torch.Generator().manual_seed(0)
    blocks = _mask((64, 64), '8x8', 0.2, g)
    assert detect_structure(blocks) == '8x8'
    assert detect_structure(blocks, '8x8') == '8x8'
    assert detect_structure(_mask((64, 64), '32x32', 0.3, g)) == '32x32'
    # a declared 1x4 block structure is found even though 1x4 is not looked for without a declaration
    ones = _mask((8, 64), '1x4', 0.3, g)
    assert detect_structure(ones, '1x4') == '1x4'
    assert detect_structure(_mask((16, 64), '2:4', 0.5, g), '2:4') == '2:4'
    unstructured = _mask((64, 64), None, 0.1, g)
    assert detect_structure(unstructured, '16x16') is None  # the mask does not obey the declaration
    assert detect_structure(torch.ones(8, 8, dtype=torch.bool)) is None


def test_declared_structure_from_the_mask_hook():
    model, x, _ = make_tiny('mlp')
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = timm_dst.create_sparsifier(model, opt, method='static', sparsity=0.9, total_steps=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hook, t in zip(sp._dst_masks, sp.targets):
            if t.mask.shape[0] % 8 == 0 and t.mask.shape[1] % 4 == 0:
                m = _mask(tuple(t.mask.shape), '8x4', 0.1, g)  # 32-element blocks: below the bsr minimum area
                t.mask.copy_(m)
                t.param.mul_(m)
                hook.structure = '8x4'
    model.eval()
    comp = timm_dst.compress(model)
    structures = [r.structure for r in comp.compression_report]
    assert '8x4' in structures
    assert all(r.kind in ('csr', None) for r in comp.compression_report)  # small blocks: CSR
    with torch.no_grad():
        torch.testing.assert_close(comp(x), model(x), rtol=1e-4, atol=1e-5)


def test_max_density_policy():
    model, x, _ = make_tiny('vit')
    model.eval()
    names = _zero_linears(model, '16x16', density=0.15)
    comp = timm_dst.compress(model, max_density=0.0)
    assert not _compressed(comp)
    assert all('above the bsr limit 0 for 16x16 blocks and the csr limit 0' in r.reason
               for r in comp.compression_report if r.name in names)
    assert 'left as is' in format_report(comp.compression_report)
    comp = timm_dst.compress(model, max_density={'bsr': 0.0})  # blocks above the BSR limit: CSR is tried next
    assert {m.kind for m in _compressed(comp).values()} == {'csr'}
    comp = timm_dst.compress(model, max_density={'bsr': 0.2, 'csr': 0.0})  # 16x16: half the BSR limit, 0.1
    assert not _compressed(comp)
    comp = timm_dst.compress(model, max_density={'bsr': 0.4, 'csr': 0.0})
    assert {m.kind for m in _compressed(comp).values()} == {'bsr'}
    with pytest.raises(ValueError, match="max_density: unknown representation"):
        timm_dst.compress(model, max_density={'blocks': 0.5})
    with pytest.raises(ValueError, match=r"max_density\['csr'\] = 2.0"):
        timm_dst.compress(model, max_density={'csr': 2.0})


@pytest.mark.parametrize('structure', ['16x16', None])
def test_save_load_round_trip(tmp_path, structure: str | None):
    name, kwargs, _ = TINY_MODELS['vit']
    model, x, _ = make_tiny('vit')
    model.eval()
    _zero_linears(model, structure)
    comp = timm_dst.compress(model)
    path = tmp_path / 'vit.safetensors'
    timm_dst.save_compressed(comp, path)
    loaded = timm_dst.load_compressed(name, path, num_classes=10, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), comp(x), rtol=0, atol=0)
    assert {n: (m.kind, m.block, m.structure) for n, m in _compressed(loaded).items()} == \
        {n: (m.kind, m.block, m.structure) for n, m in _compressed(comp).items()}
    assert [r.name for r in loaded.compression_report] == [r.name for r in comp.compression_report]
    # into a model instance; and the errors
    other = timm.create_model(name, num_classes=10, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(timm_dst.load_compressed(other, path)(x), comp(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match='layer .* is Linear'):
        timm_dst.load_compressed(name, path, num_classes=10, **{**kwargs, 'embed_dim': 32})
    with pytest.raises(ValueError, match='not a timm_dst.compressed'):
        from safetensors.torch import save_file
        save_file({'a': torch.zeros(1)}, str(tmp_path / 'plain.safetensors'))
        timm_dst.load_compressed(name, tmp_path / 'plain.safetensors', num_classes=10, **kwargs)
    with pytest.raises(FileNotFoundError, match='no file'):
        timm_dst.load_compressed(name, tmp_path / 'missing.safetensors')


@pytest.mark.parametrize('rows', [1, 2, 7, 70, 1100])
def test_csr_matmul_equals_dense(rows: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g) * _mask((40, 24), None, 0.2, g)
    w[3] = 0  # an empty row
    csr = w.to_sparse_csr()
    csr = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape,
                                  check_invariants=True)
    x = torch.randn(rows, 24, generator=g)
    torch.testing.assert_close(csr_matmul(x, csr), x @ w.t())
    layer = nn.Linear(24, 40)
    with torch.no_grad():
        layer.weight.copy_(w)
    comp = timm_dst.compress(layer)  # a bare linear layer is a model too; from 1024 rows it runs F.linear
    assert isinstance(comp, CompressedLinear) and comp.kind == 'csr'
    with torch.no_grad():
        torch.testing.assert_close(comp(x), layer(x))


@pytest.mark.parametrize('rows', [3, BLOCK_ROW_GEMM_MIN_ROWS + 5])
@pytest.mark.parametrize('transpose', [False, True])
def test_block_matmul_equals_dense(rows: int, transpose: bool):
    g = torch.Generator().manual_seed(0)
    mask = _mask((48, 80), '8x16', 0.3, g)
    mask[8:16] = False  # a block row without blocks
    w = torch.randn(48, 80, generator=g) * mask
    row, col = mask[::8, ::16].nonzero(as_tuple=True)
    s = BlockStructure(block=(8, 16), shape=(48, 80), row=row, col=col)
    x = torch.randn(rows, 48 if transpose else 80, generator=g)
    torch.testing.assert_close(block_matmul(x, s.values(w), s, transpose=transpose), x @ (w if transpose else w.t()))
    torch.testing.assert_close(s.scatter(s.values(w)), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='2:4 semi-structured kernels need CUDA')
def test_semi_structured_on_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).cuda().half().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model[0].weight.mul_(_mask((128, 128), '2:4', 0.5, g).cuda())
    comp = timm_dst.compress(model)
    assert comp.compression_report[0].structure == '2:4'
    x = torch.randn(64, 128, device='cuda', dtype=torch.half)
    if comp.compression_report[0].kind == 'semi-structured':
        with torch.no_grad():
            torch.testing.assert_close(comp(x), model(x), rtol=1e-2, atol=1e-2)
    else:
        assert 'conversion failed' in comp.compression_report[0].reason


# --- block kernels in training ----------------------------------------------------------------------------------


def _block_sparse_mlp(bias: bool = True, block: int = 32, declare: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=bias), nn.ReLU(), nn.Linear(128, 64, bias=bias), nn.ReLU(),
                          nn.Linear(64, 10, bias=bias))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = timm_dst.create_sparsifier(model, opt, method='static', sparsity=0.8, distribution='uniform',
                                    total_steps=100)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hook, t in zip(sp._dst_masks, sp.targets):
            if t.mask.shape[0] % block == 0:
                m = _mask(tuple(t.mask.shape), f'{block}x{block}', 0.2, g)
                t.mask.copy_(m)
                t.param.mul_(m)
                if declare:
                    hook.structure = f'{block}x{block}'
    sp._refresh_counts()  # recount and place the kernels
    return model, opt, sp


def _kernel_kinds(model: nn.Module, x: torch.Tensor) -> list[str]:
    out = []
    for m in model.modules():
        fwd = m.__dict__.get('forward')
        if isinstance(fwd, SparseLinearForward):
            s = fwd._structure(x.new_zeros(1, m.in_features))
            out.append('block' if isinstance(s, BlockStructure) else 'csr' if s is not None else 'dense')
    return out


@pytest.mark.parametrize('declare', [True, False])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('shape', [(5, 64), (2, 3, 64), (4, 10, 64)])  # 40 rows: the block-row GEMMs
def test_block_kernels_give_the_dense_outputs_and_gradients(bias: bool, shape: tuple[int, ...], declare: bool):
    model, _, _ = _block_sparse_mlp(bias, declare=declare)
    x = torch.randn(*shape, requires_grad=True)
    assert _kernel_kinds(model, x) == ['block', 'block']
    ref = copy.deepcopy(model)
    timm_dst.fold_masks(ref)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = model(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for m, r in zip([m for m in model.modules() if hasattr(m, 'weight_mask')],
                    [m for m in ref.modules() if isinstance(m, nn.Linear)]):
        assert not bool(m.weight_orig.grad[~m.weight_mask].any())
        torch.testing.assert_close(m.weight_orig.grad, r.weight.grad * m.weight_mask)
        if bias:
            torch.testing.assert_close(m.bias.grad, r.bias.grad)


def test_block_kernels_follow_the_rules_of_the_csr_kernels():
    model, _, sp = _block_sparse_mlp()
    x = torch.randn(4, 64)
    assert _kernel_kinds(model, x) == ['block', 'block']
    for hook in sp._dst_masks:
        hook.dense_grad_wanted = True  # a RigL / SNFS capture step
    assert _kernel_kinds(model, x) == ['dense', 'dense']
    for hook in sp._dst_masks:
        hook.dense_grad_wanted = False
    assert _kernel_kinds(model, x.double()) == ['dense', 'dense']
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert _kernel_kinds(model, x) == ['dense', 'dense']
    ema = copy.deepcopy(model)  # copies run F.linear on orig * mask
    assert _kernel_kinds(ema, x) == ['dense', 'dense']
    # a mask that is no longer made of blocks (a new mask version), or a declared non-block structure: no blocks
    with torch.no_grad():
        model[0].weight_mask[0, 0] = ~model[0].weight_mask[0, 0]
    assert _kernel_kinds(model, x) == ['dense', 'block']
    sp._dst_masks[1].structure = 'fan-in'
    with torch.no_grad():
        model[2].weight_mask.add_(False)  # same mask, new version: the declaration is read again
    assert _kernel_kinds(model, x) == ['dense', 'dense']


@pytest.mark.parametrize('declare', [True, False])
def test_small_blocks_keep_the_dense_kernels_in_training(declare: bool):
    model, _, _ = _block_sparse_mlp(block=16, declare=declare)  # 16x16: measured no faster than dense
    assert _kernel_kinds(model, torch.randn(4, 64)) in ([], ['dense', 'dense'])


def test_block_kernels_train_like_the_dense_kernels():
    a, opt_a, _ = _block_sparse_mlp()
    b, opt_b, sp_b = _block_sparse_mlp()
    sp_b.sparse_kernel_density = 0.0  # the same model without sparse kernels
    sp_b._place_kernels()
    assert not _kernel_kinds(b, torch.randn(2, 64))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(8, 64, generator=g), torch.randint(0, 10, (8,), generator=g)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['test_convnext', 'test_maxvit', 'test_mambaout', 'test_vit_relpos', 'test_nfnet'])
def test_compress_any_timm_model(name: str):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    timm_dst.create_sparsifier(model, opt, method='set', sparsity=0.9, total_steps=10)
    x = torch.randn(2, *model.pretrained_cfg['input_size'])
    comp = timm_dst.compress(model)
    assert _compressed(comp)
    with torch.no_grad():
        torch.testing.assert_close(comp(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('method', ['set-itop', 'rigl-itop'])
def test_structured_training_with_block_kernels_matches_the_dense_kernels(method: str):
    runs = []
    for density in (None, 0.0):  # library default (block kernels on) / all sparse kernels off
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        kw = {} if density is None else {'sparse_kernel_density': density}
        with pytest.warns(UserWarning, match='unstructured'):  # the 10-class layer does not fit 32x32
            sp = timm_dst.create_sparsifier(model, opt, method=method, sparsity=0.8, distribution='uniform',
                                            structure='32x32', update_interval=2, total_steps=20, seed=0, **kw)
        kinds = []
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x, y = torch.randn(8, 64, generator=g), torch.randint(0, 10, (8,), generator=g)
            kinds.append(_kernel_kinds(model, x))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert len(sp.history) >= 2
        runs.append((model, kinds))
    (a, kinds_a), (b, kinds_b) = runs
    assert not any(kinds_b)
    assert all(k[:2] in (['block', 'block'], ['dense', 'dense']) for k in kinds_a)
    assert ['block', 'block'] in [k[:2] for k in kinds_a]
    assert (['dense', 'dense'] in [k[:2] for k in kinds_a]) == (method == 'rigl-itop')  # RigL's capture steps
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
