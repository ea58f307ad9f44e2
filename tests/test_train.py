"""The training CLI: resume, gradient accumulation, EMA / bf16 / compile, export, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_cli

from timm_dst import list_methods
from timm_dst.integrations.timm.checkpoint import LAST
from timm_dst.train import main

TINY = [
    '--dataset', 'synthetic', '--input-size', '1', '6', '6', '--num-classes', '4', '--synthetic-train-size', '240',
    '--synthetic-test-size', '64', '--val-fraction', '0.125', '--model', 'itop_mlp', '--model-kwargs',
    'hidden=[48,32]', '-b', '32', '--lr', '0.05', '--dst', 'set', '--sparsity', '0.8', '--update-interval', '3',
    '--no-progress',
]


pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')


def _run(out, *extra):
    run_cli(TINY, out, *extra)


def _ckpt(out):
    """A checkpoint, read as timm reads it (weights_only); ``run`` / ``sparsifier`` lifted from the DST state."""
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(os.path.join(out, LAST), map_location='cpu', weights_only=True)
    ckpt['run'] = ckpt['timm_dst']['run']
    ckpt['sparsifier'] = ckpt['timm_dst']['sparsifier']
    ckpt['num_updates'] = ckpt['run']['num_updates']
    return ckpt


def _check_invariants(state, sp_state):
    """Plain timm weights (no mask keys), zeros off the masks, exact counts, R_s >= density."""
    assert not any(k.endswith(('_mask', '_orig')) for k in state), 'checkpoint weights are not plain timm weights'
    masks = sp_state['masks']
    assert masks, 'no sparse tensors in the checkpoint'
    counts = []
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        assert not state[name][~mask].any(), f'nonzero values under the mask of {name}'
        counts.append(int(mask.sum()))
    assert counts == sp_state['counts']
    explored = sum(int(e.sum()) for e in sp_state['explored'].values())
    assert explored >= sum(counts)
    for m, e in zip(sp_state['masks'].values(), sp_state['explored'].values()):
        assert not (m & ~e).any(), 'an active position is not counted as explored'


@pytest.mark.parametrize('stop_after', [6, 4], ids=['epoch-boundary', 'mid-epoch'])
def test_resume_equals_straight(tmp_path, stop_after):
    # 240 samples, 30 held out for validation: 210 / 32 -> 6 full batches (timm drops the last partial one)
    _run(tmp_path / 'straight', '--epochs', 2)
    _run(tmp_path / 'split', '--epochs', 2, '--stop-after-updates', stop_after)
    first = _ckpt(tmp_path / 'split')
    assert first['num_updates'] == stop_after
    assert not os.path.exists(tmp_path / 'split' / 'results.json')
    _run(tmp_path / 'split', '--epochs', 2, '--resume', tmp_path / 'split')
    a, b = _ckpt(tmp_path / 'straight'), _ckpt(tmp_path / 'split')
    assert a['num_updates'] == b['num_updates'] == 2 * 6
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    assert a['sparsifier']['step'] == b['sparsifier']['step']
    for k in a['sparsifier']['explored']:
        assert torch.equal(a['sparsifier']['explored'][k], b['sparsifier']['explored'][k])
    _check_invariants(b['state_dict'], b['sparsifier'])
    rows = (tmp_path / 'split' / 'summary.csv').read_text().strip().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['0', '1']  # timm's epoch index
    ra = json.loads((tmp_path / 'straight' / 'results.json').read_text())
    rb = json.loads((tmp_path / 'split' / 'results.json').read_text())
    assert ra['itop_rate'] == rb['itop_rate'] and ra['test_last'] == rb['test_last']


def test_grad_accumulation_counts_optimizer_steps(tmp_path):
    # 6 micro-batches per epoch, accumulation 4 -> 2 optimizer steps per epoch (the last one partial)
    _run(tmp_path, '--epochs', 2, '--grad-accum-steps', 4, '--update-interval', 1)
    summary = json.loads((tmp_path / 'dst_summary.json').read_text())
    assert summary['total_steps'] == 4
    assert summary['step'] == 4
    assert [h['step'] for h in summary['history']] == [0, 1, 2, 3, 4]
    assert summary['itop_rate'] > summary['density']
    ckpt = _ckpt(tmp_path)
    assert ckpt['num_updates'] == 4
    _check_invariants(ckpt['state_dict'], ckpt['sparsifier'])


def test_outputs(tmp_path):
    _run(tmp_path, '--epochs', 3, '--lr', 0.3)
    for f in ('args.yaml', 'summary.csv', 'summary.png', 'dst_summary.json', LAST, 'model_best.pth.tar',
              'checkpoint-0.pth.tar', 'checkpoint-2.pth.tar', 'model_best.safetensors', 'model_last.safetensors',
              'results.json', 'log.txt'):
        assert (tmp_path / f).is_file(), f
    header = (tmp_path / 'summary.csv').read_text().splitlines()[0].split(',')
    assert header[:9] == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'train_top1', 'density',
                          'model_density']  # timm's columns in timm's order, then timm-dst's
    assert 'itop_rate' in header
    log = (tmp_path / 'log.txt').read_text()
    assert 'Train: 2 [   5/6 (100%)]  Loss: ' in log and 'R_s: ' in log  # timm's progress line, per --log-interval
    summary = json.loads((tmp_path / 'dst_summary.json').read_text())
    assert {'name', 'shape', 'numel', 'density', 'explored'} <= set(summary['tensors'][0])
    assert abs(summary['density'] - 0.2) < 0.01
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['test_best']['top1'] > 50.0  # 4 learnable classes: the run trains
    # the resolved config runs again as a -c config
    from timm_dst.cli.config import parse_args
    args = parse_args(['-c', str(tmp_path / 'args.yaml')])
    assert args.sparsity == 0.8 and args.model_kwargs == {'hidden': [48, 32]}


@pytest.mark.parametrize('extra', [
    ['--model-ema', '--model-ema-decay', '0.9'],
    ['--amp', '--amp-dtype', 'bfloat16'],
    ['--torchcompile', 'aot_eager'],
], ids=['ema', 'bf16', 'compile-aot_eager'])
def test_variants_keep_invariants(tmp_path, extra):
    _run(tmp_path, '--epochs', 1, *extra)
    ckpt = _ckpt(tmp_path)
    _check_invariants(ckpt['state_dict'], ckpt['sparsifier'])
    assert ckpt['sparsifier']['step'] == 6
    summary = json.loads((tmp_path / 'dst_summary.json').read_text())
    assert summary['itop_rate'] > summary['density'] and len(summary['history']) == 3
    if '--model-ema' in extra:
        ema = ckpt['state_dict_ema']
        assert ema.keys() == ckpt['state_dict'].keys()
        for name, mask in ckpt['sparsifier']['masks'].items():
            assert not ema[name][~mask].any(), f'the EMA export of {name} is denser than the model'
        assert not torch.equal(ema['head.weight'], ckpt['state_dict']['head.weight'])


@pytest.mark.slow
def test_torchcompile_inductor(tmp_path):
    _run(tmp_path, '--epochs', 1, '--torchcompile')
    ckpt = _ckpt(tmp_path)
    _check_invariants(ckpt['state_dict'], ckpt['sparsifier'])


def test_export_loads_in_plain_timm(tmp_path):
    args = ['--dataset', 'synthetic', '--input-size', '3', '16', '16', '--num-classes', '5',
            '--synthetic-train-size', '200', '--val-fraction', '0.3', '--model', 'test_resnet', '-b', '20',
            '--lr', '0.05', '--dst', 'rigl', '--sparsity', '0.7', '--update-interval', '3', '--epochs', '2',
            '--no-progress', '--output', str(tmp_path)]
    main(args)
    results = json.loads((tmp_path / 'results.json').read_text())
    row = [r.split(',') for r in (tmp_path / 'summary.csv').read_text().splitlines()]
    header, rows = row[0], row[1:]
    best_val_top1 = float(rows[results['best_epoch']][header.index('eval_top1')])
    # the validation split of the run, saved as tensors for a process that never imports timm_dst
    from timm_dst.cli.config import parse_args
    from timm_dst.cli.data import open_datasets
    val_ds = open_datasets(parse_args(args)).val
    xs, ys = zip(*[val_ds[i] for i in range(len(val_ds))])
    torch.save({'x': torch.stack(xs), 'y': torch.tensor(ys)}, tmp_path / 'val.pt')
    code = textwrap.dedent(f'''
        import sys, torch, timm
        model = timm.create_model('test_resnet', pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(
            file={str(tmp_path / 'model_best.safetensors')!r}, num_classes=5)).eval()
        data = torch.load({str(tmp_path / 'val.pt')!r})
        with torch.no_grad():
            acc = (model(data['x']).argmax(1) == data['y']).float().mean().item() * 100
        zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if p.ndim > 1)
        assert not any(m.startswith('timm_dst') for m in sys.modules)
        print(acc, zeros)
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    acc, zeros = out.stdout.split()
    assert abs(float(acc) - best_val_top1) < 1e-3
    assert abs(float(acc) - results['val_best']['top1']) < 1e-3
    assert int(zeros) > 0


def test_two_processes_agree(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '-m', 'timm_dst.train',
           *TINY, '-b', '30', '--dst', 'rigl', '--update-end', '1.0', '--epochs', '2', '--save-rank-masks',
           '--output', str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '2 process(es)' in proc.stdout
    r0 = torch.load(tmp_path / 'masks_rank0.pt', weights_only=False)
    r1 = torch.load(tmp_path / 'masks_rank1.pt', weights_only=False)
    assert r0['masks'].keys() == r1['masks'].keys() and r0['masks']
    for k in r0['masks']:
        assert torch.equal(r0['masks'][k], r1['masks'][k]), k
    for e0, e1 in zip(r0['explored'], r1['explored']):
        assert torch.equal(e0, e1)
    assert r0['itop_rate'] == r1['itop_rate'] > r0['density']
    # 210 samples, 7 full batches of 30 sharded over 2 ranks -> 3 optimizer steps per epoch (the 7th reaches one rank
    # only: dropped, as timm's loader drops the last partial batch)
    assert r0['step'] == r1['step'] == 6


# ------------------------------------------------------------------------------------------------------------------
# bad input fails early, naming the problem
@pytest.mark.parametrize('argv, needle', [
    (['--model', 'no_such_model_xyz'], "--model 'no_such_model_xyz' is not a timm model"),
    (['--dst', 'no-such-method'], 'accepted: ' + ', '.join(list_methods())),
    (['--sparsity', '1.0'], '--sparsity 1.0 is out of range'),
    (['--sparsity', '-0.1'], 'out of range'),
    (['--no-such-flag', '3'], 'unrecognized arguments: --no-such-flag'),
    (['--dst', 'set', '--dsr-np', '10'], '--dsr-np is an option of dsr'),
    (['--update-end', '1.5'], '--update-end 1.5'),
    (['--dataset', 'fashion_mnist', '--data-dir', '/nonexistent'], 'apt-get install dataset-fashion-mnist'),
    (['--dataset', 'cifar10', '--data-dir', '/nonexistent'], 'cifar-10-batches-py'),
    (['--resume', '/nonexistent/last.pth.tar'], '--resume'),
])
def test_bad_input(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(TINY + argv + ['--output', str(tmp_path / 'out')])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / 'out').exists(), 'work started before the input was checked'


def test_bad_config_key(tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('model: itop_mlp\nbatch-size: 16\nspasity: 0.9\n')
    with pytest.raises(SystemExit):
        main(['-c', str(cfg), '--dataset', 'synthetic'])
    assert 'unknown key(s) in config' in capsys.readouterr().err


def test_config_keys_are_flag_names(tmp_path):
    from timm_dst.cli.config import parse_args
    from timm_dst.integrations.timm import sparsifier_kwargs as dst_kwargs
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('dataset: synthetic\nbatch-size: 16\nsparsity: 0.9\nsparse_init: ER\nupdate_end: 0.5\n'
                   'dst: dsr\ndsr_np: 100\n')
    args = parse_args(['-c', str(cfg), '--sparsity', '0.8'])
    assert args.batch_size == 16 and args.sparsity == 0.8  # flags override the config
    kw = dst_kwargs(args)
    assert kw['distribution'] == 'er' and kw['update_end'] == 0.5 and kw['dsr_np'] == 100
    assert 'update_interval' not in kw and 'prune_rate' not in kw  # left to the method's defaults


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    # epoch 1 trains normally; the step schedule then multiplies the lr by 1e12 and the loss diverges
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, '--epochs', 3, '--sched', 'step', '--decay-epochs', 1, '--decay-rate', 1e12,
             '--log-interval', 1)
    assert 'non-finite training loss' in str(e.value) and 'last good checkpoint is kept' in str(e.value)
    ckpt = _ckpt(tmp_path)
    assert ckpt['run']['next_epoch'] == 1 and ckpt['run']['next_batch'] == 0
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())
    assert not (tmp_path / 'results.json').exists()


def test_docs_cover_every_flag():
    from pathlib import Path

    from timm_dst.cli.config import create_parser
    doc = (Path(__file__).parents[1] / 'docs' / 'cli.md').read_text()
    _, parser = create_parser()
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.dest != 'help' and f'`{a.option_strings[0]}`' not in doc]
    assert not missing, f'flags missing from docs/cli.md: {missing}'


def test_snip_scores_the_first_training_batch(tmp_path, monkeypatch):
    from timm_dst.methods import snip
    seen = {}
    orig = snip.SNIP.init_masks

    def _spy(self, sp):
        seen['batches'], seen['num'] = self.batches, self.num_batches
        seen['first'] = next(iter(self.batches))
        return orig(self, sp)

    monkeypatch.setattr(snip.SNIP, 'init_masks', _spy)
    _run(tmp_path, '--epochs', 1, '--dst', 'snip')
    assert isinstance(seen['batches'], torch.utils.data.DataLoader)
    assert len(list(snip._batches(seen['batches'], seen['num']))) == 1  # SNIP's default: one batch of a loader
    assert seen['first'][0].shape[0] == 32  # a training batch (the training batch size)
    ckpt = _ckpt(tmp_path)
    _check_invariants(ckpt['state_dict'], ckpt['sparsifier'])
    summary = json.loads((tmp_path / 'dst_summary.json').read_text())
    assert summary['method'] == 'snip' and abs(summary['density'] - 0.2) < 0.01


def _lth_phase2_start(monkeypatch):
    """Record the weights and masks phase 2 of LTH starts from."""
    from timm_dst import train as train_mod
    starts = []
    orig = train_mod._Run.fit

    def _spy(self):
        if self.args.dst == 'lth' and not self.args.resume:
            starts.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return orig(self)

    monkeypatch.setattr(train_mod._Run, 'fit', _spy)
    return starts


def test_lth_two_phases(tmp_path, monkeypatch):
    starts = _lth_phase2_start(monkeypatch)
    lth = ['--dst', 'lth', '--epochs', 2, '--lth-rewind-step', 3]
    _run(tmp_path / 'a', *lth)
    dense_dir = tmp_path / 'a' / 'dense'
    dense = _ckpt(dense_dir)
    assert dense['num_updates'] == 12 and dense['args'].dst == 'dense'
    assert not any(k.endswith('_mask') for k in dense['state_dict'])
    rewind = torch.load(dense_dir / 'rewind.pth', weights_only=True)
    assert not torch.equal(rewind['head.weight'], dense['state_dict']['head.weight'])  # step 3, not the end
    # the mask: global magnitude top-k of the final dense weights
    start = starts[0]
    masks = {k[:-len('_mask')]: v for k, v in start.items() if k.endswith('_mask')}
    assert masks
    kept = torch.cat([dense['state_dict'][n][m].abs() for n, m in masks.items()])
    pruned = torch.cat([dense['state_dict'][n][~m].abs() for n, m in masks.items()])
    assert kept.numel() == round(0.2 * (kept.numel() + pruned.numel()))
    assert kept.min() >= pruned.max()
    # phase 2 starts from the rewind point on surviving weights (and exactly on everything else)
    for n, m in masks.items():
        assert torch.equal(start[n + '_orig'][m], rewind[n][m]), n
        assert not start[n + '_orig'][~m].any(), n
    for k, v in rewind.items():
        if k not in masks:
            assert torch.equal(start[k], v), k
    results = json.loads((tmp_path / 'a' / 'results.json').read_text())
    assert results['method'] == 'lth' and results['dense_phase']['rewind_step'] == 3
    assert results['dense_phase']['train_flops_both_phases_ratio'] > 1.0
    from timm_dst.cli.config import parse_args  # phase 2 alone runs again from its args.yaml
    args = parse_args(['-c', str(tmp_path / 'a' / 'args.yaml')])
    assert args.lth_trained_state.endswith(LAST) and args.lth_rewind_state.endswith('rewind.pth')

    # killed in phase 1, then in phase 2: resuming continues in the right phase and ends where the straight run did
    _run(tmp_path / 'b', *lth, '--stop-after-updates', 4)
    assert not (tmp_path / 'b' / 'dense' / 'results.json').exists() and not (tmp_path / 'b' / LAST).exists()
    # --stop-after-updates counts both phases: 12 dense steps, then 6 of phase 2
    _run(tmp_path / 'b', *lth, '--stop-after-updates', 18, '--resume', tmp_path / 'b' / 'dense' / LAST)
    assert (tmp_path / 'b' / 'dense' / 'results.json').exists() and _ckpt(tmp_path / 'b')['num_updates'] == 6
    assert not (tmp_path / 'b' / 'results.json').exists()
    _run(tmp_path / 'b', *lth, '--resume', tmp_path / 'b')
    a, b = _ckpt(tmp_path / 'a'), _ckpt(tmp_path / 'b')
    assert a['num_updates'] == b['num_updates'] == 12
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    _check_invariants(b['state_dict'], b['sparsifier'])


def test_flops_in_outputs(tmp_path):
    _run(tmp_path, '--epochs', 2, '--dst', 'rigl', '--sparsity', 0.9)
    summary = json.loads((tmp_path / 'dst_summary.json').read_text())
    for key in ('inference_flops', 'inference_flops_dense', 'inference_flops_ratio', 'train_flops',
                'train_flops_dense', 'train_flops_ratio'):
        assert key in summary, key
    density = summary['density']
    assert summary['inference_flops'] < summary['inference_flops_dense']
    assert summary['inference_flops_ratio'] < 1.0
    assert abs(summary['inference_flops_ratio'] - density) < 0.05  # an MLP: all FLOPs are in the sparse layers
    # RigL: sparse steps plus dense weight gradients on the steps of its updates (3, 6, 9: it stops at 75%)
    assert summary['dense_grad_steps'] == 3 and summary['steps'] == 12
    assert density < summary['inference_flops_ratio'] + 1e-9 < summary['train_flops_ratio'] < 1.0
    # 2 epochs of 6 full batches of 32, dense training = 3 f_D per sample
    assert summary['train_flops_dense'] == pytest.approx(3 * summary['inference_flops_dense'] * 384)
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['train_flops'] == summary['train_flops']
