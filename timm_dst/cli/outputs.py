"""What a ``timm-dst-train`` run writes: checkpoints (:class:`~timm_dst.integrations.timm.saver.DstCheckpointSaver`,
the saver of every front end), ``summary.csv`` in timm's column names, the per-epoch PNG, the log lines, JSON
summaries; every file through the one atomic write (:func:`~timm_dst.integrations.timm.outputs.atomic_write`)."""
from __future__ import annotations

import csv
import io
import logging
import os
import sys
from typing import Any

from ..integrations.timm.outputs import (  # noqa: F401  (re-exported)
    OutputWriteError,
    atomic_write,
    dst_summary,
    flops_line,
    is_write_failure,
    write_failure_cause,
    write_json_atomic,
)
from ..integrations.timm.saver import DstCheckpointSaver

__all__ = ['DstCheckpointSaver', 'write_summary_row', 'read_summary', 'truncate_summary', 'plot_summary',
           'write_json_atomic', 'dst_summary', 'flops_line', 'setup_logging', 'train_log_line']

_logger = logging.getLogger('timm_dst.train')


# --------------------------------------------------------------------------------------------------------------------
# summary.csv and its plot
def write_summary_row(path: str, row: dict[str, Any]) -> None:
    """Add one epoch to ``summary.csv`` (timm's ``update_summary`` columns ``epoch, train_*, eval_*, lr``, then
    ``density, itop_rate`` and the run's extra columns); the header is written when the file is new. The file is
    rewritten atomically: a failed write leaves the rows before."""
    old = ''
    if os.path.isfile(path):
        with open(path, newline='') as f:
            old = f.read()
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(row))
    if not old:
        writer.writeheader()
    writer.writerow(row)
    with atomic_write(path, 'w', newline='') as f:
        f.write(old + text.getvalue())


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
        with atomic_write(path, 'w', newline='') as f:
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
    try:
        with atomic_write(png_path) as f:
            fig.savefig(f, format='png', dpi=80)
    finally:
        plt.close(fig)


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
