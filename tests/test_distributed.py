"""Two CPU processes (gloo): masks bit-identical on every rank after several ``set`` / ``rigl`` updates."""
from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _worker(rank: int, world: int, method: str, out_dir: str) -> None:
    # a file rendezvous: no TCP store served by rank 0, so no rank depends on another's process lifetime at exit
    dist.init_process_group('gloo', init_method=f'file://{out_dir}/rendezvous', rank=rank, world_size=world)
    torch.set_num_threads(1)
    import timm

    import timm_dst
    torch.manual_seed(0)  # same init on every rank (DDP would broadcast it anyway)
    model = timm.create_model('test_resnet', num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1234 + rank)  # timm seeds each rank with seed + rank: the global RNG differs per rank
    sp = timm_dst.create_sparsifier(model, opt, method=method, sparsity=0.9, update_interval=2, total_steps=20,
                                    prune_rate=0.3, seed=7)
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    n_updates = 0
    for step in range(8):
        x = torch.randn(4, 3, 32, 32)  # different data on every rank
        y = torch.randint(0, 10, (4,))
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        before = [t.mask.clone() for t in sp.targets]
        opt.step()
        changed = any(not torch.equal(b, t.mask) for b, t in zip(before, sp.targets))
        # the gradient is masked before DDP reduces it: masked positions stay zero on every rank
        assert all(not bool(t.param[~t.mask].any()) for t in sp.targets), f'non-zero masked weight at {step + 1}'
        n_updates += int(changed)
        flat = torch.cat([t.mask.flatten() for t in sp.targets]).to(torch.uint8)
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        rs = torch.tensor([sp.itop_rate], dtype=torch.float64)
        rs_all = [torch.empty_like(rs) for _ in range(world)]
        dist.all_gather(rs_all, rs)
        if rank == 0:
            assert all(torch.equal(gathered[0], g) for g in gathered[1:]), f'masks differ at step {step + 1}'
            assert all(torch.equal(rs_all[0], r) for r in rs_all[1:]), f'R_s differs at step {step + 1}'
    if rank == 0:
        with open(os.path.join(out_dir, f'{method}.ok'), 'w') as f:
            f.write(f'{n_updates} {sp.itop_rate}')
    # DDP's reducer holds the process group and gradient buckets: release it before the group goes away
    del ddp, sp, opt, model
    gc.collect()
    dist.barrier()  # both ranks done with their collectives before the group goes away (gloo aborts otherwise)
    dist.destroy_process_group()


@pytest.mark.parametrize('method', ['set', 'rigl'])
def test_masks_identical_across_ranks(method: str, tmp_path):
    mp.spawn(_worker, args=(2, method, str(tmp_path)), nprocs=2, join=True)
    n_updates, rs = (tmp_path / f'{method}.ok').read_text().split()
    assert int(n_updates) == 4  # steps 2, 4, 6, 8
    assert float(rs) > 0.1
