"""Dynamic sparse training of a timm model sharded with FSDP2 (``fully_shard``), checkpointed with DCP.

The order that works: ``fully_shard`` the blocks and the model, build the optimizer, then ``create_sparsifier``.
Masks and explored masks are sharded like their weights. Checkpoints go through ``torch.distributed.checkpoint``
(each rank writes its shards; a run resumes on any number of ranks); the final plain timm weights come from
``timm_dst.export_state_dict`` (a collective). Random data stands in for a loader.

    torchrun --nproc_per_node 2 examples/fsdp_train.py --model vit_tiny_patch16_224 --img-size 64 --steps 20
    torchrun --nproc_per_node 2 examples/fsdp_train.py ... --steps 40 --resume   # continues from the checkpoint

On GPUs (one process per GPU), pass ``--device cuda``; the process group then uses NCCL.
"""
from __future__ import annotations

import argparse
import os

import timm
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import timm_dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='vit_tiny_patch16_224')
    parser.add_argument('--img-size', type=int, default=None, help="input size (default: the model's own)")
    parser.add_argument('--method', default='rigl')
    parser.add_argument('--sparsity', type=float, default=0.9)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--batch-size', type=int, default=4, help='per rank')
    parser.add_argument('--output', default='output/fsdp_example')
    parser.add_argument('--resume', action='store_true', help='continue from <output>/ckpt')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()

    device = torch.device(args.device, int(os.environ.get('LOCAL_RANK', 0))) if args.device == 'cuda' else \
        torch.device(args.device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    rank = dist.get_rank()

    torch.manual_seed(0)  # the same initial weights on every rank
    kwargs = {'img_size': args.img_size} if args.img_size else {}
    model = timm.create_model(args.model, num_classes=10, **kwargs).to(device)
    size = args.img_size or timm.data.resolve_data_config({}, model=model)['input_size'][-1]
    units = next((getattr(model, n) for n in ('blocks', 'stages', 'layers') if hasattr(model, n)), [])
    for unit in units:  # 1. shard: the blocks (ViT / EVA) or stages (RegNet, DaViT, Swin), then the model
        fully_shard(unit)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)  # 2. optimizer of the shards
    sp = timm_dst.create_sparsifier(model, optimizer, method=args.method, sparsity=args.sparsity,  # 3. DST
                                    update_interval=5, total_steps=args.steps)

    ckpt = os.path.join(args.output, 'ckpt')

    def state() -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {'model': model_sd, 'optim': optim_sd, 'sparsifier': sp.state_dict(dcp=True)}

    if args.resume:
        loaded = state()
        dcp.load(loaded, checkpoint_id=ckpt)  # in place, resharded to this run's ranks
        sp.load_state_dict(loaded['sparsifier'])
        set_state_dict(model, optimizer, model_state_dict=loaded['model'], optim_state_dict=loaded['optim'])

    g = torch.Generator().manual_seed(1000 + rank)  # a different batch on every rank
    while sp.step < args.steps:
        x = torch.randn(args.batch_size, 3, size, size, generator=g).to(device)
        y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # topology updates run from this step's hook
        if rank == 0 and sp.step % 5 == 0:
            print(f'step {sp.step}: loss {loss.item():.4f} density {sp.density:.4f} R_s {sp.itop_rate:.4f}')

    dcp.save(state(), checkpoint_id=ckpt)
    weights = timm_dst.export_state_dict(model)  # every rank: the whole plain timm state dict
    if rank == 0:
        torch.save(weights, os.path.join(args.output, 'model_plain.pth'))
        print(f'saved {ckpt} and {args.output}/model_plain.pth ({len(weights)} tensors)')
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
