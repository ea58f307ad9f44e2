"""The state of one ``timm-dst-train`` run: plain dataclasses, grouped by what they hold and when they are set.

:func:`timm_dst.cli.build.build_run` creates a :class:`RunState`; the functions of :mod:`~timm_dst.cli.loop`,
:mod:`~timm_dst.cli.resume` and :mod:`~timm_dst.cli.evaluate` take it explicitly and change it in place. Every group is
a ``slots`` dataclass, so an attribute that is not declared here cannot be set on it.

========== ================================================================= =======================================
group      holds                                                             set by
========== ================================================================= =======================================
setup      arguments, Accelerator, output folder, rank role                  ``build_setup``
data       data sets, data config, loaders, mixup, batches per epoch         ``build_data`` (loaders: ``prepare``)
training   model, losses, optimizer, schedule, sparsifier, FLOPs, EMA        ``build_training`` (prepared: ``prepare``)
position   where training stands: epoch, batch, optimizer step, meters       ``resume_run``, the epoch loop
resume     what a ``--resume`` checkpoint hands to the rest of the build     ``load_resume``, ``resume_run``
outputs    the checkpoint saver, the best metric, the checkpoint in writing  ``prepare``, the epoch loop
========== ================================================================= =======================================
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from accelerate import Accelerator
    from timm.data import Mixup
    from timm.scheduler.scheduler import Scheduler
    from timm.utils import ModelEmaV3

    from ..core.controller import Sparsifier
    from ..core.flops import TrainingFlops
    from .data import DataInfo, DataSplits
    from .outputs import DstCheckpointSaver

__all__ = ['RunSetup', 'RunData', 'RunTraining', 'RunPosition', 'RunResume', 'RunOutputs', 'RunState', 'fresh_meters',
           'checkpoint_entries']


def fresh_meters() -> dict[str, float]:
    """The all-rank running sums of an epoch's training metrics, empty."""
    return {'loss_sum': 0.0, 'correct': 0.0, 'count': 0}


@dataclass(slots=True)
class RunSetup:
    """What the run is and where it writes.

    Attributes:
        args: The parsed flags (``--lr`` filled in by timm's lr scaling).
        accelerator: The run's Accelerator.
        output_dir: The output folder (the same on every rank).
        is_main: Whether this process is the main one (it alone writes files).
        progress: Whether progress bars are shown.
        rewind: ``(optimizer step, file)``: save the weights there (the dense phase of a method with one), or None.
    """

    args: argparse.Namespace
    accelerator: Accelerator
    output_dir: str
    is_main: bool
    progress: bool
    rewind: tuple[int, str] | None = None


@dataclass(slots=True)
class RunData:
    """The data: splits, the resolved data config, the loaders and the batch counts.

    Attributes:
        splits: The opened training / validation / test splits.
        info: The data set's name, sizes, classes and input shape.
        data_config: timm's resolved data config (input size, interpolation, mean, std, crop).
        train_loader: The training loader (prepared by Accelerate once :func:`~timm_dst.cli.build.prepare` ran).
        val_loader: The validation loader, or None without a validation split.
        test_loader: The test loader, or None without a test split.
        mixup: timm's ``Mixup`` with ``--mixup`` / ``--cutmix``, else None.
        batches_per_epoch: Training batches per process and epoch.
        updates_per_epoch: Optimizer steps per epoch.
    """

    splits: DataSplits
    info: DataInfo
    data_config: dict[str, Any]
    train_loader: Any
    val_loader: Any | None
    test_loader: Any | None
    mixup: Mixup | None
    batches_per_epoch: int
    updates_per_epoch: int


@dataclass(slots=True)
class RunTraining:
    """The model and everything that trains it.

    Attributes:
        model: The model (unwrapped; its masks attached by the sparsifier).
        model_kwargs: Its ``timm.create_model`` keywords.
        train_loss: The training loss (soft targets with mixup, label smoothing, BCE, ...).
        eval_loss: The validation loss (cross-entropy).
        optimizer: The optimizer, unwrapped.
        scheduler: timm's lr scheduler, or None.
        num_epochs: Epochs of the run (the scheduler's count, cooldown included).
        total_steps: Optimizer steps of the run.
        decreasing: Whether a lower ``--eval-metric`` is better.
        sparsifier: The DST controller.
        flops: Its training-FLOPs counter.
        ema: timm's ``ModelEmaV3`` with ``--model-ema``, else None.
        train_model: The model as trained (compiled, wrapped by Accelerate); set by ``prepare``.
        optimizer_p: The optimizer as wrapped by Accelerate; set by ``prepare``.
    """

    model: nn.Module
    model_kwargs: dict[str, Any]
    train_loss: nn.Module
    eval_loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler | None
    num_epochs: int
    total_steps: int
    decreasing: bool
    sparsifier: Sparsifier
    flops: TrainingFlops
    ema: ModelEmaV3 | None
    train_model: nn.Module | None = None
    optimizer_p: Any = None


@dataclass(slots=True)
class RunPosition:
    """Where training stands; written into every checkpoint, read back by a resume.

    Attributes:
        start_epoch: The epoch the loop starts at.
        start_batch: The batch of ``start_epoch`` it starts at (a mid-epoch resume).
        num_updates: Optimizer steps done.
        meters: The current epoch's all-rank running sums (:func:`fresh_meters`).
    """

    start_epoch: int = 0
    start_batch: int = 0
    num_updates: int = 0
    meters: dict[str, float] = field(default_factory=fresh_meters)


@dataclass(slots=True)
class RunResume:
    """What a ``--resume`` checkpoint hands to the rest of the build (all empty without ``--resume``).

    Attributes:
        ckpt: The checkpoint read by :func:`~timm_dst.cli.resume.load_resume`.
        dense: Whether it is a dense timm checkpoint (no timm-dst state).
        rng: This rank's random states, restored once the model is prepared.
        scaler: The AMP scaler's state (loaded once Accelerate created the scaler).
        saver: The checkpoint saver's state (history, best metric).
    """

    ckpt: dict[str, Any] | None = None
    dense: bool = False
    rng: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    saver: dict[str, Any] | None = None


@dataclass(slots=True)
class RunOutputs:
    """The checkpoints and the ranking of epochs.

    Attributes:
        saver: The checkpoint saver (main process only; None on the others).
        best_metric: The best ``--eval-metric`` so far.
        best_epoch: The epoch that reached it.
        rngs: Every rank's random states, gathered for the checkpoint being written.
        next_position: ``{'next_epoch', 'next_batch'}`` of the checkpoint being written.
    """

    saver: DstCheckpointSaver | None = None
    best_metric: float | None = None
    best_epoch: int | None = None
    rngs: list[dict[str, Any]] | None = None
    next_position: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class RunState:
    """One ``timm-dst-train`` run, in groups (see the module's table)."""

    setup: RunSetup
    data: RunData
    training: RunTraining
    position: RunPosition = field(default_factory=RunPosition)
    resume: RunResume = field(default_factory=RunResume)
    outputs: RunOutputs = field(default_factory=RunOutputs)


def checkpoint_entries(state: RunState) -> dict[str, Any]:
    """The run's entries of a checkpoint's DST state (position, meters, every rank's random states, model keywords):
    the checkpoint saver's ``state_fn``."""
    pos = state.position
    return {'run': dict(state.outputs.next_position, num_updates=pos.num_updates,
                        num_epochs=state.training.num_epochs, meters=dict(pos.meters), rng=state.outputs.rngs,
                        num_processes=state.setup.accelerator.num_processes,
                        model_kwargs=json.loads(json.dumps(state.training.model_kwargs, default=list)))}
