"""DST under FSDP2 (``fully_shard``): two CPU processes (gloo) on a tiny timm ViT.

Sharded masks, updates equal to the unsharded computation, export, DCP checkpoints (resume on 2 ranks and on 1),
and the refusals.
"""
from __future__ import annotations

import copy
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

METHODS = ['set', 'rigl', 'snfs', 'dsr']
KW = dict(sparsity=0.8, update_interval=2, total_steps=40, prune_rate=0.3, seed=7)


def _tiny_vit():
    import timm
    return timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=5)


def _shard(model):
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _batch(step: int, rank: int, n: int = 4):
    g = torch.Generator().manual_seed(1000 * step + rank)  # different data on every rank, the same after a resume
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)


def _init(rank: int, world: int, tmp: str, name: str = 'rdv') -> None:
    dist.init_process_group('gloo', init_method=f'file://{tmp}/{name}', rank=rank, world_size=world)
    torch.set_num_threads(1)


def _finish() -> None:
    dist.barrier()
    dist.destroy_process_group()


def _train_step(model, opt, step: int, rank: int) -> None:
    x, y = _batch(step, rank)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    t = t.detach().reshape(-1).to(torch.float64)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return all(torch.equal(out[0], o) for o in out[1:])


def _full_state(sp) -> dict:
    """The sharded sparsifier's state with every shard gathered (a collective)."""
    from timm_dst.distributed.fsdp import full
    state = sp.state_dict()
    for key in ('masks', 'explored'):
        state[key] = {k: full(v) for k, v in state[key].items()}
    state['dense_grads'] = [full(g) if g is not None else None for g in state['dense_grads']]
    method = state['method']
    if method.get('momentum') is not None:
        method['momentum'] = [full(m) for m in method['momentum']]
    return state


def _train_worker(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)

    import timm_dst
    from timm_dst.distributed.fsdp import full, is_dtensor
    results = {}
    for method in METHODS:
        torch.manual_seed(0)
        model = _tiny_vit()
        plain = copy.deepcopy(model)  # the unsharded reference: the same update on the gathered tensors
        ref_sp = timm_dst.create_sparsifier(plain, torch.optim.SGD(plain.parameters(), lr=0.1), method=method, **KW)
        _shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(1234 + rank)  # the global RNG differs per rank (as timm seeds it)
        sp = timm_dst.create_sparsifier(model, opt, method=method, **KW)
        assert all(is_dtensor(t.mask) and is_dtensor(e) for t, e in zip(sp.targets, sp.explored))
        # per-rank DST state: this rank's rows only
        assert all(t.mask.to_local().numel() < t.numel for t in sp.targets if t.shape[0] >= world)
        budget = sum(sp.counts)
        compared = []
        live_update = sp.update

        def checked_update(sp=sp, ref_sp=ref_sp, plain=plain, model=model, live_update=live_update, out=compared):
            # the unsharded controller, given the same weights, masks, explored sets, captured gradients, method
            # state and generator state, must compute the same topology
            ref_sp.load_state_dict(_full_state(sp))
            with torch.no_grad():
                for t, r in zip(sp.targets, ref_sp.targets):
                    r.param.copy_(full(t.param))
            live_update()
            ref_sp.update()
            out.append(all(torch.equal(full(t.mask), r.mask) for t, r in zip(sp.targets, ref_sp.targets))
                       and all(torch.equal(full(e), r) for e, r in zip(sp.explored, ref_sp.explored))
                       and sp.counts == ref_sp.counts and sp.explored_counts == ref_sp.explored_counts)

        sp.update = checked_update
        before = [full(t.mask).clone() for t in sp.targets]
        for step in range(7):
            _train_step(model, opt, step, rank)
            for t in sp.targets:  # masked weights stay exactly zero on every shard
                assert not bool(t.param.to_local()[~t.mask.to_local()].any()), (method, step, t.name)
            assert sum(sp.counts) == budget
            assert _same_on_all_ranks(torch.cat([full(t.mask).flatten() for t in sp.targets]))
        changed = any(not torch.equal(b, full(t.mask)) for b, t in zip(before, sp.targets))
        counted = sum(int(torch.count_nonzero(full(t.mask))) for t in sp.targets)
        # export (a collective): the same plain state dict on every rank, strict-loading into a fresh timm model
        sd = timm_dst.export_state_dict(model)
        assert not any(is_dtensor(v) for v in sd.values())
        assert _same_on_all_ranks(torch.cat([v.float().flatten() for v in sd.values()]))
        fresh = _tiny_vit()
        fresh.load_state_dict(sd, strict=True)
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            same_out = torch.allclose(fresh.eval()(x), model.eval()(x), atol=1e-6)
        # every non-zero exported weight is active; after a training step past the last update (grown weights start
        # at zero) the exported density is the reported one, up to the rare weight whose gradient was exactly zero
        outside = sum(int((sd[t.name].ne(0) & ~full(t.mask)).sum()) for t in sp.targets)
        density = sum(int(torch.count_nonzero(sd[t.name])) for t in sp.targets) / sp.total_numel
        results[method] = (len(compared), all(compared), changed, counted == budget, same_out,
                           outside == 0 and 0.99 * sp.density <= density <= sp.density, sp.itop_rate > sp.density)
        model.train()
    if rank == 0:
        torch.save(results, os.path.join(tmp, 'results.pt'))
    _finish()


def test_fsdp_trains_with_exact_sharded_updates_and_exports(tmp_path):
    """set / rigl / snfs / dsr on a fully_shard ViT over 2 ranks: masks sharded, identical on the ranks, equal to the
    unsharded computation at every update; the export is the same on both ranks, strict-loads into a fresh timm
    model, gives the sharded model's outputs, at the reported density."""
    mp.spawn(_train_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / 'results.pt')
    for method in METHODS:
        n_updates, equal, changed, exact_counts, same_out, density_ok, explored = results[method]
        assert n_updates == 3, method  # steps 2, 4, 6
        assert equal, f'{method}: sharded update differs from the unsharded computation'
        assert changed and exact_counts and explored, method
        assert same_out, f'{method}: exported model does not reproduce the sharded outputs'
        assert density_ok, method


# ----------------------------------------------------------------------------------------------------------------
# checkpoints with torch.distributed.checkpoint
def _dcp_state(model, opt, sp) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    return {'model': msd, 'optim': osd, 'sparsifier': sp.state_dict(dcp=True)}


def _dcp_load(model, opt, sp, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    state = _dcp_state(model, opt, sp)
    dcp.load(state, checkpoint_id=path)
    sp.load_state_dict(state['sparsifier'])
    set_state_dict(model, opt, model_state_dict=state['model'], optim_state_dict=state['optim'])


def _snapshot(model, sp) -> dict:
    import timm_dst
    from timm_dst.distributed.fsdp import full
    return {'weights': timm_dst.export_state_dict(model), 'masks': [full(t.mask).clone() for t in sp.targets],
            'explored': [full(e).clone() for e in sp.explored], 'counts': list(sp.counts), 'step': sp.step,
            'itop_rate': sp.itop_rate}


def _build(method: str, sharded: bool):
    import timm_dst
    torch.manual_seed(0)
    model = _tiny_vit()
    if sharded:
        _shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = timm_dst.create_sparsifier(model, opt, method=method, **KW)
    return model, opt, sp


def _resume_worker(rank: int, world: int, tmp: str, method: str, phase: str) -> None:
    _init(rank, world, tmp, f'rdv_{phase}')
    import torch.distributed.checkpoint as dcp
    model, opt, sp = _build(method, sharded=True)
    ckpt = os.path.join(tmp, 'ckpt')
    if phase == 'save':
        for step in range(3):
            _train_step(model, opt, step, rank)
        dcp.save(_dcp_state(model, opt, sp), checkpoint_id=ckpt)
        at_save = _snapshot(model, sp)
        for step in range(3, 6):
            _train_step(model, opt, step, rank)
        end = _snapshot(model, sp)  # a collective (export gathers the shards): on every rank
        if rank == 0:
            torch.save({'at_save': at_save, 'end': end}, os.path.join(tmp, 'reference.pt'))
    else:
        _dcp_load(model, opt, sp, ckpt)
        restored = _snapshot(model, sp)
        for step in range(3, 6):
            _train_step(model, opt, step, rank)
        end = _snapshot(model, sp)
        if rank == 0:
            torch.save({'restored': restored, 'end': end}, os.path.join(tmp, 'resumed.pt'))
    _finish()


def _equal(a: dict, b: dict) -> bool:
    return (a['counts'] == b['counts'] and a['step'] == b['step'] and a['itop_rate'] == b['itop_rate']
            and all(torch.equal(x, y) for x, y in zip(a['masks'], b['masks']))
            and all(torch.equal(x, y) for x, y in zip(a['explored'], b['explored']))
            and a['weights'].keys() == b['weights'].keys()
            and all(torch.equal(a['weights'][k], b['weights'][k]) for k in a['weights']))


def _resume_one_process(tmp: str, method: str) -> None:
    """The same checkpoint on one process, unsharded (DCP reshards it)."""
    model, opt, sp = _build(method, sharded=False)
    _dcp_load(model, opt, sp, os.path.join(tmp, 'ckpt'))
    restored = _snapshot(model, sp)
    before = [t.mask.clone() for t in sp.targets]
    for step in range(3, 6):
        _train_step(model, opt, step, 0)
        assert all(not bool(t.param[~t.mask].any()) for t in sp.targets)
    changed = any(not torch.equal(b, t.mask) for b, t in zip(before, sp.targets))
    torch.save({'restored': restored, 'changed': changed, 'counts': list(sp.counts), 'step': sp.step},
               os.path.join(tmp, 'one.pt'))


@pytest.mark.parametrize('method', ['snfs', pytest.param('rigl', marks=pytest.mark.slow)])
def test_fsdp_dcp_resume_exact_on_two_ranks_and_on_one(method, tmp_path):
    """3 steps, a DCP checkpoint (model, optimizer, sparsifier), 3 more; a fresh 2-rank run loaded from the checkpoint
    ends bit-identical; one unsharded process loads the same checkpoint exactly and trains on."""
    tmp = str(tmp_path)
    mp.spawn(_resume_worker, args=(2, tmp, method, 'save'), nprocs=2, join=True)
    mp.spawn(_resume_worker, args=(2, tmp, method, 'load'), nprocs=2, join=True)
    ref, res = torch.load(tmp_path / 'reference.pt'), torch.load(tmp_path / 'resumed.pt')
    assert _equal(ref['at_save'], res['restored'])
    assert ref['end']['step'] == 6 and ref['end']['counts'] != ref['at_save']['counts'] or method != 'snfs'
    assert _equal(ref['end'], res['end']), f'{method}: the resumed 2-rank run differs'
    ctx = mp.get_context('spawn')
    proc = ctx.Process(target=_resume_one_process, args=(tmp, method))
    proc.start()
    proc.join()
    assert proc.exitcode == 0
    one = torch.load(tmp_path / 'one.pt')
    assert _equal(ref['at_save'], one['restored']), f'{method}: the checkpoint does not load exactly on one process'
    assert one['changed'] and one['step'] == 6 and sum(one['counts']) == sum(ref['at_save']['counts'])


# ----------------------------------------------------------------------------------------------------------------
# what is refused, and how
def _refusals_worker(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    import timm_dst
    from timm_dst.kernels.sparse_linear import SparseLinearForward
    out = {}

    def error(fn) -> str:
        try:
            fn()
        except (ValueError, RuntimeError) as e:
            return str(e)
        return ''

    # attaching before sharding: the first forward names the order to use (the test holds the optimizer and the
    # sparsifier, so that their lifetime does not depend on the garbage collector)
    model = _tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, method='set', **KW)
    _shard(model)
    out['late_shard'] = error(lambda: model(_batch(0, rank)[0]))
    del model, opt, sp
    # ... and when the sparsifier and its optimizer are gone (collected) before the model is sharded: the masks left
    # on the model still refuse the late shard
    model = _tiny_vit()
    timm_dst.create_sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), method='set', **KW)
    gc.collect()
    _shard(model)
    gc.collect()
    out['late_shard_collected'] = error(lambda: model(_batch(0, rank)[0]))
    # the optimizer of the unsharded parameters
    model = _tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _shard(model)
    out['old_optimizer'] = error(lambda: timm_dst.create_sparsifier(model, opt, method='set', **KW))
    # methods choosing their own initial topology, and structure=
    model = _shard(_tiny_vit())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out['gmp'] = error(lambda: timm_dst.create_sparsifier(model, opt, method='gmp', sparsity=0.8, total_steps=40))
    out['structure'] = error(lambda: timm_dst.create_sparsifier(model, opt, method='set', structure='2:4',
                                                                **{**KW, 'sparsity': 0.5}))
    # HSDP: a 2-D mesh
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh('cpu', (1, world), mesh_dim_names=('replicate', 'shard'))
    hsdp = _tiny_vit()
    fully_shard(hsdp, mesh=mesh)
    out['hsdp'] = error(lambda: timm_dst.create_sparsifier(
        hsdp, torch.optim.SGD(hsdp.parameters(), lr=0.1), method='set', **KW))
    # the CSR kernels step aside: a very sparse sharded model runs the dense kernels (and re-masking after every
    # step, for optimizers not known to keep zeros, works on the shards)
    model = _shard(_tiny_vit())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    sp = timm_dst.create_sparsifier(model, opt, method='set', remask_every_step=True, **{**KW, 'sparsity': 0.99})
    out['kernels'] = any(isinstance(m.__dict__.get('forward'), SparseLinearForward) for m in model.modules())
    _train_step(model, opt, 0, rank)
    out['kernels_density'] = sp.density
    out['remasked'] = all(not bool(t.param.to_local()[~t.mask.to_local()].any()) for t in sp.targets)
    # fold_masks on a sharded model: a plain sharded model with zeros, which FSDP2 keeps training
    sd_before = timm_dst.export_state_dict(model)
    timm_dst.fold_masks(model)
    sd_after = timm_dst.export_state_dict(model)
    out['folded'] = (sd_before.keys() == sd_after.keys()
                     and all(torch.equal(sd_before[k], sd_after[k]) for k in sd_after)
                     and not any(k.endswith(('_orig', '_mask')) for k in model.state_dict()))
    _train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, rank)
    if rank == 0:
        torch.save(out, os.path.join(tmp, 'refusals.pt'))
    _finish()


def test_fsdp_refusals_name_what_is_wrong(tmp_path):
    mp.spawn(_refusals_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    out = torch.load(tmp_path / 'refusals.pt')
    assert 'fully_shard (FSDP2) was applied after create_sparsifier' in out['late_shard']
    assert 'fully_shard (FSDP2) was applied after create_sparsifier' in out['late_shard_collected']
    assert 'build the optimizer after fully_shard' in out['old_optimizer']
    assert "'gmp' chooses its initial topology itself" in out['gmp']
    assert "structure='2:4'" in out['structure'] and 'fully_shard' in out['structure']
    assert 'not HSDP or tensor parallel' in out['hsdp'] and 'Replicate' in out['hsdp']
    assert out['kernels'] is False and out['kernels_density'] < 0.02 and out['remasked'] and out['folded']


@pytest.mark.slow
def test_fsdp_example_trains_saves_and_resumes(tmp_path):
    """examples/fsdp_train.py under torchrun: 2 ranks train and checkpoint, a second launch resumes and exports."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
           os.path.join(root, 'examples', 'fsdp_train.py'), '--img-size', '32', '--batch-size', '2',
           '--output', str(tmp_path)]
    first = subprocess.run(cmd + ['--steps', '10'], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run(cmd + ['--steps', '20', '--resume'], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert 'step 15:' in second.stdout and 'step 5:' not in second.stdout
    weights = torch.load(tmp_path / 'model_plain.pth')
    fresh = _tiny_vit_like_example()
    fresh.load_state_dict(weights, strict=True)


def _tiny_vit_like_example():
    import timm
    return timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=10)


def _capture_worker(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, tmp)
    import timm_dst
    from timm_dst.distributed.fsdp import full
    torch.manual_seed(0)
    model = _tiny_vit()
    plain = copy.deepcopy(model)
    kw = {**KW, 'update_interval': 1000}
    ref_sp = timm_dst.create_sparsifier(plain, torch.optim.SGD(plain.parameters(), lr=0.1), method='rigl', **kw)
    _shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = timm_dst.create_sparsifier(model, opt, method='rigl', **kw)
    assert all(torch.equal(full(t.mask), r.mask) for t, r in zip(sp.targets, ref_sp.targets))
    ok = []
    for window in range(2):  # two capture windows, each of two micro-batches with a reduce-scatter each
        sp._set_capture(True)
        ref_sp._set_capture(True)
        opt.zero_grad()
        for p in plain.parameters():
            p.grad = None
        for micro in range(2):
            x, y = _batch(10 * window + micro, rank)
            F.cross_entropy(model(x), y).backward()
            F.cross_entropy(plain(x), y).backward()
        # the sharded capture (reduce-scattered shards, summed) equals the unsharded one (summed, then averaged)
        # (up to the order of float additions: reduce-scatter per micro-batch vs all-reduce of the sums)
        diffs = [float((full(g) - r).abs().max()) for g, r in zip(sp.dense_grads(), ref_sp.dense_grads())]
        ok.append(max(diffs) < 1e-6)
        ok.append(all(bool(full(t.param.grad)[~full(t.mask)].eq(0).all()) for t in sp.targets))  # .grad masked
    if rank == 0:
        torch.save(ok, os.path.join(tmp, 'capture.pt'))
    _finish()


@pytest.mark.slow
def test_fsdp_dense_gradient_capture_with_accumulation(tmp_path):
    """RigL's dense gradient under FSDP2 (the reduce-scattered shard before masking, summed over micro-batches) equals
    the unsharded capture averaged over the ranks, window after window, while .grad itself stays masked."""
    mp.spawn(_capture_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / 'capture.pt') == [True] * 4
