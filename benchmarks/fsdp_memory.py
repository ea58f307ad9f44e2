"""Per-rank memory of DST under FSDP2 (``fully_shard``) vs DDP, and the cost of one topology update sharded vs
unsharded, on CPU processes (gloo).

Each (model, wrapping) pair runs in fresh processes under ``torch.distributed.run``: build the model, wrap it (DDP:
``create_sparsifier`` then ``DistributedDataParallel``; FSDP2: ``fully_shard`` the blocks and the model, then the
optimizer, then ``create_sparsifier``), then train a few steps with a topology update at every step. Per rank it
reports the DST state it holds (masks and explored masks, bytes), the peak resident memory of the training steps
(Linux ``VmHWM``, reset after building, so the unsharded construction is not counted; glibc's mmap threshold is fixed
at 64 KiB so that freed tensors leave the resident set), and the median time of
``Sparsifier.update`` (under DDP: the unsharded update on full tensors; under FSDP2: per tensor, gather, the same
computation, write the local rows).

    python benchmarks/fsdp_memory.py --models vit_base_patch16_224 vit_large_patch16_224 --img-size 64

Scaling mode (``--scaling 1 2 4``): peak memory per rank against the unsharded run. Per model, first ``unsharded``: one
plain process (no process group), ``timm.create_model`` on CPU, then the optimizer, then ``create_sparsifier``; then,
for each N given, ``FSDP2 N ranks`` under ``torch.distributed.run --nproc_per_node N`` (N = 1 too): the model built on
the meta device and materialised shard by shard (``timm_dst.distributed.shard.build_meta_sharded`` with
``shard_units``), so that no rank ever holds the whole model, then the optimizer, then ``create_sparsifier``. Both
then train the same steps (SGD momentum, a topology update at every step). Per rank it reports the parameter bytes
the rank holds (its local shards), the DST masks (mask and explored), the peak resident memory of building (``VmHWM``
reset after the imports and the process group, read after ``create_sparsifier``) and of the training steps (reset
after building, read after the steps), the max over ranks, and the ratio of the training peak to the unsharded one.
The resident memory after the imports (the library baseline, included in every peak) is printed below the table.

    python benchmarks/fsdp_memory.py --models vit_base_patch16_224 vit_large_patch16_224 --img-size 64 --steps 3 \
        --scaling 1 2 4 --json scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# the training steps of both children: random batches, seeded per rank (``train``: the model as trained)
_STEPS = r'''
g = torch.Generator().manual_seed(rank)
for _ in range(a['steps']):
    x = torch.randn(a['batch_size'], 3, a['img_size'], a['img_size'], generator=g)
    y = torch.randint(0, 10, (a['batch_size'],), generator=g)
    loss = F.cross_entropy(train(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
'''

_CHILD = r'''
import gc, json, os, statistics, sys, time
import torch, torch.distributed as dist, torch.nn.functional as F
a = json.loads(sys.argv[1])
dist.init_process_group('gloo')
rank = dist.get_rank()
torch.set_num_threads(a['threads'])
import timm
import timm_dst
from timm_dst.distributed.fsdp import is_dtensor


def status(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))


torch.manual_seed(0)
model = timm.create_model(a['model'], img_size=a['img_size'], num_classes=10)
if a['wrap'] == 'fsdp':
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
sp = timm_dst.create_sparsifier(model, opt, method=a['method'], sparsity=a['sparsity'], update_interval=1,
                                total_steps=10 ** 6, prune_rate=0.3, seed=0)
train = model
if a['wrap'] == 'ddp':
    train = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
local = lambda x: x.to_local() if is_dtensor(x) else x
dst_bytes = sum(local(t.mask).numel() * t.mask.element_size() + local(e).numel() * e.element_size()
                for t, e in zip(sp.targets, sp.explored))
param_bytes = sum(local(p).numel() * p.element_size() for p in model.parameters())
times = []
live = sp.update
def timed():
    t0 = time.perf_counter(); live(); times.append(time.perf_counter() - t0)
sp.update = timed
gc.collect()
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset VmHWM: the peak of the training steps only
rss0 = status('VmRSS')
__STEPS__
out = dict(rank=rank, dst_bytes=dst_bytes, param_bytes=param_bytes, rss_start=rss0, peak=status('VmHWM'),
           update_s=statistics.median(times[1:] or times), n_updates=len(times), density=sp.density)
with open(os.path.join(a['out'], f'rank{rank}.json'), 'w') as f:
    json.dump(out, f)
dist.barrier()
dist.destroy_process_group()
'''
_CHILD = _CHILD.replace('__STEPS__', _STEPS)


_SCALING_CHILD = r"""
import functools, gc, json, os, sys
import torch, torch.distributed as dist, torch.nn.functional as F
import timm
import timm_dst
from torch.distributed.fsdp import fully_shard  # noqa: F401 (imported by every run, so that the baselines match)
from timm_dst.distributed.fsdp import is_dtensor
from timm_dst.distributed.shard import build_meta_sharded, shard_units
a = json.loads(sys.argv[1])
torch.set_num_threads(a['threads'])
sharded = a['run'] == 'fsdp'
if sharded:
    dist.init_process_group('gloo')
rank = dist.get_rank() if sharded else 0


def status(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))


def reset_peak():
    gc.collect()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset VmHWM to the current resident set


reset_peak()
rss_imports = status('VmRSS')
torch.manual_seed(0)
create = functools.partial(timm.create_model, a['model'], img_size=a['img_size'], num_classes=10)
model = build_meta_sharded(create, 'cpu', shard_units) if sharded else create()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
sp = timm_dst.create_sparsifier(model, opt, method=a['method'], sparsity=a['sparsity'], update_interval=1,
                                total_steps=10 ** 6, prune_rate=0.3, seed=0)
peak_build = status('VmHWM')
local = lambda x: x.to_local() if is_dtensor(x) else x
dst_bytes = sum(local(t.mask).numel() * t.mask.element_size() + local(e).numel() * e.element_size()
                for t, e in zip(sp.targets, sp.explored))
param_bytes = sum(local(p).numel() * p.element_size() for p in model.parameters())
reset_peak()
rss_built = status('VmRSS')
train = model
__STEPS__
out = dict(rank=rank, param_bytes=param_bytes, dst_bytes=dst_bytes, rss_imports=rss_imports,
           peak_build=peak_build, rss_built=rss_built, peak_train=status('VmHWM'), density=sp.density,
           loss=loss.item())
with open(os.path.join(a['out'], f'rank{rank}.json'), 'w') as f:
    json.dump(out, f)
if sharded:
    dist.barrier()
    dist.destroy_process_group()
"""
_SCALING_CHILD = _SCALING_CHILD.replace('__STEPS__', _STEPS)


def _run(cfg: dict, nproc: int | None, child: str = _CHILD) -> list[dict]:
    """Run ``child`` with ``cfg`` (JSON, its first argument) and return what each rank wrote.

    Args:
        cfg: The child's configuration; ``out`` (the directory for the ranks' results) is added.
        nproc: The number of processes under ``torch.distributed.run``, or None for one plain process (rank 0).
        child: The source of the child script.
    """
    with tempfile.TemporaryDirectory() as out:
        cfg = dict(cfg, out=out)
        with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
            f.write(child)
        launch = [] if nproc is None else ['-m', 'torch.distributed.run', '--nproc_per_node', str(nproc)]
        try:
            # a fixed mmap threshold: glibc returns every large freed block to the system at once, so the resident
            # peak follows the live tensors (with its default dynamic threshold, freed blocks stay in the heap)
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 16))
            subprocess.run([sys.executable, *launch, f.name, json.dumps(cfg)], check=True, capture_output=True,
                           text=True, env=env)
        except subprocess.CalledProcessError as e:
            sys.exit(f'fsdp_memory.py: {cfg["model"]} / {cfg.get("wrap") or cfg.get("run")} x{nproc or 1} failed:\n'
                     f'{e.stderr[-3000:]}')
        finally:
            os.unlink(f.name)
        return [json.load(open(os.path.join(out, f'rank{r}.json'))) for r in range(nproc or 1)]


def _scaling(args: argparse.Namespace) -> list[dict]:
    """Scaling mode: per model, the unsharded run, then FSDP2 (meta-built, sharded) at each of ``args.scaling`` ranks.

    Prints a Markdown table (max over ranks) and the library baseline of each run.

    Returns:
        One row per (model, run), with the per-rank results under ``ranks``.
    """
    mib = 1 << 20
    rows = []
    print(f'{args.method} at sparsity {args.sparsity}, img {args.img_size}, batch {args.batch_size}/rank, '
          f'SGD momentum, {args.steps} steps with an update at every step, CPU (gloo); per-rank values, max over ranks')
    print('| model | run | params/rank MiB | DST masks/rank MiB | peak building MiB | peak training MiB | '
          'peak training / unsharded |')
    print('|---|---|---|---|---|---|---|')
    for model in args.models:
        base = None
        for nproc in [None, *args.scaling]:
            cfg = dict(model=model, run='unsharded' if nproc is None else 'fsdp', img_size=args.img_size,
                       batch_size=args.batch_size, method=args.method, sparsity=args.sparsity, steps=args.steps,
                       threads=args.threads)
            ranks = _run(cfg, nproc, _SCALING_CHILD)
            row = dict(model=model, run=cfg['run'], nproc=nproc or 1, **{k: max(r[k] for r in ranks) for k in (
                'param_bytes', 'dst_bytes', 'rss_imports', 'peak_build', 'rss_built', 'peak_train')})
            if base is None:
                base = row
            row['ratio'] = row['peak_train'] / base['peak_train']
            # the same ratio with the library baseline subtracted from both peaks
            row['ratio_net'] = (row['peak_train'] - row['rss_imports']) / (base['peak_train'] - base['rss_imports'])
            row['ranks'] = ranks
            rows.append(row)
            name = 'unsharded' if nproc is None else f'FSDP2 {nproc} rank{"s" if nproc > 1 else ""}'
            print(f'| {model} | {name} | {row["param_bytes"] / mib:.0f} | {row["dst_bytes"] / mib:.0f} | '
                  f'{row["peak_build"] / mib:.0f} | {row["peak_train"] / mib:.0f} | {row["ratio"]:.2f} |', flush=True)
    print('\nLibrary baseline (resident memory after the imports, and the process group under FSDP2; included in '
          'every peak), MiB, max over ranks:')
    for row in rows:
        name = 'unsharded' if row['run'] == 'unsharded' else f'FSDP2 {row["nproc"]}'
        print(f'- {row["model"]} / {name}: {row["rss_imports"] / mib:.0f}')
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['vit_base_patch16_224', 'vit_large_patch16_224'])
    parser.add_argument('--img-size', type=int, default=64, help='input size (the position table follows it)')
    parser.add_argument('-b', '--batch-size', type=int, default=2, help='per-rank batch')
    parser.add_argument('--method', default='set')
    parser.add_argument('--sparsity', type=float, default=0.9)
    parser.add_argument('--steps', type=int, default=3, help='training steps, each with a topology update')
    parser.add_argument('--nproc', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1, help='torch threads per process')
    parser.add_argument('--scaling', type=int, nargs='+', metavar='N',
                        help='scaling mode: the unsharded run, then FSDP2 (built on the meta device) at N ranks for '
                             'each N given (e.g. 1 2 4), instead of DDP vs FSDP2 at --nproc ranks')
    parser.add_argument('--json', help='also write the rows to this file')
    args = parser.parse_args()
    if args.scaling:
        rows = _scaling(args)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(rows, f, indent=1)
        return
    mib = 1 << 20
    rows = []
    print(f'{args.nproc} CPU processes (gloo), {args.method} at sparsity {args.sparsity}, img {args.img_size}, '
          f'batch {args.batch_size}/rank, SGD momentum, update every step; per-rank values (max over ranks)')
    print('| model | wrap | params/rank MiB | DST masks/rank MiB | RSS at start MiB | peak RSS in training MiB | '
          'update s |')
    print('|---|---|---|---|---|---|---|')
    for model in args.models:
        for wrap in ('ddp', 'fsdp'):
            ranks = _run(dict(model=model, wrap=wrap, img_size=args.img_size, batch_size=args.batch_size,
                              method=args.method, sparsity=args.sparsity, steps=args.steps, threads=args.threads),
                         args.nproc)
            row = dict(model=model, wrap=wrap, **{k: max(r[k] for r in ranks) for k in (
                'param_bytes', 'dst_bytes', 'rss_start', 'peak', 'update_s')})
            rows.append(row)
            print(f'| {model} | {wrap} | {row["param_bytes"] / mib:.0f} | {row["dst_bytes"] / mib:.0f} | '
                  f'{row["rss_start"] / mib:.0f} | {row["peak"] / mib:.0f} | {row["update_s"]:.2f} |', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
