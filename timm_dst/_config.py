"""Arguments of the training CLI: timm train.py's flag names, the DST flags, YAML configs, early validation."""
from __future__ import annotations

import argparse
import os
from typing import Any

import yaml

from ._registry import DEFAULT_TRAIN_METHOD, get_method_info
from .plugin import ParseKwargs as _ParseKwargs
from .plugin import add_dst_args, validate_dst_args
from .plugin import milestone as _milestone
from .plugin import sparsifier_kwargs as dst_kwargs

__all__ = ['create_parser', 'parse_args', 'dst_kwargs', 'args_to_yaml']

_AMP_DTYPES = ('bfloat16', 'float16')
_EVAL_METRICS = ('top1', 'top5', 'loss')


def create_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The config parser (``-c``) and the main parser."""
    config_parser = argparse.ArgumentParser(description='Training config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file; its keys are the flag names (dashes or underscores)')

    parser = argparse.ArgumentParser(
        prog='timm-dst-train', description='Dynamic Sparse Training of timm models (Accelerate-launched)',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config file; its keys are the flag names (dashes or underscores)')

    g = parser.add_argument_group('Dataset')
    g.add_argument('--data-dir', metavar='DIR', default=None,
                   help='data set root (Fashion-MNIST: /usr/share/datasets/fashion-mnist when not given)')
    g.add_argument('--dataset', '-d', metavar='NAME', default='fashion_mnist',
                   help='fashion_mnist | cifar10 | cifar100 | folder (ImageFolder, also "") | synthetic | any other '
                        'name timm.data.create_dataset knows')
    g.add_argument('--train-split', metavar='NAME', default='train', help='training split (folder name)')
    g.add_argument('--test-split', metavar='NAME', default='test',
                   help='test split of folder / timm data sets (CIFAR and Fashion-MNIST use their own test sets)')
    g.add_argument('--val-fraction', type=float, default=0.1,
                   help='fraction of the training set held out for validation (best checkpoint chosen on it)')
    g.add_argument('--split-seed', type=int, default=0, help='seed of the train / validation split')
    g.add_argument('--dataset-download', action='store_true', default=False,
                   help='let torchvision download CIFAR (needs network access)')
    g.add_argument('--synthetic-train-size', type=int, default=512, help='synthetic data: training samples')
    g.add_argument('--synthetic-test-size', type=int, default=256, help='synthetic data: test samples')

    g = parser.add_argument_group('Model')
    g.add_argument('--model', default='itop_mlp', type=str, metavar='MODEL', help='any timm model name')
    g.add_argument('--pretrained', action='store_true', default=False, help='start from pretrained weights')
    g.add_argument('--pretrained-path', default=None, type=str, metavar='FILE',
                   help='local pretrained weights (.safetensors / .pth), loaded by timm with --pretrained')
    g.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='load these model weights (timm checkpoint or state_dict) before sparsifying')
    g.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='continue from a checkpoint (last.pth.tar) or a run folder holding one')
    g.add_argument('--num-classes', type=int, default=None, metavar='N', help='classes (default: from the data)')
    g.add_argument('--img-size', type=int, default=None, metavar='N',
                   help='image size (passed to the model; synthetic and folder data are made this size)')
    g.add_argument('--in-chans', type=int, default=None, metavar='N', help='image channels (default: from the data)')
    g.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                   help='input C H W of synthetic data (overrides --in-chans / --img-size there)')
    g.add_argument('--crop-pct', default=None, type=float, metavar='N', help='eval center crop (folder data)')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override the data mean')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override the data std')
    g.add_argument('--interpolation', default='', type=str, metavar='NAME', help='resize interpolation (folder)')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                   help='evaluation batch size (default: --batch-size)')
    g.add_argument('--channels-last', action='store_true', default=False, help='channels-last memory layout')
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                   help='micro-batches per optimizer step (topology updates count optimizer steps)')
    g.add_argument('--grad-checkpointing', action='store_true', default=False,
                   help='gradient checkpointing (timm models that support it)')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=_ParseKwargs, metavar='KEY=VALUE',
                   help='extra keyword arguments for timm.create_model')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate (drop_rate)')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate')
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND',
                   help='torch.compile the model (backend, default inductor)')
    g.add_argument('--torchcompile-mode', type=str, default=None, metavar='MODE', help='torch.compile mode')

    g = parser.add_argument_group('Device & mixed precision')
    g.add_argument('--amp', action='store_true', default=False, help='mixed precision (autocast) through Accelerate')
    g.add_argument('--amp-dtype', default='float16', choices=_AMP_DTYPES,
                   help='autocast dtype; bfloat16 also works on CPU')

    g = parser.add_argument_group('Optimizer')
    g.add_argument('--opt', default='momentum', type=str, metavar='OPTIMIZER',
                   help='timm optimizer name (momentum = SGD with momentum; sgd = Nesterov SGD in timm)')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum')
    g.add_argument('--weight-decay', type=float, default=5e-4, help='weight decay (not on biases / norms)')
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='gradient clipping (off if unset)')
    g.add_argument('--clip-mode', type=str, default='norm', choices=('norm', 'value', 'agc'), help='clipping mode')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=_ParseKwargs, metavar='KEY=VALUE',
                   help='extra optimizer keyword arguments')

    g = parser.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                   help='timm scheduler: cosine | step | multistep | plateau | poly | tanh | none ...')
    g.add_argument('--sched-on-updates', action='store_true', default=False,
                   help='step the schedule per optimizer update instead of per epoch')
    g.add_argument('--lr', type=float, default=0.1, metavar='LR', help='learning rate')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct', help='lr noise on/off')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT', help='lr noise limit')
    g.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV', help='lr noise std')
    g.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT', help='cycle length multiplier')
    g.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT', help='lr decay per cycle')
    g.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N', help='number of cycles')
    g.add_argument('--lr-k-decay', type=float, default=1.0, help='k-decay of cosine / poly')
    g.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warm-up start learning rate')
    g.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound of cyclic schedules')
    g.add_argument('--epochs', type=int, default=10, metavar='N', help='epochs to train')
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                   help='epochs of the multistep decays')
    g.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval of step decays')
    g.add_argument('--warmup-epochs', type=int, default=0, metavar='N', help='linear warm-up epochs')
    g.add_argument('--warmup-prefix', action='store_true', default=False,
                   help='warm-up epochs come before the main schedule')
    g.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs at min lr at the end')
    g.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='plateau patience')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='lr decay factor')

    g = parser.add_argument_group('Augmentation & regularization')
    g.add_argument('--no-aug', action='store_true', default=False, help='no training augmentation')
    g.add_argument('--crop-padding', type=int, default=None, metavar='PIXELS',
                   help='pad-and-random-crop augmentation (default: 4 for CIFAR, 0 otherwise)')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                   help='random resized crop scale (folder data)')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='random resized crop aspect ratio (folder data)')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--vflip', type=float, default=0.0, help='vertical flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter (folder data)')
    g.add_argument('--aa', type=str, default=None, metavar='NAME', help='AutoAugment policy (folder data)')
    g.add_argument('--reprob', type=float, default=0.0, metavar='PCT', help='random erase prob (folder data)')
    g.add_argument('--remode', type=str, default='pixel', help='random erase mode (folder data)')
    g.add_argument('--recount', type=int, default=1, help='random erase count (folder data)')
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')

    g = parser.add_argument_group('Model EMA')
    g.add_argument('--model-ema', action='store_true', default=False,
                   help='keep an EMA of the weights (timm ModelEmaV3); validation and the best checkpoint use it')
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='keep the EMA on the CPU')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay')
    g.add_argument('--model-ema-warmup', action='store_true', default=False, help='EMA decay warm-up')

    add_dst_args(parser, default_method=DEFAULT_TRAIN_METHOD)

    g = parser.add_argument_group('Miscellaneous')
    g.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (ranks use seed + rank)')
    g.add_argument('--log-interval', type=int, default=50, metavar='N',
                   help='optimizer steps between progress-bar updates and divergence checks')
    g.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                   help='also checkpoint every N optimizer steps inside an epoch (0 = epoch ends only)')
    g.add_argument('--stop-after-updates', type=int, default=None, metavar='N',
                   help='checkpoint and stop after N optimizer steps in total (to split a run over time-limited '
                        'jobs; continue with --resume)')
    g.add_argument('-j', '--workers', type=int, default=0, metavar='N',
                   help='data-loading worker processes (in-memory data sets always load in the main process)')
    g.add_argument('--threads', type=int, default=None, metavar='N',
                   help='intra-op CPU threads, torch.set_num_threads (default: torch\'s; 1 is fastest for small '
                        'models on a busy CPU)')
    g.add_argument('--pin-mem', action='store_true', default=False, help='pin loader memory')
    g.add_argument('--output', default='', type=str, metavar='PATH',
                   help='run folder (default ./output/train/<date-time>-<model>)')
    g.add_argument('--experiment', default='', type=str, metavar='NAME', help='sub-folder of --output')
    g.add_argument('--eval-metric', default='top1', type=str, choices=_EVAL_METRICS,
                   help='validation metric choosing the best checkpoint')
    g.add_argument('--no-progress', action='store_true', default=False, help='no progress bar')
    g.add_argument('--save-rank-masks', action='store_true', default=False,
                   help='each process writes its final masks and R_s to masks_rank<R>.pt (to check rank agreement)')
    return config_parser, parser


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        parser.error(f'-c/--config {path!r}: no such file')
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        parser.error(f'-c/--config {path!r}: expected a mapping of flag names to values')
    # keys are flag names (any alias: sparse_init is --distribution) or dests
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    for a in list(actions.values()):
        actions.update({o.lstrip('-').replace('-', '_'): a for o in a.option_strings if o.startswith('--')})
    out, unknown = {}, []
    for key, value in cfg.items():
        action = actions.get(str(key).lstrip('-').replace('-', '_'))
        if action is None:
            unknown.append(str(key))
            continue
        dest = action.dest
        if isinstance(value, str) and action.type is not None and action.nargs is None:
            value = action.type(value)
        if dest == 'update_milestones' and value is not None:
            value = [tuple(v) if isinstance(v, list | tuple) else _milestone(str(v)) for v in value]
        out[dest] = value
    if unknown:
        parser.error(f'unknown key(s) in config {path}: {", ".join(unknown)} (keys are the flag names, see --help)')
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags (and a ``-c`` YAML config, whose values the flags override); unknown flags or keys are errors."""
    config_parser, parser = create_parser()
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        parser.set_defaults(**_config_defaults(parser, args_config.config))
    args = parser.parse_args(remaining)
    args.config = args_config.config
    _validate(parser, args)
    return args


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cheap checks of everything that would otherwise fail later, each naming the flag and the accepted values."""
    import timm

    from ._data import check_dataset

    if not timm.is_model(args.model):
        close = timm.list_models(f'*{args.model.split(".")[0][:6]}*')[:10] if args.model else []
        hint = f'; similar names: {", ".join(close)}' if close else ''
        parser.error(f'--model {args.model!r} is not a timm model (see timm.list_models()){hint}')
    validate_dst_args(args, parser.error)
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads {args.threads!r} must be >= 1')
    for flag in ('epochs', 'batch_size', 'grad_accum_steps', 'log_interval'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} {getattr(args, flag)!r} must be >= 1')
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error(f'--val-fraction {args.val_fraction!r} must lie in [0, 1)')
    if args.pretrained_path and not os.path.isfile(args.pretrained_path):
        parser.error(f'--pretrained-path {args.pretrained_path!r}: no such file')
    if args.pretrained_path and not args.pretrained:
        args.pretrained = True
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        parser.error(f'--initial-checkpoint {args.initial_checkpoint!r}: no such file')
    phase = get_method_info(args.dst).dense_phase
    both_phases = phase is not None and not getattr(args, phase.trained_state_arg)
    if phase is not None:
        trained, rewind_state = (a.replace('_', '-') for a in (phase.trained_state_arg, phase.rewind_state_arg))
        step_flag = '--' + phase.rewind_step_arg.replace('_', '-')
        step = getattr(args, phase.rewind_step_arg)
        if step is not None and not both_phases:
            parser.error(f'{step_flag} is for --dst {args.dst} without --{trained} (the CLI then trains the dense '
                         'phase itself and saves the rewind point)')
        if step is not None and step < 0:
            parser.error(f'{step_flag} {step!r} must be >= 0')
        if both_phases and getattr(args, phase.rewind_state_arg):
            parser.error(f'--{rewind_state} needs --{trained} (without it the CLI trains the dense phase and saves '
                         f'its own rewind point: see {step_flag})')
    if args.resume and both_phases:
        if not os.path.exists(args.resume):  # both phases: a run folder or either phase's checkpoint
            parser.error(f'--resume: {args.resume!r}: no such checkpoint file or run folder')
    elif args.resume:
        from ._checkpoint import resolve_resume
        try:
            args.resume = resolve_resume(args.resume)
        except FileNotFoundError as e:
            parser.error(f'--resume: {e}')
    try:
        check_dataset(args.dataset, args.data_dir, args.dataset_download, args.train_split)
    except FileNotFoundError as e:
        parser.error(str(e))


def args_to_yaml(args: argparse.Namespace) -> str:
    """The resolved config as YAML (loadable again with ``-c``)."""
    data = {}
    for k, v in vars(args).items():
        if k == 'config':
            continue
        if isinstance(v, tuple):
            v = list(v)
        if k == 'update_milestones' and v is not None:
            v = [list(m) for m in v]
        data[k] = v
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False)
