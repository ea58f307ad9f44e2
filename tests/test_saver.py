"""One checkpoint path (issue #26): one saver class for timm-dst-train, the launcher and the five-line diff of
docs/timm-train.md, and one atomic write under every file of a run folder."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import timm.utils
import timm.utils.checkpoint_saver as timm_saver_module
import torch
import torch.nn as nn

import timm_dst
from timm_dst.integrations.timm import DST_KEY, add_dst_args, read_checkpoint
from timm_dst.integrations.timm.outputs import (
    LAST,
    OutputWriteError,
    atomic_path,
    atomic_write,
    link_atomic,
    save_safetensors_atomic,
    write_json_atomic,
)
from timm_dst.integrations.timm.saver import DstCheckpointSaver, pack_saver


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _sparsifier(model: nn.Module, optimizer: torch.optim.Optimizer) -> timm_dst.Sparsifier:
    return timm_dst.create_sparsifier(model, optimizer, method='set', sparsity=0.75, distribution='uniform',
                                      total_steps=10, update_interval=2)


def _train_a_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(4, 8)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _assert_layout(path: str, rng: bool = True) -> dict:
    """A timm-dst checkpoint: timm's keys, plain weights (no _orig / _mask), the DST state under timm_dst."""
    ckpt = read_checkpoint(path)
    assert {'epoch', 'arch', 'optimizer', 'version', 'state_dict', 'saver', DST_KEY} <= set(ckpt)
    assert not any(k.endswith(('_orig', '_mask')) for k in ckpt['state_dict'])
    state = ckpt[DST_KEY]
    assert state['format'] == 1 and state['method'] == 'set' and 'sparsifier' in state
    assert (state['rng'] is not None) == rng
    for name, mask in state['sparsifier']['masks'].items():  # plain weights: zero where the mask is off
        assert not ckpt['state_dict'][name][~mask].any() and not mask.all()
    return ckpt


def _folder_files(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------------------------------------------------
# one class
def test_the_cli_saver_is_the_one_class(tmp_path):
    """timm-dst-train's saver (state_fn, sparsifier, flops, scheduler, timm's arguments) is DstCheckpointSaver: its
    run state and the EMA's x_orig go in, no process random states (the run state holds every rank's), a torch
    GradScaler under timm's amp_scaler key, the lr scheduler under scheduler."""
    from timm_dst.cli.outputs import DstCheckpointSaver as cli_saver
    assert cli_saver is DstCheckpointSaver
    model, opt = _model_and_optimizer()
    sp = _sparsifier(model, opt)
    ema = _sparsifier(*_model_and_optimizer()).model  # a masked copy standing in for the EMA
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    saver = DstCheckpointSaver(lambda: {'run': {'next_epoch': 1}}, sp, None, scheduler, model=model, optimizer=opt,
                               args=argparse.Namespace(model='mlp'), model_ema=ema, amp_scaler=scaler,
                               checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), max_history=2)
    _train_a_step(model, opt)
    saver.save_checkpoint(0, metric=1.0)
    ckpt = _assert_layout(str(tmp_path / LAST), rng=False)
    assert ckpt['arch'] == 'mlp' and ckpt['scheduler'] == scheduler.state_dict()
    assert ckpt['amp_scaler'] == scaler.state_dict()
    assert ckpt[DST_KEY]['run'] == {'next_epoch': 1} and set(ckpt[DST_KEY]['ema_orig']) == {
        '0.weight_orig', '2.weight_orig', '4.weight_orig'}
    assert _folder_files(tmp_path) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    saver.save_recovery(1, batch_idx=3)
    saver.save_last(1)
    _assert_layout(str(tmp_path / 'recovery-1-3.pth.tar'), rng=False)
    assert read_checkpoint(str(tmp_path / LAST))['epoch'] == 1
    assert _folder_files(tmp_path) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar',
                                       'recovery-1-3.pth.tar']


def test_the_five_line_diff_converts_timm_saver_in_place(tmp_path):
    """pack_saver turns timm's own CheckpointSaver (and a subclass of it, which keeps its methods) into the one class,
    in place; its checkpoints hold this process's random states."""
    model, opt = _model_and_optimizer()
    sp = _sparsifier(model, opt)
    saver = timm.utils.CheckpointSaver(model, opt, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    assert pack_saver(saver, sp) is saver and type(saver) is DstCheckpointSaver
    saver.save_checkpoint(0)
    _assert_layout(str(tmp_path / LAST))

    class MySaver(timm.utils.CheckpointSaver):
        def mine(self) -> str:
            return 'mine'

    folder = tmp_path / 'sub'
    folder.mkdir()
    saver = pack_saver(MySaver(model, opt, checkpoint_dir=str(folder), recovery_dir=str(folder)), sp)
    assert isinstance(saver, DstCheckpointSaver) and isinstance(saver, MySaver) and saver.mine() == 'mine'
    saver.save_recovery(0)
    _assert_layout(str(folder / 'recovery-0-0.pth.tar'))


def test_the_launcher_saver_is_the_one_class(tmp_path):
    """Under the launcher, train.py's CheckpointSaver (timm's arguments, positional ones included) is a
    DstCheckpointSaver: it attaches the pending sparsifier and stores the DST options; timm's class is back after."""
    from timm_dst.run import Launcher
    parser = argparse.ArgumentParser()
    add_dst_args(parser)
    launcher = Launcher(parser.parse_args(['--dst', 'set', '--sparsity', '0.75', '--distribution', 'uniform']))
    launcher.train_args = argparse.Namespace(seed=0, model='mlp')
    model, opt = _model_and_optimizer()
    launcher.pending = (model, opt)
    original = timm.utils.CheckpointSaver
    with launcher.patched():
        cls = timm.utils.CheckpointSaver
        assert issubclass(cls, DstCheckpointSaver) and cls.__name__ == 'DstCheckpointSaver'
        saver = cls(model, opt, None, None, None, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
        assert launcher.sparsifier is not None and launcher.pending is None
        launcher.sparsifier.set_total_steps(10)
        _train_a_step(model, opt)
        launcher.summary_epochs.add(0)  # train.py's update_summary of epoch 0 comes before its checkpoint
        saver.save_checkpoint(0)
    assert timm.utils.CheckpointSaver is original
    ckpt = _assert_layout(str(tmp_path / LAST))
    assert ckpt[DST_KEY]['options'] == launcher.options and 'ema_orig' not in ckpt[DST_KEY]


def test_torch_save_is_never_replaced(tmp_path, monkeypatch):
    """The dict is packed while timm's _save runs, with torch.save untouched: only the name torch in timm's
    checkpoint_saver module stands for a packing copy, for that one call."""
    model, opt = _model_and_optimizer()
    sp = _sparsifier(model, opt)
    real_save, seen = torch.save, []
    saver = pack_saver(timm.utils.CheckpointSaver(model, opt, checkpoint_dir=str(tmp_path)), sp)
    pack = saver.pack

    def checking_pack(checkpoint: dict) -> dict:
        seen.append((torch.save is real_save, timm_saver_module.torch is torch))
        return pack(checkpoint)

    monkeypatch.setattr(saver, 'pack', checking_pack)
    saver.save_checkpoint(0)
    assert seen == [(True, False)]
    assert timm_saver_module.torch is torch and torch.save is real_save


def test_a_saver_whose_save_writes_no_dict_fails_loudly(tmp_path):
    """A saver class whose _save does not go through torch.save cannot hold the DST state: it raises, never writes
    a checkpoint without it."""
    model, opt = _model_and_optimizer()
    sp = _sparsifier(model, opt)

    class Other(timm.utils.CheckpointSaver):
        def _save(self, save_path: str, epoch: int, metric: float | None = None) -> None:
            with open(save_path, 'wb') as f:
                f.write(b'not torch')

    saver = pack_saver(Other(model, opt, checkpoint_dir=str(tmp_path)), sp)
    with pytest.raises(RuntimeError, match='DST state'):
        saver.save_checkpoint(0)


# --------------------------------------------------------------------------------------------------------------------
# atomic writes
def test_a_failing_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """A write that fails halfway (a full disk) raises one line; last.pth.tar is byte-identical to the one before,
    and no temporary file is left."""
    model, opt = _model_and_optimizer()
    sp = _sparsifier(model, opt)
    saver = DstCheckpointSaver(None, sp, model=model, optimizer=opt, checkpoint_dir=str(tmp_path),
                               recovery_dir=str(tmp_path))
    saver.save_checkpoint(0)
    before = (tmp_path / LAST).read_bytes()
    files = _folder_files(tmp_path)
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, 'r+b') as fh:
            fh.truncate(100)
        raise OSError(28, 'No space left on device', f)

    _train_a_step(model, opt)
    monkeypatch.setattr(torch, 'save', half_save)
    expected = (r'^checkpoint of epoch 1 not written: .*tmp\.pth\.tar \(No space left on device.*\); the checkpoints '
                r'written before are unchanged$')
    with pytest.raises(OutputWriteError, match=expected):
        saver.save_checkpoint(1)
    monkeypatch.undo()
    assert (tmp_path / LAST).read_bytes() == before
    assert _folder_files(tmp_path) == files


def test_atomic_write_keeps_the_old_file_when_the_block_fails(tmp_path):
    path = tmp_path / 'out.json'
    write_json_atomic({'a': 1}, str(path))
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_json_atomic({'a': object()}, str(path))  # fails halfway through the dump
    assert path.read_bytes() == before
    with pytest.raises(RuntimeError), atomic_write(path, 'w') as f:
        f.write('half')
        raise RuntimeError('stop')
    assert path.read_bytes() == before
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        torch.save({'x': torch.zeros(3)}, tmp)
        raise RuntimeError('stop')
    assert path.read_bytes() == before and _folder_files(tmp_path) == ['out.json']
    save_safetensors_atomic({'w': torch.ones(2)}, str(tmp_path / 'w.safetensors'))
    link_atomic(str(path), str(tmp_path / 'copy.json'))
    assert (tmp_path / 'copy.json').read_bytes() == before
    assert _folder_files(tmp_path) == ['copy.json', 'out.json', 'w.safetensors']


def test_atomic_write_keeps_links_and_writes_devices_in_place(tmp_path):
    """A symbolic link stays a link (its target is replaced); a device is written in place."""
    target = tmp_path / 'target.json'
    target.write_text('old')
    link = tmp_path / 'link.json'
    os.symlink(target, link)
    write_json_atomic([1], str(link))
    assert os.path.islink(link) and json.loads(target.read_text()) == [1]
    write_json_atomic([2], os.devnull)
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)


def test_without_a_sparsifier_the_checkpoint_is_timms(tmp_path):
    """Before a sparsifier exists (the launcher's saver made before an optimizer) the file is timm's own."""
    model, opt = _model_and_optimizer()
    saver = DstCheckpointSaver(model=model, optimizer=opt, checkpoint_dir=str(tmp_path))
    saver.save_checkpoint(0)
    ckpt = read_checkpoint(str(tmp_path / LAST))
    assert DST_KEY not in ckpt and set(ckpt['state_dict']) == set(model.state_dict())
