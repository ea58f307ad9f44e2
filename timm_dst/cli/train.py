#!/usr/bin/env python3
"""timm-dst-train: timm's train.py for sparse models with Dynamic Sparse Training, launched through Accelerate.

Runs as ``timm-dst-train``, ``python -m timm_dst.train`` or ``accelerate launch -m timm_dst.train``::

    timm-dst-train -c recipes/fmnist_mlp_set_itop.yaml --output runs/fmnist

Every flag of timm's train.py is accepted with its meaning, or refused with a one-line reason; the DST flags are
:func:`timm_dst.integrations.timm.add_dst_args`'s. See docs/cli.md. A run is a :class:`~timm_dst.cli.state.RunState`
and the functions that take it: built by :mod:`~timm_dst.cli.build` (data from :mod:`~timm_dst.cli.data`), resumed
by :mod:`~timm_dst.cli.resume`, trained by :mod:`~timm_dst.cli.loop`, evaluated and finished by
:mod:`~timm_dst.cli.evaluate`; outputs and checkpoints are :mod:`~timm_dst.cli.outputs`'s, LTH's two phases
:mod:`~timm_dst.cli.lth`'s. This module holds the entry points and :class:`_Run`, one run as an object.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

import torch.nn as nn

from ..core.controller import NonFiniteGradientError
from ..integrations.timm.outputs import OutputWriteError, dst_summary, flops_line
from ..methods._registry import get_method_info
from .build import build_run
from .config import output_dir, parse_args, user_error
from .evaluate import evaluate, finish_run
from .loop import TrainingDivergedError, fit
from .lth import train_two_phases as _train_two_phases
from .state import RunState

__all__ = ['main', 'train', 'train_two_phases', 'evaluate', 'TrainingDivergedError', 'dst_summary', 'flops_line']

_logger = logging.getLogger('timm_dst.train')


class _Run:
    """One training run as an object: its :class:`~timm_dst.cli.state.RunState`, built on construction
    (:func:`~timm_dst.cli.build.build_run`), trained by :meth:`fit`. :func:`train` and :func:`train_two_phases`
    create every run through this class.

    Args:
        args: The parsed flags.
        rewind: ``(optimizer step, file)``: save the weights there (the dense phase of a method with one).
    """

    def __init__(self, args: argparse.Namespace, rewind: tuple[int, str] | None = None):
        self.state: RunState = build_run(args, rewind)

    @property
    def args(self) -> argparse.Namespace:
        """The run's parsed flags."""
        return self.state.setup.args

    @property
    def model(self) -> nn.Module:
        """The model being trained (unwrapped)."""
        return self.state.training.model

    def fit(self) -> dict[str, Any]:
        """Train to the last epoch and finish (see :func:`timm_dst.cli.loop.fit`); returns the results."""
        return fit(self.state)

    def finish(self, wall: float) -> dict[str, Any]:
        """Export, test the exported weights in plain timm, write results.json (see
        :func:`timm_dst.cli.evaluate.finish_run`)."""
        return finish_run(self.state, wall)


# --------------------------------------------------------------------------------------------------------------------
def train_two_phases(args: argparse.Namespace) -> dict[str, Any]:
    """Both phases of a method with a dense phase, LTH (see :func:`timm_dst.cli.lth.train_two_phases`)."""
    return _train_two_phases(args, _Run, output_dir)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by parsed ``args``; returns the results (also written to ``results.json``).

    A method with a dense phase (``--dst lth`` / ``lth-set-itop``) without its trained state runs both phases (see
    :func:`train_two_phases`).
    """
    phase = get_method_info(args.dst).dense_phase
    if phase is not None and not getattr(args, phase.trained_state_arg):
        return train_two_phases(args)
    return _Run(args).fit()


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``timm-dst-train``."""
    args = parse_args(argv)
    import errno

    try:
        train(args)
    except (TrainingDivergedError, NonFiniteGradientError) as e:
        _logger.error(str(e))
        raise SystemExit(f'timm-dst-train: {e}') from None
    except OutputWriteError as e:  # a checkpoint not written: the earlier ones are kept
        raise user_error(str(e)) from None
    except OSError as e:  # another output of the run (args.yaml, log, summary) on a full or read-only disk
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise user_error(f'{e.filename or "an output file"} was not written ({e.strerror})') from None


if __name__ == '__main__':
    main()
