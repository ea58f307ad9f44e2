"""Methods with a dense phase (the lottery ticket, ``--dst lth`` / ``lth-set-itop``) through the launcher, from one
command: :func:`run_two_phases` runs train.py twice, each run a child process of the launcher (``python -m
timm_dst.run``, the same interpreter and environment: under torchrun every rank starts its own child of each phase).

1. the dense phase: train.py with its own settings and ``--dst <the method's dense_method>``, in
   ``<output>/<experiment>/dense``; it saves the weights at optimizer step ``--lth-rewind-step`` (default 0: the
   initialisation) to ``dense/rewind.pth`` (:func:`rewind_hooks`, told by the environment variable
   :data:`REWIND_ENV`), and, once train.py returned, the marker ``dense/dense_phase.json``;
2. the sparse phase: train.py again in ``<output>/<experiment>`` with the method given ``--lth-trained-state
   dense/last.pth.tar`` and ``--lth-rewind-state dense/rewind.pth`` (the prune and the rewind happen when its
   sparsifier attaches).

``--resume <output>/<experiment>`` (the run folder, or any checkpoint in it or in its ``dense`` folder) continues in
the right phase: the dense phase from ``dense/last.pth.tar`` while the marker is missing, else the sparse phase from
``<output>/<experiment>/last.pth.tar`` (a fresh sparse phase when it has none). ``--lth-trained-state`` given: only
the sparse phase runs, as any other method (the launcher's single run).

The folder logic mirrors ``timm-dst-train``'s (``timm_dst.cli.lth``); what both could share is the pair of folder
names (``outputs.DENSE_PHASE_DIR`` / ``REWIND_FILE``, already shared) and the phase-resolution rule.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import torch

from ...methods._registry import get_method_info
from ._report import PROG, fail, is_primary, log
from .checkpoint import LAST
from .outputs import DENSE_PHASE_DIR, REWIND_FILE, atomic_path, write_json_atomic

__all__ = ['two_phases', 'run_two_phases', 'rewind_hooks', 'REWIND_ENV', 'DENSE_DONE']

REWIND_ENV = 'TIMM_DST_LTH_REWIND'  # "<step>:<path>": the dense phase's rewind point (set for the child process)
DENSE_DONE = 'dense_phase.json'  # in the dense folder, written once the dense phase's train.py returned


def two_phases(dst_args: argparse.Namespace) -> bool:
    """Whether the launcher runs both phases itself: a method with a dense phase and no trained state given."""
    phase = get_method_info(dst_args.dst).dense_phase
    return phase is not None and not getattr(dst_args, phase.trained_state_arg, None)


def _take(rest: list[str], flag: str) -> tuple[list[str], str | None]:
    """``rest`` without ``flag VALUE`` / ``flag=VALUE`` (the last one given wins), and its value."""
    out, value, i = [], None, 0
    while i < len(rest):
        tok = rest[i]
        if tok == flag and i + 1 < len(rest):
            value, i = rest[i + 1], i + 2
            continue
        if tok.startswith(flag + '='):
            value, i = tok.split('=', 1)[1], i + 1
            continue
        out.append(tok)
        i += 1
    return out, value


def _drop_dst(tokens: list[str], dests: set[str]) -> list[str]:
    """The DST flag tokens without the flags of ``dests`` (and their values)."""
    out, skip = [], False
    for tok in tokens:
        if tok.startswith('--'):
            skip = tok.split('=', 1)[0][2:].replace('-', '_') in dests
        if not skip:
            out.append(tok)
        if skip and '=' in tok:
            skip = False
    return out


def _run_folder(rest: list[str], resume: str | None) -> tuple[list[str], str, str]:
    """train.py's arguments without ``--output`` / ``--experiment``, and the run's output root and experiment."""
    rest, output = _take(rest, '--output')
    rest, experiment = _take(rest, '--experiment')
    if resume and not (output and experiment):  # the folder of the run resumed
        root = os.path.abspath(resume)
        root = root if os.path.isdir(root) else os.path.dirname(root)
        if os.path.basename(root) == DENSE_PHASE_DIR:
            root = os.path.dirname(root)
        return rest, os.path.dirname(root), os.path.basename(root)
    if not experiment:
        experiment = time.strftime('%Y%m%d-%H%M%S') + '-lth'
    return rest, output or './output/train', experiment


def _say(msg: str) -> None:
    """A line of the launcher itself, between the phases (train.py's logger is not set up in this process)."""
    if is_primary():
        print(f'{PROG}: {msg}', file=sys.stderr, flush=True)


def _phase_env(env: dict[str, str], phase: int) -> dict[str, str]:
    """The environment of one phase's process. Under torchrun each phase's processes meet in a store of their own
    (the next ports after torchrun's, hosted by rank 0's process): the agent's store would hand the second phase the
    first phase's addresses."""
    env = dict(env)
    if int(env.get('WORLD_SIZE', '1')) > 1 and env.get('MASTER_PORT', '').isdigit():
        env['MASTER_PORT'] = str(int(env['MASTER_PORT']) + phase)
        env['TORCHELASTIC_USE_AGENT_STORE'] = 'False'
    return env


def _wait_for(paths: tuple[str, ...], seconds: float = 600.0) -> bool:
    """Whether ``paths`` all exist, waiting up to ``seconds`` on ranks that do not write them (rank 0 writes the dense
    phase's last checkpoint after the other ranks' processes may have ended)."""
    deadline = time.monotonic() + (seconds if not is_primary() else 0.0)
    while not all(os.path.isfile(p) for p in paths):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def _child(script: str, rest: list[str], dst: list[str], env: dict[str, str]) -> None:
    code = subprocess.call([sys.executable, '-m', 'timm_dst.run', script, *rest, *dst], env=env)
    if code:
        raise SystemExit(code)


def run_two_phases(script: str, rest: list[str], dst_tokens: list[str], dst_args: argparse.Namespace) -> None:
    """Both phases of a method with a dense phase, each a run of ``script`` (see the module's docstring).

    Args:
        script: train.py.
        rest: train.py's arguments (``--output``, ``--experiment``, ``--resume`` are set per phase).
        dst_tokens: The DST flags as given (the sparse phase gets them, the dense phase only ``--dst-seed``).
        dst_args: The parsed DST flags.
    """
    phase = get_method_info(dst_args.dst).dense_phase
    rest, resume = _take(rest, '--resume')
    if resume and not os.path.exists(resume):
        fail(f'--resume {resume}: no such file or folder (give the LTH run folder <output>/<experiment>)')
    rest, output, experiment = _run_folder(rest, resume)
    run_dir = os.path.join(output, experiment)
    dense_dir = os.path.join(run_dir, DENSE_PHASE_DIR)
    rewind_file, dense_last = os.path.join(dense_dir, REWIND_FILE), os.path.join(dense_dir, LAST)
    step = int(getattr(dst_args, phase.rewind_step_arg, None) or 0)
    if step < 0:
        fail(f'--{phase.rewind_step_arg.replace("_", "-")} {step} must be >= 0')
    env = dict(os.environ)
    if not os.path.isfile(os.path.join(dense_dir, DENSE_DONE)):
        _say(f'{dst_args.dst} phase 1/2: dense training in {dense_dir} (rewind point: optimizer step {step})')
        dense = ['--dst', phase.dense_method]
        if dst_args.dst_seed is not None:
            dense += ['--dst-seed', str(dst_args.dst_seed)]
        again = ['--resume', dense_last] if resume and os.path.isfile(dense_last) else []
        _child(script, [*rest, '--output', run_dir, '--experiment', DENSE_PHASE_DIR, *again], dense,
               _phase_env({**env, REWIND_ENV: f'{step}:{os.path.abspath(rewind_file)}'}, 1))
        if is_primary():
            write_json_atomic({'rewind_step': step, 'rewind_state': rewind_file, 'trained_state': dense_last},
                              os.path.join(dense_dir, DENSE_DONE))
    if not _wait_for((dense_last, rewind_file)):
        missing = [p for p in (dense_last, rewind_file) if not os.path.isfile(p)]
        fail(f'--dst {dst_args.dst}: the dense phase left no {missing[0]}')
    sparse_last = os.path.join(run_dir, LAST)
    again = ['--resume', sparse_last] if resume and os.path.isfile(sparse_last) else []
    dst = _drop_dst(dst_tokens, {phase.rewind_step_arg, phase.trained_state_arg, phase.rewind_state_arg})
    # a resumed sparse phase "rewinds" to its own checkpoint: create_sparsifier_from_args puts the resumed parameters
    # back after the method's prepare, but not the buffers (BatchNorm statistics), which the rewind would overwrite
    dst += [f'--{phase.trained_state_arg.replace("_", "-")}', dense_last,
            f'--{phase.rewind_state_arg.replace("_", "-")}', sparse_last if again else rewind_file]
    _say(f'{dst_args.dst} phase 2/2: prune the dense weights of {dense_last}, rewind to {rewind_file} (step '
        f'{step}), train in {run_dir}')
    _child(script, [*rest, '--output', output, '--experiment', experiment, *again], dst, _phase_env(env, 2))


# --------------------------------------------------------------------------------------------------------------------
# in the dense phase's process
def rewind_hooks(launcher: Any) -> list[Any]:
    """In the dense phase (:data:`REWIND_ENV` set): save the student's weights at the rewind step (0: now, when the
    sparsifier attaches). Returns the hooks to remove (none when the rewind point exists or is not asked for)."""
    spec = os.environ.get(REWIND_ENV)
    if not spec or launcher.model is None:
        return []
    step_text, path = spec.split(':', 1)
    step = int(step_text)
    if os.path.isfile(path):
        return []

    def save() -> None:
        from ...methods.lth import capture_weights
        if is_primary():
            with atomic_path(path) as tmp:
                torch.save(capture_weights(launcher.model), tmp)
            log(f'DST: dense phase: rewind point at optimizer step {step} saved to {path}')

    if step == 0 and not launcher.resume_epoch:
        save()
        return []
    count = {'n': None}

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        if count['n'] is None:  # the steps already done by a resumed run
            count['n'] = int(launcher.resume_epoch or 0) * int(launcher.updates_per_epoch or 0)
        count['n'] += 1
        if count['n'] == step and not os.path.isfile(path):
            save()
        elif count['n'] > step and not os.path.isfile(path):
            fail(f'the LTH rewind point (step {step}) {path} is missing and the resumed dense phase is past it: '
                 'start the dense phase again')
    return [launcher.sparsifier.optimizer.register_step_post_hook(after_step)]
