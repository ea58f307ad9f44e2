"""Zoo sweep: does every timm architecture train sparse?

For each architecture: build it without pretrained weights, sparsify it at 90% ERK with ``rigl-itop``, run forward and
backward at a small input size with two topology updates (``update_interval=1``, two SGD steps), check the
invariants, export the plain state_dict, reload it strictly into a fresh model and compare outputs. Prints a table
(markdown or CSV).

Usage::

    python -m timm_dst.tools.zoo                       # the default suite (one small model per family)
    python -m timm_dst.tools.zoo --models 'resnet*' 'vit_*' --format csv
    python -m timm_dst.tools.zoo --all --max-params 60 --timeout 120 --output zoo.csv --resume

``--all`` / wildcard runs execute in a worker process that is restarted after a crash or a per-model timeout.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import math
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .. import models as _models  # noqa: F401  (registers the papers' architectures with timm)
from ..core._seeding import derived_generator
from ..core.masks import export_state_dict
from ..methods._registry import DEFAULT_METHOD, create_sparsifier

__all__ = ['DEFAULT_SUITE', 'ZooResult', 'check_model', 'run_zoo', 'format_table', 'main']

# One small architecture per family; these run in CI (tests/test_zoo.py).
DEFAULT_SUITE: tuple[str, ...] = (
    'resnet10t', 'resnext26ts', 'convnext_atto', 'vit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224',
    'swin_tiny_patch4_window7_224', 'efficientnet_b0', 'mobilenetv3_small_050', 'regnetx_002', 'densenet121',
    'mixer_s32_224', 'levit_128s', 'coat_lite_tiny', 'poolformer_s12', 'nf_regnet_b0', 'resnetv2_50x1_bit',
    'ghostnet_050', 'dla46_c', 'hrnet_w18_small', 'maxvit_pico_rw_256', 'convmixer_768_32', 'xcit_nano_12_p16_224',
    'tf_mobilenetv3_small_minimal_100', 'efficientnet_cc_b0_4e', 'eva02_tiny_patch14_224', 'convit_tiny',
    'cait_xxs24_224', 'pvt_v2_b0', 'mobilevit_xxs', 'edgenext_xx_small', 'repvgg_a0', 'fastvit_t8', 'lcnet_050',
    'gcvit_xxtiny', 'mambaout_femto', 'hgnetv2_b0', 'efficientformer_l1', 'eca_halonext26ts',
)

# Names (module or parameter path components) that must never be sparse: position embeddings, tokens, tables.
_FORBIDDEN = ('pos_embed', 'cls_token', 'dist_token', 'reg_token', 'relative_position', 'rel_pos', 'pos_block',
              'cpb_mlp', 'mask_token', 'absolute_pos')


@dataclass
class ZooResult:
    """One row of the zoo table."""

    model: str
    status: str = 'fail'
    params_m: float = 0.0
    sparse_tensors: int = 0
    sparse_frac: float = 0.0
    density: float = 0.0
    itop_rate: float = 0.0
    input_size: int = 0
    seconds: float = 0.0
    reason: str = ''
    notes: list[str] = field(default_factory=list)


def _param_count_m(name: str, **kwargs: Any) -> float | None:
    """Parameter count (millions) of ``name`` built on the meta device (no memory, no init); None if that fails."""
    import timm
    try:
        with torch.device('meta'):
            model = timm.create_model(name, pretrained=False, **kwargs)
        return sum(p.numel() for p in model.parameters()) / 1e6
    except Exception:
        return None


def _build(name: str, img_size: int | None, num_classes: int | None) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``name`` at ``img_size`` when its constructor takes one; returns the model and the kwargs used."""
    import timm
    base: dict[str, Any] = {}
    if num_classes is not None:
        base['num_classes'] = num_classes
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=False, img_size=img_size, **base), {**base, 'img_size': img_size}
        except TypeError:
            pass
        except Exception:
            # accepted img_size but could not build at that size (window / patch constraints)
            pass
    return timm.create_model(name, pretrained=False, **base), base


def _default_size(model: nn.Module) -> int:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size', (3, 224, 224))
    return int(size[-1])


def _min_size(model: nn.Module) -> int:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('min_input_size')
    return int(size[-1]) if size else 0


def _in_chans(model: nn.Module) -> int:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return int(cfg.get('input_size', (3, 224, 224))[0])


def _loss(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out.float().pow(2).mean()
    if isinstance(out, dict):
        out = list(out.values())
    return sum(_loss(o) for o in out if torch.is_tensor(o) or isinstance(o, list | tuple | dict))


def _flatten_out(out: Any) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flatten_out(o)]


def _train_two_updates(model: nn.Module, x: torch.Tensor, sparsity: float, method: str):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sp = create_sparsifier(model, optimizer, method=method, sparsity=sparsity, distribution='erk',
                                    update_interval=1, total_steps=4)
    model.train()
    for _ in range(2):
        loss = _loss(model(x))
        if not torch.isfinite(loss):
            raise RuntimeError(f'non-finite loss {loss.item()}')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        no_grad = [t.name for t in sp.targets if t.param.grad is None]
        if no_grad:
            raise RuntimeError(f'{len(no_grad)} sparse tensor(s) got no gradient (weight read outside its module\'s '
                               f'forward?): {", ".join(no_grad[:3])}')
        optimizer.step()
    return sp


def _no_weight_decay(model: nn.Module) -> set[str]:
    """Names or glob patterns of the parameters (or modules) the model's ``no_weight_decay()`` lists, if it has one."""
    fn = getattr(model, 'no_weight_decay', None)
    if not callable(fn):
        return set()
    try:
        names = fn()
    except Exception:  # noqa: BLE001  (a model whose list cannot be built has none to check)
        return set()
    if not isinstance(names, set | list | tuple):
        return set()
    return {n[:-len('_orig')] if n.endswith('_orig') else n for n in names}


def _listed(name: str, patterns: set[str]) -> bool:
    return any(name == p or name.startswith(p + '.') or fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_invariants(sp, sparsity: float) -> None:
    if sp.step != 2 or len(sp.history) != 3:
        raise RuntimeError(f'expected two topology updates, got step={sp.step}, records={len(sp.history)}')
    with torch.no_grad():
        for t, count in zip(sp.targets, sp.counts):
            held = int(torch.count_nonzero(t.mask))
            if held != count:
                raise RuntimeError(f'{t.name}: mask holds {held} != budget {count}')
            if bool(((t.param != 0) & ~t.mask).any()):
                raise RuntimeError(f'{t.name}: masked positions non-zero in {t.param_name}_orig')
            w = getattr(t.module, t.param_name)
            if bool(((w != 0) & ~t.mask).any()):
                raise RuntimeError(f'{t.name}: masked positions non-zero in the effective weight')
        # two sources independent of the target selection: names of tokens / tables, and the parameters timm
        # itself exempts from weight decay (position tables and the layers that compute position encodings)
        no_decay = _no_weight_decay(sp.model)
        bad = [t.name for t in sp.targets if any(f in t.name for f in _FORBIDDEN) or _listed(t.name, no_decay)]
        if bad:
            raise RuntimeError(f'position embedding / token / table made sparse: {", ".join(bad[:3])}')
    if sp.itop_rate + 1e-12 < sp.density:
        raise RuntimeError(f'itop_rate {sp.itop_rate} < density {sp.density}')
    expected = 1.0 - sparsity
    if sp.density > expected + 1e-3 and sp.density < 0.999:
        raise RuntimeError(f'density {sp.density:.4f} above the target {expected:.4f}')


def check_model(
        name: str,
        img_size: int = 64,
        batch_size: int = 2,
        sparsity: float = 0.9,
        method: str = DEFAULT_METHOD,
        num_classes: int | None = None,
) -> ZooResult:
    """Run the zoo check on one architecture; never raises (a failure is a row with its reason).

    Args:
        name: timm model name.
        img_size: Input resolution tried first (raised to the model's ``min_input_size``; models whose constructor
            takes ``img_size`` are built at it). Falls back to the pretrained config's size when the small size fails.
        batch_size: Batch size of the random input.
        sparsity: Target sparsity (ERK).
        method: DST method name.
        num_classes: Classifier size (None: the model's default).

    Returns:
        The :class:`ZooResult` row.
    """
    import timm

    res = ZooResult(model=name)
    t0 = time.perf_counter()
    stage = 'build'
    try:
        torch.manual_seed(0)
        model, kwargs = _build(name, img_size, num_classes)
        res.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        sizes = [max(img_size, _min_size(model))]
        if _default_size(model) not in sizes:
            sizes.append(_default_size(model))
        x = None
        err: Exception | None = None
        for size in sizes:
            stage = 'forward (dense probe)'
            if size != sizes[0]:
                torch.manual_seed(0)
                model, kwargs = _build(name, None, num_classes)
            x = torch.randn(batch_size, _in_chans(model), size, size, generator=derived_generator(0, 'zoo-input'))
            try:
                model.eval()
                with torch.no_grad():
                    model(x)
                res.input_size = size
                err = None
                break
            except Exception as e:  # too small for this architecture: try the next size
                err = e
        if err is not None:
            raise err
        stage = 'sparsify + train'
        sp = _train_two_updates(model, x, sparsity, method)
        res.sparse_tensors = len(sp.targets)
        res.density = sp.density
        res.itop_rate = sp.itop_rate
        total = sum(p.numel() for p in model.parameters())
        res.sparse_frac = sp.total_numel / total if total else 0.0
        stage = 'invariants'
        _check_invariants(sp, sparsity)
        stage = 'export + reload'
        sp.optimizer.state.clear()  # free gradients and momentum before building the second copy (big models)
        model.zero_grad(set_to_none=True)
        sp.clear_dense_grads()
        state = export_state_dict(model)
        torch.manual_seed(1)
        fresh = timm.create_model(name, pretrained=False, **kwargs)
        fresh.load_state_dict(state, strict=True)
        model.eval()
        fresh.eval()
        with torch.no_grad():
            a, b = _flatten_out(model(x)), _flatten_out(fresh(x))
        for ta, tb in zip(a, b):
            scale = 1.0 + float(ta.abs().max()) if ta.numel() else 1.0
            diff = float((ta.float() - tb.float()).abs().max()) if ta.numel() else 0.0
            if not math.isfinite(diff) or diff > 1e-4 * scale:
                raise RuntimeError(f'reloaded model differs: max |diff| {diff:.3g}')
        res.status = 'pass'
    except Exception as e:  # noqa: BLE001  (a row per model, whatever went wrong)
        msg = f'{type(e).__name__}: {e}'.replace('\n', ' ').replace('|', '/')
        res.reason = f'{stage}: {msg[:300]}'
        if os.environ.get('TIMM_DST_ZOO_TRACEBACK'):
            traceback.print_exc()
    res.seconds = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------------------------------------
# worker process for long sweeps
def _rss_gib() -> float:
    """Resident memory of this process in GiB (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 30
    except (OSError, ValueError, IndexError):
        return 0.0


# float32 copies of the weights the check holds at its peak, in training: weights, gradients, momentum, RigL's dense
# gradients, the float copy of each mask that masks the gradient (timm_dst.core.masks), the bool masks and ITOP's
# ever-active masks, and the allocator's retained temporaries. Measured resident memory (rigl-itop, batch 2):
# vit_base 6.5 copies and vit_large 6.6 above the libraries' ~0.7 GiB; a 1.01 B-parameter ViT was killed by the OOM
# killer at 24.0 GiB (5.9 copies) while a 937 M one passed in 22 GiB
_WEIGHT_COPIES = 6
_BASE_GIB = 1.0  # torch, timm and the interpreter


def _ram_gib() -> float:
    """Physical memory in GiB (0 where unknown)."""
    try:
        return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2 ** 30
    except (OSError, ValueError):
        return 0.0


def _release_memory() -> None:
    """Drop cycles and hand freed heap pages back to the OS (glibc keeps them otherwise: a worker that built hundreds
    of models grew to 6 GiB and pushed the machine into reclaim)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _worker(tasks: mp.Queue, results: mp.Queue, opts: dict[str, Any]) -> None:
    torch.set_num_threads(opts['threads'])
    while True:
        name = tasks.get()
        if name is None:
            return
        results.put(('start', name, None))
        n = _param_count_m(name)
        if n is not None:
            reason = None
            if opts['max_params'] is not None and n > opts['max_params']:
                reason = f'> {opts["max_params"]:g}M params'
            if opts['min_params'] is not None and n <= opts['min_params']:
                reason = f'<= {opts["min_params"]:g}M params'
            need, have = n * 1e6 * 4 * _WEIGHT_COPIES / 2 ** 30 + _BASE_GIB, opts['max_memory']
            if have and need > have:
                reason = (f'needs ~{need:.0f} GiB ({_WEIGHT_COPIES} float32 copies of {n:.0f}M weights + '
                          f'{_BASE_GIB:g} GiB), '
                          f'over the {have:.1f} GiB allowed (--max-memory; default: this machine\'s RAM)')
            if reason is not None:
                results.put(('done', name, asdict(ZooResult(model=name, status='skip', params_m=n, reason=reason))))
                continue
        res = check_model(name, img_size=opts['img_size'], batch_size=opts['batch_size'],
                          sparsity=opts['sparsity'], method=opts['method'])
        results.put(('done', name, asdict(res)))
        _release_memory()
        if _rss_gib() > opts['worker_max_rss']:
            return  # after at least one model: the parent starts a fresh worker on what is left


def run_zoo(
        names: list[str],
        img_size: int = 64,
        batch_size: int = 2,
        sparsity: float = 0.9,
        method: str = DEFAULT_METHOD,
        timeout: float = 300.0,
        max_params: float | None = None,
        min_params: float | None = None,
        threads: int = 1,
        worker_max_rss: float = 3.0,
        max_memory: float | None = None,
        callback: Any = None,
) -> list[ZooResult]:
    """Check ``names`` in a worker process restarted after a crash or a per-model timeout.

    Args:
        names: timm model names.
        img_size, batch_size, sparsity, method: As in :func:`check_model`.
        timeout: Seconds allowed per model (a timed-out model is a ``timeout`` row and the worker restarts).
        max_params: Skip models above this many million parameters (counted on the meta device).
        min_params: Skip models at or below this many million parameters.
        threads: ``torch.set_num_threads`` in the worker.
        worker_max_rss: A worker whose resident memory stays above this many GiB between models is replaced.
        max_memory: GiB one check may use; models whose weights would need more are ``skip`` rows saying so
            (default: the machine's RAM; give each of N parallel shards 1/N of it).
        callback: Called with each :class:`ZooResult` as it completes.

    Returns:
        The rows, in completion order.
    """
    ctx = mp.get_context('spawn')
    opts = dict(img_size=img_size, batch_size=batch_size, sparsity=sparsity, method=method, max_params=max_params,
                min_params=min_params, threads=threads, worker_max_rss=worker_max_rss,
                max_memory=max_memory if max_memory is not None else _ram_gib())
    pending = list(names)
    out: list[ZooResult] = []

    def emit(r: ZooResult) -> None:
        out.append(r)
        if callback is not None:
            callback(r)

    while pending:
        tasks, results = ctx.Queue(), ctx.Queue()
        for n in pending:
            tasks.put(n)
        tasks.put(None)
        proc = ctx.Process(target=_worker, args=(tasks, results, opts), daemon=True)
        proc.start()
        current, started = None, time.monotonic()
        done_names: set[str] = set()
        while True:
            try:
                kind, name, payload = results.get(timeout=1.0)
            except queue.Empty:
                if current is not None and time.monotonic() - started > timeout:
                    proc.kill()
                    proc.join()
                    emit(ZooResult(model=current, status='timeout', seconds=time.monotonic() - started,
                                   reason=f'no result within {timeout:g} s'))
                    done_names.add(current)
                    break
                if not proc.is_alive():
                    # drain what is left, then report the crash on the model in flight
                    try:
                        while True:
                            kind, name, payload = results.get_nowait()
                            if kind == 'done':
                                emit(ZooResult(**payload))
                                done_names.add(name)
                            else:
                                current = name
                    except queue.Empty:
                        pass
                    if current is not None and current not in done_names:
                        emit(ZooResult(model=current, status='fail',
                                       reason=f'worker crashed (exit code {proc.exitcode})'))
                        done_names.add(current)
                    break
                continue
            if kind == 'start':
                current, started = name, time.monotonic()
            else:
                emit(ZooResult(**payload))
                done_names.add(name)
                current = None
        pending = [n for n in pending if n not in done_names]
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    return out


# --------------------------------------------------------------------------------------------------------------------
# table
_COLUMNS = ('model', 'params_m', 'sparse_tensors', 'sparse_frac', 'density', 'input_size', 'status', 'seconds',
            'reason')


def _row(r: ZooResult) -> list[str]:
    return [r.model, f'{r.params_m:.2f}', str(r.sparse_tensors), f'{r.sparse_frac:.3f}', f'{r.density:.4f}',
            str(r.input_size), r.status, f'{r.seconds:.1f}', r.reason]


def format_table(results: list[ZooResult], fmt: str = 'markdown') -> str:
    """The table as markdown or CSV, followed (markdown) by the pass count."""
    if fmt == 'csv':
        import io
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(_COLUMNS)
        for r in results:
            w.writerow(_row(r))
        return buf.getvalue()
    lines = ['| ' + ' | '.join(_COLUMNS) + ' |', '|' + '---|' * len(_COLUMNS)]
    lines += ['| ' + ' | '.join(_row(r)) + ' |' for r in results]
    ran = [r for r in results if r.status != 'skip']
    n_pass = sum(r.status == 'pass' for r in ran)
    lines.append('')
    lines.append(f'{n_pass} / {len(ran)} passed ({100.0 * n_pass / max(len(ran), 1):.1f}%), '
                 f'{len(results) - len(ran)} skipped')
    return '\n'.join(lines)


def _read_csv(path: str) -> list[ZooResult]:
    out = []
    with open(path, newline='') as f:
        for rec in csv.DictReader(f):
            out.append(ZooResult(
                model=rec['model'], status=rec['status'], params_m=float(rec['params_m']),
                sparse_tensors=int(rec['sparse_tensors']), sparse_frac=float(rec['sparse_frac']),
                density=float(rec['density']), input_size=int(rec['input_size']), seconds=float(rec['seconds']),
                reason=rec['reason']))
    return out


def _resolve_names(patterns: list[str] | None, all_models: bool) -> list[str]:
    import timm
    if all_models:
        return timm.list_models()
    if not patterns:
        return list(DEFAULT_SUITE)
    names: list[str] = []
    everything = timm.list_models()
    for p in patterns:
        hits = fnmatch.filter(everything, p) if any(c in p for c in '*?[') else [p]
        names += [h for h in hits if h not in names]
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m timm_dst.tools.zoo', description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='*', default=None, help='names or wildcards (default: the default suite)')
    parser.add_argument('--all', action='store_true', help='every timm architecture')
    parser.add_argument('--exclude', nargs='*', default=[], help='wildcards to leave out')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('-b', '--batch-size', type=int, default=2)
    parser.add_argument('--sparsity', type=float, default=0.9)
    parser.add_argument('--method', default=DEFAULT_METHOD)
    parser.add_argument('--max-params', type=float, default=None, help='skip models above this many M params')
    parser.add_argument('--min-params', type=float, default=None,
                        help='skip models at or below this many M params (to sweep the large ones separately)')
    parser.add_argument('--shard', default=None, metavar='K/N',
                        help='check only the K-th of N interleaved slices of the (shuffled) names, K in 0..N-1: '
                             'run N processes with their own --output to use N cores')
    parser.add_argument('--timeout', type=float, default=300.0, help='seconds per model')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--max-memory', type=float, default=None, metavar='GIB',
                        help="memory one check may use (default: this machine's RAM); larger models are skip rows. "
                             'Give each of N parallel --shard processes 1/N of the RAM')
    parser.add_argument('--worker-max-rss', type=float, default=3.0, metavar='GIB',
                        help='replace the worker process when its resident memory stays above this between models')
    parser.add_argument('--limit', type=int, default=None, help='only the first N names')
    parser.add_argument('--shuffle', type=int, default=None, metavar='SEED',
                        help='check the names in a seeded random order (a representative sample when cut short)')
    parser.add_argument('--format', choices=('markdown', 'csv'), default='markdown')
    parser.add_argument('--output', default=None, help='also append rows to this CSV as they complete')
    parser.add_argument('--resume', action='store_true', help='skip models already in --output')
    args = parser.parse_args(argv)

    names = _resolve_names(args.models, args.all)
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in args.exclude)]
    if args.shuffle is not None:
        import random
        random.Random(args.shuffle).shuffle(names)
    if args.shard is not None:
        try:
            k, n_shards = (int(v) for v in args.shard.split('/'))
            if not 0 <= k < n_shards:
                raise ValueError
        except ValueError:
            parser.error(f'--shard: expected K/N with 0 <= K < N (e.g. 0/2), got {args.shard!r}')
        names = names[k::n_shards]
    previous: list[ZooResult] = []
    if args.resume and args.output and os.path.exists(args.output):
        previous = _read_csv(args.output)
        seen = {r.model for r in previous}
        names = [n for n in names if n not in seen]
    if args.limit is not None:
        names = names[:args.limit]

    writer = None
    if args.output:
        new = not os.path.exists(args.output) or not args.resume
        fh = open(args.output, 'w' if new else 'a', newline='')
        writer = csv.writer(fh)
        if new:
            writer.writerow(_COLUMNS)

    def on_result(r: ZooResult) -> None:
        print(f'{r.status:7s} {r.model} ({r.seconds:.1f}s) {r.reason}', file=sys.stderr, flush=True)
        if writer is not None:
            writer.writerow(_row(r))
            fh.flush()

    results = run_zoo(names, img_size=args.img_size, batch_size=args.batch_size, sparsity=args.sparsity,
                      method=args.method, timeout=args.timeout, max_params=args.max_params, min_params=args.min_params,
                      threads=args.threads, worker_max_rss=args.worker_max_rss, max_memory=args.max_memory,
                      callback=on_result)
    if writer is not None:
        fh.close()
    print(format_table(previous + results, args.format))
    return 0 if all(r.status in ('pass', 'skip') for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
