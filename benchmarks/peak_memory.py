"""Peak memory of sparse training divided by dense training (same model, batch, optimizer).

Each variant trains a few steps in its own fresh subprocess (peak RSS on CPU, ``torch.cuda.max_memory_allocated``
on GPU); the ratios are printed. Updates run every step so their temporaries are included in the peak.

    python benchmarks/peak_memory.py --model resnet50 --img-size 128 -b 32 --methods set rigl
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r'''
import json, resource, sys, timm, torch, torch.nn.functional as F
import timm_dst
a = json.loads(sys.argv[1])
torch.set_num_threads(a['threads'])
dev = torch.device(a['device'])
kw = a['model_kwargs']
model = timm.create_model(a['model'], num_classes=10, **kw).to(dev)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
if a['method'] != 'none':
    timm_dst.create_sparsifier(model, opt, method=a['method'], sparsity=a['sparsity'], update_interval=1,
                               total_steps=10 ** 6, update_end=None, prune_rate=0.3)
c = kw.get('in_chans', 3); s = kw.get('img_size', a['img_size'])
x = torch.randn(a['batch_size'], c, s, s, device=dev); y = torch.randint(0, 10, (a['batch_size'],), device=dev)
for _ in range(a['steps']):
    loss = F.cross_entropy(model(x), y); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
if dev.type == 'cuda':
    peak = torch.cuda.max_memory_allocated()
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({'peak': peak}))
'''


def _peak(cfg: dict) -> int:
    out = subprocess.run([sys.executable, '-c', _CHILD, json.dumps(cfg)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])['peak']


def _parse_kwargs(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, v = item.split('=', 1)
        out[k] = int(v) if v.isdigit() else v
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='resnet50')
    p.add_argument('--model-kwargs', nargs='*', default=[], help='key=value pairs for timm.create_model')
    p.add_argument('--methods', nargs='+', default=['set', 'rigl'])
    p.add_argument('--sparsity', type=float, default=0.9)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--device', default='cpu')
    args = p.parse_args()
    base = dict(model=args.model, model_kwargs=_parse_kwargs(args.model_kwargs), sparsity=args.sparsity,
                batch_size=args.batch_size, img_size=args.img_size, steps=args.steps, threads=args.threads,
                device=args.device)
    dense = _peak({**base, 'method': 'none'})
    what = 'peak RSS' if args.device == 'cpu' else 'max_memory_allocated'
    print(f'model={args.model} batch={args.batch_size} img={args.img_size} device={args.device} ({what})')
    print(f'dense      {dense / 2 ** 20:9.1f} MiB')
    for method in args.methods:
        sparse = _peak({**base, 'method': method})
        print(f'{method:10s} {sparse / 2 ** 20:9.1f} MiB  sparse / dense = {sparse / dense:.3f}')


if __name__ == '__main__':
    main()
