"""timm-dst-train with FSDP2 (``--fsdp``): under torchrun and accelerate launch on CPU processes (gloo), DCP
checkpoints, an exact resume, the export into plain timm, and the refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from timm_dst.cli.config import parse_args
from timm_dst.distributed.shard import shard_units

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
ENV.pop('ACCELERATE_USE_FSDP', None)
MODEL_KW = ['patch_size=8', 'depth=2', 'embed_dim=32', 'num_heads=2']
ARGS = ['--dataset', 'synthetic', '--input-size', '3', '16', '16', '--num-classes', '4', '--synthetic-train-size', '64',
        '--synthetic-test-size', '16', '--model', 'vit_tiny_patch16_224', '--model-kwargs', *MODEL_KW, '-b', '8',
        '--lr', '0.05', '--dst', 'rigl', '--sparsity', '0.8', '--update-interval', '1', '--epochs', '2',
        '--workers', '0', '--no-progress']


def _torchrun(out, *extra: str, port: int = 29631, fsdp: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port),
           '-m', 'timm_dst.train', *ARGS, *(['--fsdp'] if fsdp else []), '--output', str(out), *extra]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _log(out) -> str:
    with open(os.path.join(out, 'log.txt')) as f:
        return f.read()


def _plain_model(out) -> tuple[torch.nn.Module, dict]:
    with open(os.path.join(out, 'results.json')) as f:
        results = json.load(f)
    model = timm.create_model('vit_tiny_patch16_224', **results['model_kwargs'])
    model.load_state_dict(load_file(os.path.join(out, 'model_last.safetensors')), strict=True)
    return model, results


def test_torchrun_fsdp_trains_resumes_exactly_and_exports_to_plain_timm(tmp_path):
    """``torchrun --nproc_per_node 2 -m timm_dst.train --fsdp`` on a timm ViT: the blocks and the root are sharded (the
    model built on the meta device), the topology changes (R_s grows), checkpoints are DCP folders; a run stopped
    mid-epoch and resumed from its folder ends bit-identical to the run that was not stopped; the export loads
    strictly into plain timm at the reported density."""
    whole, stopped = tmp_path / 'whole', tmp_path / 'stopped'
    _torchrun(whole)
    log = _log(whole)
    assert 'FSDP2: 2 module(s) sharded (blocks.0, blocks.1), then the root, over 2 rank(s); built on the meta ' \
           'device' in log
    assert sorted(os.listdir(whole / 'dcp')) == ['step-3', 'step-6']  # one per kept checkpoint, none left over
    model, results = _plain_model(whole)
    assert results['itop_rate'] > results['density'] + 0.02  # topology updates explored new weights
    with open(whole / 'dst_summary.json') as f:
        tensors = {t['name']: t for t in json.load(f)['tensors']}
    params = dict(model.named_parameters())
    active = sum(round(t['density'] * t['numel']) for t in tensors.values())
    nonzero = sum(int(params[n].count_nonzero()) for n in tensors)
    total = sum(t['numel'] for t in tensors.values())
    assert 0.97 * active <= nonzero <= active and abs(active / total - results['density']) < 1e-6

    _torchrun(stopped, '--stop-after-updates', '4', port=29632)  # mid-epoch 1 (3 steps per epoch)
    assert sorted(os.listdir(stopped / 'dcp')) == ['step-3', 'step-4']  # checkpoint-0 and last
    _torchrun(stopped, '--resume', str(stopped), port=29633)
    assert 'resumed from' in _log(stopped) and 'epoch 1, batch 1, 4 optimizer steps' in _log(stopped)
    a, b = load_file(whole / 'model_last.safetensors'), load_file(stopped / 'model_last.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # on another number of ranks (DCP reshards): one process continues the two-rank run for a third epoch
    cmd = [sys.executable, '-m', 'timm_dst.train', *ARGS, '--fsdp', '--epochs', '3', '--resume', str(whole)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert 'checkpoint from 2 process(es), now 1' in _log(whole) and 'epoch 2/3' in _log(whole)


def test_accelerate_launch_use_fsdp_on_cpu_shards(tmp_path):
    """``accelerate launch --use_fsdp --fsdp_version 2`` on CPU processes: Accelerate sets up no FSDP there (it would
    wrap the model in DDP); timm-dst-train shards the model itself and says so."""
    env = dict(ENV, ACCELERATE_USE_CPU='1')
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--use_fsdp', '--fsdp_version', '2', '--num_processes',
           '2', '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port',
           '29634', '-m', 'timm_dst.train', *ARGS, '--epochs', '1', '--output', str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    log = _log(tmp_path)
    assert 'timm-dst-train shards the model itself with FSDP2' in log
    assert 'FSDP2: 2 module(s) sharded (blocks.0, blocks.1), then the root, over 2 rank(s)' in log
    assert os.listdir(tmp_path / 'dcp') == ['step-3']
    _plain_model(tmp_path)


@pytest.mark.slow
def test_sharded_run_matches_the_unsharded_run(tmp_path):
    """The same run (the same initial weights from --initial-checkpoint, seed and data order) under DDP and under
    --fsdp on 2 ranks: the same losses and accuracies within float tolerance, the same masks' exploration."""
    torch.manual_seed(0)
    init = tmp_path / 'init.pth'
    torch.save(timm.create_model('vit_tiny_patch16_224', num_classes=4, img_size=16, **{
        k: int(v) for k, v in (a.split('=') for a in MODEL_KW)}).state_dict(), init)
    common = ['--initial-checkpoint', str(init), '--epochs', '3']
    _torchrun(tmp_path / 'ddp', *common, port=29635, fsdp=False)
    _torchrun(tmp_path / 'fsdp', *common, port=29636)
    assert 'built whole on every rank, then sharded: --initial-checkpoint is given' in _log(tmp_path / 'fsdp')
    (_, ddp), (_, fsdp) = _plain_model(tmp_path / 'ddp'), _plain_model(tmp_path / 'fsdp')
    for split in ('val_last', 'test_last'):
        assert abs(ddp[split]['loss'] - fsdp[split]['loss']) < 1e-4
        assert ddp[split]['top1'] == fsdp[split]['top1']
    assert abs(ddp['itop_rate'] - fsdp['itop_rate']) < 1e-3 and ddp['density'] == fsdp['density']


# --------------------------------------------------------------------------------------------------------------------
# without processes
def test_fsdp_refusals_are_one_line(capsys, monkeypatch):
    """What --fsdp cannot train yet is refused when the flags are parsed, naming the flag and what is accepted."""
    monkeypatch.delenv('ACCELERATE_USE_FSDP', raising=False)
    cases = {
        ('--fsdp', '--dst', 'snip'): "--dst snip with --fsdp: the method chooses its initial topology itself, which "
                                     "is not supported on a sharded model yet; with --fsdp: dense, dsr, rigl",
        ('--fsdp', '--model-ema'): '--model-ema: EMA copies of a sharded model are not supported yet',
        ('--fsdp', '--structure', '2:4', '--sparsity', '0.5'): '--structure: structured sparsity on a sharded model',
        ('--fsdp-modules', 'blocks.*'): '--fsdp-modules: only with --fsdp',
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as e:
            parse_args(['--dataset', 'synthetic', *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count('\n') == 1, err
    monkeypatch.setenv('ACCELERATE_USE_FSDP', 'true')
    monkeypatch.setenv('FSDP_VERSION', '1')
    with pytest.raises(SystemExit):
        parse_args(['--dataset', 'synthetic'])
    assert 'FSDP1 (flat parameters) cannot carry the sparse masks' in capsys.readouterr().err
    monkeypatch.setenv('FSDP_VERSION', '2')
    assert parse_args(['--dataset', 'synthetic']).fsdp is True  # accelerate launch --use_fsdp implies --fsdp


def test_resume_refuses_a_checkpoint_of_the_other_kind(tmp_path, capsys):
    """A --fsdp checkpoint (a small file naming its DCP folder) resumed without --fsdp, or a whole checkpoint resumed
    with it: one line naming the flag, exit 2."""
    from timm_dst.cli.resume import load_resume
    sharded, whole = tmp_path / 'sharded.pth.tar', tmp_path / 'whole.pth.tar'
    torch.save({'epoch': 0, 'arch': 'vit_tiny_patch16_224', 'timm_dst': {'dcp': 'step-3', 'run': {}}}, sharded)
    torch.save({'epoch': 0, 'arch': 'vit_tiny_patch16_224', 'state_dict': {}, 'timm_dst': {'run': {}}}, whole)
    for path, fsdp, message in ((sharded, False, 'a checkpoint of a --fsdp run (its tensors sharded in dcp/step-3): '
                                 'resume it with --fsdp'),
                                (whole, True, 'not a checkpoint of a --fsdp run (its tensors are in the file)')):
        args = parse_args(['--dataset', 'synthetic', '--model', 'vit_tiny_patch16_224', '--resume', str(path),
                           *(['--fsdp'] if fsdp else [])])
        with pytest.raises(SystemExit) as e:
            load_resume(args, None, None)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count('\n') == 1, err


def test_cli_accepts_accelerate_fsdp2_and_refuses_fsdp1():
    """Under Accelerate's FSDP set-up (GPUs) FSDP2 is accepted (its own preparation shards the model) and FSDP1 is
    refused in one line; every other launch goes on."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from timm_dst.cli.build import fsdp_refusal

    def acc(version):
        return SimpleNamespace(distributed_type=DistributedType.FSDP,
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))
    assert fsdp_refusal(acc(2)) is None
    message = fsdp_refusal(acc(1))
    assert '--fsdp_version 1' in message and 'launch with --fsdp_version 2' in message and '\n' not in message
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        assert fsdp_refusal(SimpleNamespace(distributed_type=kind, state=SimpleNamespace())) is None


def test_shard_units_default_and_patterns():
    """The units sharded before the root: timm's blocks / stages / layers by default, or the modules the patterns
    name (``*`` one name component, ``**`` any); a pattern matching nothing is refused naming the top-level modules."""
    vit = timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=8, depth=3, embed_dim=32, num_heads=2)
    assert shard_units(vit) == ['blocks.0', 'blocks.1', 'blocks.2']
    assert shard_units(vit, ['blocks.1']) == ['blocks.1']
    assert shard_units(vit, ['blocks.*.mlp']) == ['blocks.0.mlp', 'blocks.1.mlp', 'blocks.2.mlp']
    assert shard_units(vit, ['**.fc2']) == ['blocks.0.mlp.fc2', 'blocks.1.mlp.fc2', 'blocks.2.mlp.fc2']
    cnn = timm.create_model('convnext_atto', num_classes=4)
    assert shard_units(cnn) == ['stages.0', 'stages.1', 'stages.2', 'stages.3']
    assert shard_units(timm.create_model('resnet10t', num_classes=4)) == ['layer1', 'layer2', 'layer3', 'layer4']
    assert shard_units(timm.create_model('itop_mlp')) == []
    with pytest.raises(ValueError, match=r"--fsdp-modules 'layer\.\*' matches no module .*patch_embed"):
        shard_units(vit, ['layer.*'])


def test_meta_build_falls_back_and_finds_what_init_leaves_unset():
    """A model without ``init_weights`` cannot be initialised after a meta build (the whole build is used then); an
    ``init_weights`` that leaves a tensor unset is caught by the NaN / marker check, per tensor name."""
    import functools

    from timm_dst.distributed.shard import MetaInitError, build_meta_sharded, materialize_sharded

    with pytest.raises(MetaInitError, match='has no init_weights'):
        build_meta_sharded(functools.partial(timm.create_model, 'itop_mlp'), 'cpu', shard_units)

    class Half(torch.nn.Module):
        def __init__(self, device=None):
            super().__init__()
            self.a = torch.nn.Parameter(torch.empty(4, device=device))
            self.b = torch.nn.Parameter(torch.empty(4, device=device))
            self.register_buffer('index', torch.empty(3, dtype=torch.long, device=device))
            self.fc = torch.nn.Linear(4, 4, device=device)

        def init_weights(self):
            torch.nn.init.normal_(self.a)

    model = Half(device='meta')
    assert materialize_sharded(model, 'cpu') == ['b', 'index']  # fc: its reset_parameters ran
    assert torch.isfinite(model.a).all() and torch.isfinite(model.fc.weight).all()
