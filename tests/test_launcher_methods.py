"""Methods that need more than a model and an optimizer, through the launcher with timm's own train.py (issue #27):
SNIP scores batches of train.py's own training loader without changing the run's data order or random states.

The runs are tiny (resnet10t at 1x28x28, 64 Fashion-MNIST training images, batch 16: 4 optimizer steps per epoch);
skipped without ``../shared/clients/timm/train.py`` or the Fashion-MNIST idx files.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_timm_run import ENV, FMNIST, MODEL_ARGS, TRAIN_PY, needs_timm_scripts, write_fmnist_folder

from timm_dst.integrations.timm import DST_KEY, read_checkpoint

# the launcher with its draw of SNIP batches recorded to $SNIP_BATCHES_OUT (the run itself is unchanged)
_RECORDING_LAUNCHER = textwrap.dedent('''
    import os, sys
    import torch
    from timm_dst.integrations.timm import _snip
    from timm_dst.integrations.timm.launcher import main

    draw = _snip.draw_batches

    def recording(loader, num_batches):
        batches = draw(loader, num_batches)
        torch.save([(x.clone(), y.clone()) for x, y in batches], os.environ['SNIP_BATCHES_OUT'])
        return batches

    _snip.draw_batches = recording
    main(sys.argv[1:])
''')


@pytest.fixture(scope='module')
def small_fmnist(tmp_path_factory) -> str:
    if not os.path.isdir(FMNIST):
        pytest.skip('Fashion-MNIST idx files absent')
    return write_fmnist_folder(str(tmp_path_factory.mktemp('fmnist_small')), 64, 32)


def _run(cmd: list[str], cwd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}')
    return out


def _train_args(data: str, out: str, experiment: str, *extra: str) -> list[str]:
    return [TRAIN_PY, data, *MODEL_ARGS, '-b', '16', '--seed', '3', '--output', out, '--experiment', experiment,
            '--dst', 'snip', '--sparsity', '0.9', *extra]


def _same_run(a: str, b: str) -> None:
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    assert ca['epoch'] == cb['epoch'] and ca[DST_KEY]['step'] == cb[DST_KEY]['step']
    for key, mask in ca[DST_KEY]['sparsifier']['masks'].items():
        assert torch.equal(mask, cb[DST_KEY]['sparsifier']['masks'][key]), key
    for key, value in ca['state_dict'].items():
        torch.testing.assert_close(cb['state_dict'][key], value, rtol=0, atol=0, msg=key)


@needs_timm_scripts
def test_snip_scores_train_py_loader_without_changing_the_run(small_fmnist, tmp_path):
    """``--dst snip`` with no batches file trains from one command; its weights equal, bit for bit, those of a run
    given the same batches as a file (which never touches the loader): the draw left train.py's data order and random
    states as they were. A resume of its first epoch continues exactly."""
    out, batches = str(tmp_path), str(tmp_path / 'snip_batches.pt')
    env = {**ENV, 'SNIP_BATCHES_OUT': batches}
    auto = _run([sys.executable, '-c', _RECORDING_LAUNCHER,
                 *_train_args(small_fmnist, out, 'auto', '--epochs', '2', '--snip-num-batches', '2')], out, env)
    log = auto.stdout + auto.stderr
    assert "scores 2 batch(es) of" in log and "DST: attached Sparsifier(method='snip'" in log
    saved = torch.load(batches, weights_only=True)
    assert len(saved) == 2 and tuple(saved[0][0].shape) == (16, 1, 28, 28) and saved[0][1].dtype == torch.long
    assert not torch.equal(saved[0][0], saved[1][0])  # two different batches, train.py's transforms applied
    file_run = _run([sys.executable, '-m', 'timm_dst.run',
                     *_train_args(small_fmnist, out, 'file', '--epochs', '2', '--snip-batches', batches)], out)
    assert 'training loader' not in file_run.stdout + file_run.stderr
    _same_run(os.path.join(out, 'auto', 'last.pth.tar'), os.path.join(out, 'file', 'last.pth.tar'))
    # the masks are SNIP's: 90% of the sparse weights masked, per-tensor densities as the scores give them
    ckpt = read_checkpoint(os.path.join(out, 'auto', 'last.pth.tar'))
    masks = ckpt[DST_KEY]['sparsifier']['masks']
    assert sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) == pytest.approx(
        0.1, abs=1e-3)
    _run([sys.executable, '-m', 'timm_dst.run',
          *_train_args(small_fmnist, out, 'resumed', '--epochs', '2', '--snip-num-batches', '2',
                       '--resume', os.path.join(out, 'auto', 'checkpoint-0.pth.tar'))], out)
    _same_run(os.path.join(out, 'auto', 'last.pth.tar'), os.path.join(out, 'resumed', 'last.pth.tar'))


def _lth_args(data: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, '-m', 'timm_dst.run', TRAIN_PY, data, *MODEL_ARGS, '-b', '16', '--seed', '3',
            '--epochs', '2', '--dst', 'lth', '--sparsity', '0.9', *extra]


@needs_timm_scripts
def test_lth_runs_both_phases_from_one_command(small_fmnist, tmp_path):
    """``--dst lth --lth-rewind-step 2``: the dense phase in ``<output>/<experiment>/dense`` (its rewind point at step
    2), then the sparse phase in ``<output>/<experiment>`` with the global top 10% of the dense run's final weights;
    ``--resume <output>/<experiment>`` continues the sparse phase exactly."""
    out = str(tmp_path)
    run = _run(_lth_args(small_fmnist, out, '--output', out, '--experiment', 'lt', '--lth-rewind-step', '2'), out)
    log = run.stdout + run.stderr
    assert 'lth phase 1/2' in log and 'lth phase 2/2' in log
    assert 'rewind point at optimizer step 2 saved' in log
    folder, dense = os.path.join(out, 'lt'), os.path.join(out, 'lt', 'dense')
    for name in ('last.pth.tar', 'rewind.pth', 'dense_phase.json', 'summary.csv'):
        assert os.path.isfile(os.path.join(dense, name)), name
    trained = read_checkpoint(os.path.join(dense, 'last.pth.tar'))
    assert trained[DST_KEY]['method'] == 'dense' and trained['epoch'] == 1
    sparse = read_checkpoint(os.path.join(folder, 'last.pth.tar'))
    assert sparse[DST_KEY]['method'] == 'lth' and sparse[DST_KEY]['step'] == 8
    masks = sparse[DST_KEY]['sparsifier']['masks']
    scores = torch.cat([trained['state_dict'][k].abs().flatten() for k in masks])
    keep = sum(int(m.sum()) for m in masks.values())
    assert keep == round(0.1 * scores.numel())
    threshold = scores.topk(keep).values.min()
    for key, mask in masks.items():  # the mask is the dense phase's largest final weights (global magnitude)
        assert bool((trained['state_dict'][key].abs()[mask] >= threshold).all()), key
    # the sparse phase stopped after its first epoch: --resume the run folder continues it to the same weights
    os.replace(os.path.join(folder, 'checkpoint-0.pth.tar'), os.path.join(folder, 'last.pth.tar'))
    resumed = _run(_lth_args(small_fmnist, out, '--resume', folder), out)
    assert 'phase 1/2' not in resumed.stdout + resumed.stderr
    again = read_checkpoint(os.path.join(folder, 'last.pth.tar'))
    assert again['epoch'] == 1 and again[DST_KEY]['step'] == 8
    for key, value in sparse['state_dict'].items():
        torch.testing.assert_close(again['state_dict'][key], value, rtol=0, atol=0, msg=key)
    # stopped after the dense phase's first epoch: --resume continues the dense phase, then runs the sparse phase
    os.remove(os.path.join(dense, 'dense_phase.json'))
    os.replace(os.path.join(dense, 'checkpoint-0.pth.tar'), os.path.join(dense, 'last.pth.tar'))
    for name in os.listdir(folder):
        if name.endswith('.pth.tar'):
            os.remove(os.path.join(folder, name))
    resumed = _run(_lth_args(small_fmnist, out, '--resume', os.path.join(dense, 'last.pth.tar')), out)
    assert 'phase 1/2' in resumed.stdout + resumed.stderr
    for path, expected in ((os.path.join(dense, 'last.pth.tar'), trained),
                           (os.path.join(folder, 'last.pth.tar'), sparse)):
        got = read_checkpoint(path)
        for key, value in expected['state_dict'].items():
            torch.testing.assert_close(got['state_dict'][key], value, rtol=0, atol=0, msg=f'{path}: {key}')


@pytest.mark.parametrize('multi_epochs', [False, True])
def test_draw_batches_leaves_the_loader_and_random_states_as_they_were(multi_epochs):
    """A draw of SNIP's batches from a shuffling loader (timm's MultiEpochsDataLoader too) changes neither the next
    epoch's batches nor the random states drawn afterwards."""
    from timm.data.loader import MultiEpochsDataLoader

    from timm_dst.integrations.timm._snip import draw_batches

    data = torch.utils.data.TensorDataset(torch.arange(40.0).view(40, 1), torch.arange(40))
    cls = MultiEpochsDataLoader if multi_epochs else torch.utils.data.DataLoader

    def epoch_after(draw: bool) -> tuple[list, list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        loader = cls(data, batch_size=8, shuffle=True)
        drawn = draw_batches(loader, 2) if draw else []
        order = [y for _, y in loader]
        return drawn, order, torch.rand(3)

    drawn, order, after = epoch_after(True)
    _, expected, expected_after = epoch_after(False)
    assert len(drawn) == 2 and all(torch.equal(a[1], b) for a, b in zip(drawn, expected[:2]))
    assert all(torch.equal(a, b) for a, b in zip(order, expected)) and len(order) == len(expected) == 5
    assert torch.equal(after, expected_after)


@needs_timm_scripts
def test_lth_both_phases_under_torchrun(small_fmnist, tmp_path):
    """Under ``torchrun --nproc_per_node 2`` each phase's processes meet in a store of their own (the agent's store
    would hand the sparse phase the dense phase's addresses), and rank 1 waits for rank 0's dense checkpoint."""
    out = str(tmp_path)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', *_lth_args(
        small_fmnist, out, '--output', out, '--experiment', 'lt', '--lth-rewind-step', '2')[1:]]
    log = _run(cmd, out)
    assert 'lth phase 2/2' in log.stdout + log.stderr
    sparse = read_checkpoint(os.path.join(out, 'lt', 'last.pth.tar'))
    masks = sparse[DST_KEY]['sparsifier']['masks']
    assert sparse[DST_KEY]['method'] == 'lth' and sparse[DST_KEY]['step'] == 4  # 2 epochs x 2 steps per rank
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * sum(m.numel() for m in masks.values()))
