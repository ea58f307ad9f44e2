"""What a ``timm-dst-train`` run writes: checkpoints (timm's ``CheckpointSaver`` with the timm-dst layout of
:mod:`timm_dst.integrations.timm`), ``summary.csv`` in timm's column names, the per-epoch PNG, the log lines, JSON
summaries."""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from timm.utils import CheckpointSaver

from ..core.masks import unwrap_model
from ..integrations.timm.checkpoint import pack_checkpoint
from ..integrations.timm.outputs import (  # noqa: F401  (re-exported)
    OutputWriteError,
    dst_summary,
    flops_line,
    is_write_failure,
    write_failure_cause,
    write_json_atomic,
)

__all__ = ['DstCheckpointSaver', 'write_summary_row', 'read_summary', 'truncate_summary', 'plot_summary',
           'write_json_atomic', 'dst_summary', 'flops_line', 'setup_logging', 'train_log_line']

_logger = logging.getLogger('timm_dst.train')


class DstCheckpointSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` (``last``, ``model_best``, ``checkpoint-N`` history of ``--checkpoint-hist``,
    ``recovery-E-B`` files that never overwrite ``last``) writing the timm-dst layout: ``state_dict`` /
    ``state_dict_ema`` plain timm weights, the DST state and the run's position under ``timm_dst``.

    Args:
        state_fn: Returns the extra entries of the DST state (position, meters, every rank's random states ...).
        sparsifier: The run's sparsifier.
        flops: Its training-FLOPs counter.
        scheduler: The lr scheduler (its state is saved too).
        kwargs: timm's ``CheckpointSaver`` arguments.
    """

    def __init__(self, state_fn: Callable[[], dict[str, Any]], sparsifier: Any, flops: Any, scheduler: Any,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.state_fn, self.sparsifier, self.flops, self.scheduler = state_fn, sparsifier, flops, scheduler

    def save_last(self, epoch: int) -> None:
        """Write ``last`` only (a mid-epoch stop of ``--stop-after-updates``: not ranked, no history entry)."""
        tmp = os.path.join(self.checkpoint_dir, 'tmp' + self.extension)
        self._save(tmp, epoch)
        self._replace(tmp, os.path.join(self.checkpoint_dir, 'last' + self.extension))

    def _save(self, save_path: str, epoch: int, metric: float | None = None) -> None:
        state: dict[str, Any] = {
            'epoch': epoch, 'arch': self.args.model, 'args': self.args, 'version': 2,
            'optimizer': self.optimizer.state_dict(),
            'state_dict': unwrap_model(self.model).state_dict(),
        }
        if self.model_ema is not None:
            state['state_dict_ema'] = unwrap_model(self.model_ema).state_dict()
        if self.amp_scaler is not None:
            state['amp_scaler'] = self.amp_scaler.state_dict()
        if self.scheduler is not None:
            state['scheduler'] = self.scheduler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        extra = self.state_fn()
        if self.model_ema is not None:  # the EMA's values under its masks too (the plain EMA weights hold zeros)
            extra['ema_orig'] = {k: v for k, v in unwrap_model(self.model_ema).state_dict().items()
                                 if k.endswith('_orig')}
        pack_checkpoint(state, self.sparsifier, flops=self.flops, rng=False, extra=extra)
        tmp = save_path + '.part'
        try:
            with open(tmp, 'wb') as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, save_path)
        except (OSError, RuntimeError) as e:
            if not is_write_failure(e):
                raise
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise OutputWriteError(f'checkpoint of epoch {epoch} not written: {save_path} ({write_failure_cause(e)}); '
                                   'the checkpoints written before are unchanged') from e


# --------------------------------------------------------------------------------------------------------------------
# summary.csv and its plot
def write_summary_row(path: str, row: dict[str, Any]) -> None:
    """Append one epoch to ``summary.csv`` (timm's ``update_summary`` columns ``epoch, train_*, eval_*, lr``, then
    ``density, itop_rate`` and the run's extra columns); the header is written when the file is new."""
    write_header = not os.path.isfile(path) or os.path.getsize(path) == 0
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if write_header:
            writer.writeheader()
        writer.writerow(row)


def read_summary(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def truncate_summary(path: str, next_epoch: int) -> None:
    """Drop rows of epochs a resumed run trains again (killed after the row, before the checkpoint)."""
    rows = read_summary(path)
    keep = [r for r in rows if int(r['epoch']) < next_epoch]
    if rows and len(keep) != len(rows):
        with open(path, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(keep)


def plot_summary(csv_path: str, png_path: str, title: str = '') -> None:
    """Train / eval top-1 accuracy, density and R_s per epoch, from ``summary.csv``, as one PNG."""
    rows = read_summary(csv_path)
    if not rows:
        return
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    def col(name: str) -> list[float] | None:
        if name not in rows[0] or any(r.get(name) in (None, '') for r in rows):
            return None
        return [float(r[name]) for r in rows]

    epochs = [int(r['epoch']) + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, label in (('train_top1', 'train top-1'), ('eval_top1', 'eval top-1')):
        values = col(name)
        if values is not None:
            ax1.plot(epochs, values, marker='.', label=label)
    ax1.set_xlabel('epoch')
    ax1.set_ylabel('accuracy (%)')
    ax1.legend()
    for name, label in (('density', 'density'), ('itop_rate', 'R_s (explored)')):
        values = col(name)
        if values is not None:
            ax2.plot(epochs, values, marker='.', label=label)
    ax2.set_xlabel('epoch')
    ax2.set_ylim(0, 1.02)
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = png_path + '.part.png'
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png_path)


def train_log_line(epoch: int, update_idx: int, updates_per_epoch: int, loss_now: float, loss_avg: float,
                   update_time: tuple[float, float], samples: int, lr: float, data_time: tuple[float, float],
                   density: float, itop_rate: float) -> str:
    """timm train.py's progress line (``Train: E [ i/N (p%)]  Loss: ...  LR: ...  Data: ...``) plus density and R_s."""
    t_now, t_avg = update_time
    pct = 100. * (update_idx + 1) / updates_per_epoch
    rate_now, rate_avg = samples / max(t_now, 1e-9), samples / max(t_avg, 1e-9)
    return (f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} ({pct:>3.0f}%)]  '
            f'Loss: {loss_now:#.3g} ({loss_avg:#.3g})  '
            f'Time: {t_now:.3f}s, {rate_now:>7.2f}/s  ({t_avg:.3f}s, {rate_avg:>7.2f}/s)  '
            f'LR: {lr:.3e}  Data: {data_time[0]:.3f} ({data_time[1]:.3f})  '
            f'Density: {density:.4f}  R_s: {itop_rate:.4f}')


_file_handler: logging.Handler | None = None


def setup_logging(is_main: bool, output_dir: str | None = None) -> None:
    """Messages to stdout on the main process (warnings only elsewhere), and to ``<output>/log.txt``."""
    global _file_handler
    root = logging.getLogger()
    if not getattr(root, '_timm_dst_configured', False):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter('%(message)s'))
        root.addHandler(handler)
        root._timm_dst_configured = True  # type: ignore[attr-defined]
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    if _file_handler is not None:
        root.removeHandler(_file_handler)
        _file_handler.close()
        _file_handler = None
    if is_main and output_dir:
        _file_handler = logging.FileHandler(os.path.join(output_dir, 'log.txt'))
        _file_handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
        root.addHandler(_file_handler)
