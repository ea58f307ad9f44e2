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

__all__ = ['DstCheckpointSaver', 'write_summary_row', 'summary_columns', 'TIMM_SUMMARY_COLUMNS', 'read_summary',
           'truncate_summary', 'plot_summary', 'write_json_atomic', 'dst_summary', 'flops_line', 'setup_logging',
           'train_log_line', 'density_text']

_logger = logging.getLogger('timm_dst.train')

#: The columns of timm's ``update_summary`` (its train.py: ``epoch``, ``train_loss``, ``eval_*``, ``lr``), in order.
TIMM_SUMMARY_COLUMNS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')


# --------------------------------------------------------------------------------------------------------------------
# summary.csv and its plot
def write_summary_row(path: str, row: dict[str, Any]) -> None:
    """Add one epoch to ``summary.csv``: timm's ``update_summary`` columns first, in timm's order (``epoch,
    train_loss, eval_loss, eval_top1, eval_top5, lr``), then timm-dst's own (``train_top1, density, model_density,
    itop_rate`` ...). The header is written when the file is new, and the whole file is rewritten under one header
    when a row brings columns the file lacks (an epoch validated after one that was not) or the file's columns are
    in another order (a run begun by an older version); atomically: a failed write leaves the rows before."""
    rows = read_summary(path)
    old = list(rows[0]) if rows else []
    fields = summary_columns(old + [k for k in row if k not in old])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, restval='')
    if fields != old:
        writer.writeheader()
        writer.writerows(rows)
    writer.writerow(row)
    prefix = ''
    if fields == old:  # append: the rows before stay as they are
        with open(path, newline='') as f:
            prefix = f.read()
    with atomic_write(path, 'w', newline='') as f:
        f.write(prefix + text.getvalue())


def summary_columns(names: list[str]) -> list[str]:
    """``names`` in summary.csv's order: timm's columns (:data:`TIMM_SUMMARY_COLUMNS`) first, then the others."""
    return [c for c in TIMM_SUMMARY_COLUMNS if c in names] + [c for c in names if c not in TIMM_SUMMARY_COLUMNS]


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
    """Train / eval top-1 accuracy, the two densities and R_s per epoch, from ``summary.csv``, as one PNG."""
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
    for name, label in (('density', 'density (sparse tensors)'), ('model_density', 'density (all weights)'),
                        ('itop_rate', 'R_s (explored)')):
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
                   density: float, itop_rate: float, model_density: float | None = None) -> str:
    """timm train.py's progress line (``Train: E [ i/N (p%)]  Loss: ...  LR: ...  Data: ...``) plus the density of
    the sparse tensors, that of all the model's weights (:func:`density_text`) and R_s."""
    t_now, t_avg = update_time
    pct = 100. * (update_idx + 1) / updates_per_epoch
    rate_now, rate_avg = samples / max(t_now, 1e-9), samples / max(t_avg, 1e-9)
    return (f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} ({pct:>3.0f}%)]  '
            f'Loss: {loss_now:#.3g} ({loss_avg:#.3g})  '
            f'Time: {t_now:.3f}s, {rate_now:>7.2f}/s  ({t_avg:.3f}s, {rate_avg:>7.2f}/s)  '
            f'LR: {lr:.3e}  Data: {data_time[0]:.3f} ({data_time[1]:.3f})  '
            f'Density: {density_text(density, model_density)}  R_s: {itop_rate:.4f}')


def density_text(density: float, model_density: float | None = None) -> str:
    """``0.1000 (sparse tensors), 0.2000 (all weights)``: the density of the sparse tensors and of every weight of
    the model (dense layers, biases and norms count whole), as every log line of the CLI names them."""
    text = f'{density:.4f} (sparse tensors)'
    return text if model_density is None else f'{text}, {model_density:.4f} (all weights)'


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
