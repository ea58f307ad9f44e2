"""Arguments of the training CLI: every flag of timm's train.py (same name, meaning and default, or refused with a
reason), the DST flags of :func:`timm_dst.integrations.timm.add_dst_args`, the CLI's own flags, YAML configs (including
a timm ``args.yaml``), and early validation. Every user error is one line naming the flag or key, exit status 2."""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from typing import Any

import yaml

from ..integrations.timm.checkpoint import resolve_resume
from ..integrations.timm.config import _coerce, read_yaml_config, writable_folder_problem
from ..integrations.timm.flags import ParseKwargs, add_dst_args, validate_dst_args
from ..integrations.timm.flags import add_dst_args as _add
from ..integrations.timm.flags import sparsifier_kwargs as dst_kwargs
from ..methods._registry import DEFAULT_TRAIN_METHOD, get_method_info
from .data import check_dataset, normalize_dataset_name

__all__ = ['create_parser', 'parse_args', 'args_to_yaml', 'dst_kwargs', 'REFUSED', 'DEFAULTS_DIFFER', 'TIMM_DEFAULTS',
           'MEANING_DIFFERS', 'OWN_FLAGS', 'flag_status', 'apply_default_family']

_EVAL_METRICS = ('top1', 'top5', 'loss')

# timm train.py flags refused when given a value other than their default: dest -> the reason
_NO_KD = 'knowledge distillation (a teacher model in the loss) is not implemented in timm-dst-train'
_NO_ITERABLE = ('applies to iterable (tfds / wds) data sets; timm-dst-train takes map-style data only (its data order '
                'is a seeded permutation, for exact resumes)')
_NO_SCHEDULED = ('scheduled multi-resolution / variable-batch loaders are not implemented (the sparsifier counts a '
                 'fixed number of optimizer steps per epoch)')
_NO_NAFLEX = 'NaFlex (variable sequence length) loaders are not implemented in timm-dst-train'
_NO_AUGMIX = 'AugMix split batches (--aug-splits, --split-bn, --jsd-loss) are not implemented in timm-dst-train'
_NO_SCRIPT = 'TorchScript is not supported with sparse reparametrisations; use --torchcompile'
REFUSED: dict[str, str] = {
    **{d: _NO_KD for d in ('kd_model_name', 'kd_distill_type', 'kd_loss_type', 'distill_loss_weight',
                           'task_loss_weight', 'kd_temperature', 'kd_student_feature_dim', 'kd_teacher_feature_dim',
                           'kd_token_distill_type')},
    **{d: _NO_ITERABLE for d in ('train_num_samples', 'val_num_samples', 'epoch_repeats')},
    **{d: _NO_SCHEDULED for d in ('train_img_sizes', 'train_batch_sizes', 'train_size_probs', 'train_size_schedule',
                                  'train_size_schedule_spread', 'train_size_random_mix', 'train_batches_per_epoch',
                                  'variable_batch_loss_scale')},
    **{d: _NO_NAFLEX for d in ('naflex_loader', 'naflex_train_seq_lens', 'naflex_max_seq_len', 'naflex_patch_sizes',
                               'naflex_patch_size_probs', 'naflex_loss_scale', 'naflex_patchify_channels_first')},
    **{d: _NO_AUGMIX for d in ('aug_splits', 'split_bn', 'jsd_loss')},
    'torchscript': _NO_SCRIPT, 'fuser': _NO_SCRIPT,
    'device': 'the device is Accelerate\'s (accelerate launch --cpu, CUDA_VISIBLE_DEVICES, ACCELERATE_USE_CPU=1)',
    'model_dtype': 'a low-precision model dtype is not supported: use --amp (Accelerate\'s mixed precision)',
    'start_epoch': ('the data order, lr schedule and sparsifier step follow the --resume checkpoint; an override would '
                    'put them out of step'),
    'aug_repeats': ('timm\'s RepeatAugSampler is a distributed sampler of its own; here one seeded sampler\'s batches '
                    'are sharded by Accelerate'),
    'tta': 'test-time-augmentation reduction is not implemented in timm-dst-train',
    'use_multi_epochs_loader': 'Accelerate rebuilds the training loader (its own sharded loader replaces it)',
}
# values of refused flags that mean the same as the default
_REFUSED_OK = {'model_dtype': ('float32',), 'device': ('cuda', 'cpu')}

# timm train.py flags whose built-in default differs from timm's: dest -> (this default, why). It applies only when no
# data is given (Fashion-MNIST) or the data is Fashion-MNIST / synthetic, or a timm-dst recipe leaves the flag out;
# with any other data the flag takes timm's default (TIMM_DEFAULTS, :func:`apply_default_family`)
_WITH_DATA = 'with data (a data folder, or a --dataset other than fashion_mnist / synthetic): timm\'s'
DEFAULTS_DIFFER: dict[str, str] = {
    'dataset': f'fashion_mnist (the papers\' laptop-sized data set) without data; {_WITH_DATA} "" (an image folder)',
    'model': f'itop_mlp, the ITOP MLP; {_WITH_DATA} resnet50',
    'opt': f'momentum, plain SGD with momentum as in the DST papers; {_WITH_DATA} sgd, which is Nesterov',
    'weight_decay': f'5e-4 of the DST papers; {_WITH_DATA} 2e-5',
    'epochs': f'10; {_WITH_DATA} 300',
    'warmup_epochs': f'0; {_WITH_DATA} 5',
    'smoothing': f'0, no label smoothing as in the DST papers; {_WITH_DATA} 0.1',
    'workers': f'0: in-memory data sets load in the main process; {_WITH_DATA} 4',
}
#: timm train.py's own defaults of the flags of :data:`DEFAULTS_DIFFER`, used when data is given.
TIMM_DEFAULTS: dict[str, Any] = {'dataset': '', 'model': 'resnet50', 'opt': 'sgd', 'weight_decay': 2e-5,
                                 'epochs': 300, 'warmup_epochs': 5, 'smoothing': 0.1, 'workers': 4}
# data sets that keep the built-in defaults: Fashion-MNIST (the Debian package's files) and the synthetic smoke set
_BUILT_IN_DATA = ('fashion_mnist', 'synthetic')
# timm train.py flags whose meaning differs in a detail: dest -> how
MEANING_DIFFERS: dict[str, str] = {
    'output': 'the run folder itself (timm: the parent of a dated run folder; --experiment names a sub-folder)',
}
# flags of this CLI that timm's train.py does not have (besides the DST group)
OWN_FLAGS = ('val_fraction', 'split_seed', 'test_split', 'synthetic_train_size', 'synthetic_test_size',
             'crop_padding', 'threads', 'stop_after_updates', 'no_progress', 'save_rank_masks', 'fsdp', 'fsdp_modules')


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (``timm-dst-train: error: ...``; no usage block of 180 flags) and exit 2."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message}\n')


# --------------------------------------------------------------------------------------------------------------------
# the parser, one group at a time (timm's groups, in timm's order)
def _dataset_group(p: argparse.ArgumentParser) -> None:
    p.add_argument('data', nargs='?', metavar='DIR', const=None, help='data folder (as --data-dir; timm\'s '
                   'positional form)')
    g = p.add_argument_group('Dataset')
    g.add_argument('--data-dir', metavar='DIR', default=None,
                   help='data set root (Fashion-MNIST: /usr/share/datasets/fashion-mnist when not given)')
    g.add_argument('--dataset', metavar='NAME', default='fashion_mnist',
                   help='fashion_mnist | cifar10 | cifar100 | folder ("" too) | synthetic | any name '
                        'timm.data.create_dataset knows (torch/..., hfds/...)')
    g.add_argument('--train-split', metavar='NAME', default='train', help='training split')
    g.add_argument('--val-split', metavar='NAME', default='validation',
                   help='validation split, used when the data set has it and --val-fraction is not given')
    g.add_argument('--train-num-samples', default=None, type=int, metavar='N', help='iterable data sets only')
    g.add_argument('--val-num-samples', default=None, type=int, metavar='N', help='iterable data sets only')
    g.add_argument('--dataset-download', action='store_true', default=False,
                   help='let torchvision / timm download the data set (needs network access)')
    g.add_argument('--class-map', default='', type=str, metavar='FILE', help='class map file (timm data sets)')
    g.add_argument('--input-img-mode', default=None, type=str, help='image mode (RGB, L; default from the channels)')
    g.add_argument('--input-key', default=None, type=str, help='image key of dict-like data sets')
    g.add_argument('--target-key', default=None, type=str, help='target key of dict-like data sets')
    g.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                   help='let a Hugging Face data set run its own code')
    g.add_argument('--test-split', metavar='NAME', default='test',
                   help='test split, reported at the end (CIFAR and Fashion-MNIST use their own test sets)')
    g.add_argument('--val-fraction', type=float, default=None,
                   help='hold out this fraction of the training set for validation (default: --val-split when the '
                        'data set has it, else 0.1)')
    g.add_argument('--split-seed', type=int, default=0, help='seed of the train / validation split')
    g.add_argument('--synthetic-train-size', type=int, default=512, help='synthetic data: training samples')
    g.add_argument('--synthetic-test-size', type=int, default=256, help='synthetic data: test samples')


def _model_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Model')
    g.add_argument('--model', default='itop_mlp', type=str, metavar='MODEL', help='any timm model name')
    g.add_argument('--pretrained', action='store_true', default=False, help='start from pretrained weights')
    g.add_argument('--pretrained-path', default=None, type=str, metavar='FILE',
                   help='local pretrained weights, loaded with head adaptation (implies --pretrained)')
    g.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='load these weights (timm or timm-dst checkpoint, state_dict, safetensors) before sparsifying')
    g.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='continue a run from its checkpoint (last.pth.tar, recovery-*.pth.tar) or run folder; a dense '
                        'timm checkpoint starts sparse training from its weights at its next epoch')
    g.add_argument('--no-resume-opt', action='store_true', default=False,
                   help='with --resume: fresh optimizer and AMP scaler state')
    g.add_argument('--num-classes', type=int, default=None, metavar='N', help='classes (default: from the data)')
    g.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type (model default if unset)')
    g.add_argument('--img-size', type=int, default=None, metavar='N',
                   help='image size (default: the data set\'s native size for known sets, else the model\'s)')
    g.add_argument('--in-chans', type=int, default=None, metavar='N', help='image channels (default: the data\'s)')
    g.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N', help='input C H W')
    g.add_argument('--crop-pct', default=None, type=float, metavar='N', help='evaluation centre-crop fraction')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='normalisation mean')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='normalisation std')
    g.add_argument('--interpolation', default='', type=str, metavar='NAME', help='resize interpolation')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                   help='evaluation batch size (default: --batch-size; 1024 for in-memory data)')
    g.add_argument('--channels-last', action='store_true', default=False, help='channels-last memory layout')
    g.add_argument('--fuser', default='', type=str, help='TorchScript JIT fuser')
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                   help='micro-batches per optimizer step (topology updates count optimizer steps)')
    g.add_argument('--grad-checkpointing', action='store_true', default=False, help='gradient checkpointing')
    g.add_argument('--fast-norm', action='store_true', default=False, help='timm\'s fast norm layers')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                   help='extra keyword arguments for timm.create_model (Python literals as in timm, else YAML)')
    g.add_argument('--head-init-scale', default=None, type=float, help='scale the classifier\'s initial weights')
    g.add_argument('--head-init-bias', default=None, type=float, help='initial classifier bias')
    g.add_argument('--torchcompile-mode', type=str, default=None, metavar='MODE', help='torch.compile mode')
    g.add_argument('--torchscript', action='store_true', default=False, help='TorchScript the model')
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND',
                   help='torch.compile the model (backend, default inductor)')


def _device_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Device & mixed precision')
    g.add_argument('--device', default='cuda', type=str, help='set by Accelerate (refused when changed)')
    g.add_argument('--amp', action='store_true', default=False,
                   help='mixed precision in --amp-dtype through Accelerate (without it: the launcher\'s setting)')
    g.add_argument('--amp-dtype', default='float16', choices=('bfloat16', 'float16'),
                   help='autocast dtype; bfloat16 also works on CPU')
    g.add_argument('--model-dtype', default=None, type=str, help='model dtype (float32 only)')
    g.add_argument('--no-ddp-bb', action='store_true', default=False, help='DDP without buffer broadcast')
    g.add_argument('--synchronize-step', action='store_true', default=False,
                   help='synchronize the device after each step (timing)')
    g.add_argument('--local_rank', default=0, type=int, help='set by launchers; Accelerate reads the environment')
    g.add_argument('--device-modules', default=None, type=str, nargs='+', help='modules to import for devices')
    g.add_argument('--fsdp', action='store_true', default=False,
                   help='shard the model with FSDP2 (fully_shard: each unit of --fsdp-modules, then the root) before '
                        'the optimizer and the sparsifier; checkpoints through torch.distributed.checkpoint (under '
                        'torchrun or accelerate launch; docs/distributed.md)')
    g.add_argument('--fsdp-modules', default=None, type=str, nargs='+', metavar='PATTERN',
                   help='with --fsdp: the modules to shard before the root, as dotted names (* matches one name, '
                        'e.g. blocks.* stages.*); default: the children of the model\'s blocks, stages or layers, or '
                        'its layer1, layer2, ... (ResNets)')


def _optimizer_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='momentum', type=str, metavar='OPTIMIZER',
                   help='timm optimizer name (momentum = SGD with momentum; sgd = Nesterov SGD in timm)')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum')
    g.add_argument('--weight-decay', type=float, default=5e-4, help='weight decay (not on biases / norms)')
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='gradient clipping (off if unset)')
    g.add_argument('--clip-mode', type=str, default='norm', choices=('norm', 'value', 'agc'), help='clipping mode')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
    g.add_argument('--layer-decay-min-scale', type=float, default=0, help='lower bound of the layer-decay scale')
    g.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                   help='layers whose layer-decay scale falls below this are frozen')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                   help='extra optimizer keyword arguments (Python literals as in timm, else YAML)')


def _schedule_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                   help='timm scheduler: cosine | step | multistep | plateau | poly | tanh | none ...')
    g.add_argument('--sched-on-updates', action='store_true', default=False,
                   help='step the schedule per optimizer update instead of per epoch')
    g.add_argument('--lr', type=float, default=None, metavar='LR',
                   help='learning rate (default: --lr-base scaled by the global batch size)')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR', help='lr at --lr-base-size samples a batch')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='batch size of --lr-base')
    g.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                   help='linear | sqrt (default: sqrt for Ada* / LAMB, else linear)')
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
    g.add_argument('--epoch-repeats', type=float, default=0., metavar='N', help='iterable data sets only')
    g.add_argument('--start-epoch', default=None, type=int, metavar='N', help='override the start epoch')
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                   help='epochs of the multistep decays')
    g.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval of step decays')
    g.add_argument('--warmup-epochs', type=int, default=0, metavar='N', help='linear warm-up epochs')
    g.add_argument('--warmup-prefix', action='store_true', default=False,
                   help='warm-up epochs come before the main schedule')
    g.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs at min lr at the end')
    g.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='plateau patience')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='lr decay factor')


def _augment_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Augmentation & regularization')
    g.add_argument('--no-aug', action='store_true', default=False, help='no training augmentation')
    g.add_argument('--train-crop-mode', type=str, default=None, help='training crop mode (rrc, rkrc, rkrr)')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                   help='random resized crop scale')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='random resized crop aspect ratio')
    g.add_argument('--crop-padding', type=int, default=None, metavar='PIXELS',
                   help='pad-and-random-crop instead of the random resized crop (default: 4 for CIFAR, else 0)')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--vflip', type=float, default=0.0, help='vertical flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter factor')
    g.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT', help='color jitter probability')
    g.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT', help='random grayscale probability')
    g.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT', help='gaussian blur probability')
    g.add_argument('--aa', type=str, default=None, metavar='NAME', help='AutoAugment / RandAugment policy')
    g.add_argument('--aug-repeats', type=float, default=0, help='repeated augmentation (refused)')
    g.add_argument('--aug-splits', type=int, default=0, help='AugMix splits (refused)')
    g.add_argument('--jsd-loss', action='store_true', default=False, help='AugMix JSD loss (refused)')
    g.add_argument('--bce-loss', action='store_true', default=False, help='binary cross-entropy loss')
    g.add_argument('--bce-sum', action='store_true', default=False, help='BCE: sum over classes')
    g.add_argument('--bce-target-thresh', type=float, default=None, help='BCE: binarise targets at this threshold')
    g.add_argument('--bce-pos-weight', type=float, default=None, help='BCE: positive weight')
    g.add_argument('--reprob', type=float, default=0.0, metavar='PCT', help='random erase probability')
    g.add_argument('--remode', type=str, default='pixel', help='random erase mode')
    g.add_argument('--recount', type=int, default=1, help='random erase count')
    g.add_argument('--resplit', action='store_true', default=False, help='no random erase on the first half')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (on when > 0)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (on when > 0)')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min / max ratio')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix when both are on')
    g.add_argument('--mixup-mode', type=str, default='batch', help='batch | pair | elem')
    g.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='mixup off from this epoch')
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    g.add_argument('--train-interpolation', type=str, default='random', help='training resize interpolation')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate (drop_rate)')
    g.add_argument('--drop-connect', type=float, default=None, metavar='PCT', help='old name of --drop-path')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate')
    g.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='drop block rate')


def _norm_ema_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Batch norm')
    g.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum')
    g.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon')
    g.add_argument('--sync-bn', action='store_true', default=False, help='synchronized BatchNorm (several processes)')
    g.add_argument('--dist-bn', type=str, default='reduce', help='BatchNorm statistics across processes after each '
                   'epoch: broadcast | reduce | "" (off)')
    g.add_argument('--split-bn', action='store_true', default=False, help='BatchNorm per AugMix split (refused)')
    g = p.add_argument_group('Model EMA')
    g.add_argument('--model-ema', action='store_true', default=False,
                   help='keep an EMA of the weights (timm ModelEmaV3); validation and the best checkpoint use it')
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='keep the EMA on the CPU')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay')
    g.add_argument('--model-ema-warmup', action='store_true', default=False, help='EMA decay warm-up')


def _misc_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Miscellaneous')
    g.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (ranks use seed + rank)')
    g.add_argument('--worker-seeding', type=str, default='all', help='data-loader worker seeding: all | part')
    g.add_argument('--log-interval', type=int, default=50, metavar='N', help='optimizer steps between log lines')
    g.add_argument('--val-interval', type=int, default=1, metavar='N', help='epochs between validations')
    g.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                   help='also write a recovery checkpoint every N optimizer steps inside an epoch')
    g.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='checkpoint-N files kept')
    g.add_argument('-j', '--workers', type=int, default=0, metavar='N',
                   help='data-loading worker processes (in-memory data sets always load in the main process)')
    g.add_argument('--save-images', action='store_true', default=False, help='save training batches as images')
    g.add_argument('--pin-mem', action='store_true', default=False, help='pin loader memory')
    g.add_argument('--no-prefetcher', action='store_true', default=False,
                   help='accepted: batches are always moved by Accelerate, never by timm\'s CUDA prefetcher')
    g.add_argument('--output', default='', type=str, metavar='PATH',
                   help='run folder (default ./output/train/<date-time>-<model>)')
    g.add_argument('--experiment', default='', type=str, metavar='NAME', help='sub-folder of --output')
    g.add_argument('--eval-metric', default='top1', type=str, choices=_EVAL_METRICS,
                   help='validation metric choosing the best checkpoint')
    g.add_argument('--tta', type=int, default=0, metavar='N', help='test-time augmentation factor (refused)')
    g.add_argument('--use-multi-epochs-loader', action='store_true', default=False,
                   help='timm\'s MultiEpochsDataLoader (refused)')
    g.add_argument('--log-wandb', action='store_true', default=False,
                   help='log to Weights & Biases through Accelerate\'s trackers (needs the wandb package)')
    g.add_argument('--wandb-project', default=None, type=str, help='wandb project (default: the model)')
    g.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    g.add_argument('--wandb-resume-id', default='', type=str, help='wandb run id to resume')
    g.add_argument('--threads', type=int, default=None, metavar='N',
                   help='intra-op CPU threads, torch.set_num_threads (1 is fastest for small models on a busy CPU)')
    g.add_argument('--stop-after-updates', type=int, default=None, metavar='N',
                   help='checkpoint and stop after N optimizer steps in total (continue with --resume)')
    g.add_argument('--no-progress', action='store_true', default=False, help='no progress bar')
    g.add_argument('--save-rank-masks', action='store_true', default=False,
                   help='each process writes its final masks and R_s to masks_rank<R>.pt')


def _scheduled_loader_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Scheduled / NaFlex loaders and distillation (refused)')
    g.add_argument('--train-img-sizes', type=int, nargs='+', default=None)
    g.add_argument('--train-batch-sizes', type=int, nargs='+', default=None)
    g.add_argument('--train-size-probs', type=float, nargs='+', default=None)
    g.add_argument('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'))
    g.add_argument('--train-size-schedule-spread', type=float, default=0.65)
    g.add_argument('--train-size-random-mix', type=float, default=0.1)
    g.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None)
    g.add_argument('--variable-batch-loss-scale', type=str, default='none', choices=('none', 'sqrt', 'linear'))
    g.add_argument('--naflex-loader', action='store_true', default=False)
    g.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024])
    g.add_argument('--naflex-max-seq-len', type=int, default=576)
    g.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None)
    g.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None)
    g.add_argument('--naflex-loss-scale', type=str, default='linear', choices=('none', 'sqrt', 'linear'))
    g.add_argument('--naflex-patchify-channels-first', action='store_true', default=False)
    g.add_argument('--kd-model-name', default=None, type=str)
    g.add_argument('--kd-distill-type', default='logit', type=str, choices=('logit', 'feature', 'token'))
    g.add_argument('--kd-loss-type', default='kl', type=str)
    g.add_argument('--distill-loss-weight', default=None, type=float)
    g.add_argument('--task-loss-weight', default=None, type=float)
    g.add_argument('--kd-temperature', default=4.0, type=float)
    g.add_argument('--kd-student-feature-dim', default=None, type=int)
    g.add_argument('--kd-teacher-feature-dim', default=None, type=int)
    g.add_argument('--kd-token-distill-type', default='soft', type=str, choices=('soft', 'hard'))
    for a in g._group_actions:
        a.help = f'refused: {REFUSED[a.dest]}'


def _dst_group(p: argparse.ArgumentParser) -> None:
    add_dst_args(p, default_method=DEFAULT_TRAIN_METHOD)  # --dst, the controller flags and the methods' own


def create_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The config parser (``-c``) and the main parser."""
    config_parser = argparse.ArgumentParser(description='Training config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config; its keys are the flag names (dashes or underscores); a timm '
                                    'train.py args.yaml is accepted')
    parser = _Parser(
        prog='timm-dst-train', description='Dynamic Sparse Training of timm models (Accelerate-launched)',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config; its keys are the flag names; a timm train.py args.yaml is accepted')
    for add in (_dataset_group, _model_group, _device_group, _optimizer_group, _schedule_group, _augment_group,
                _norm_ema_group, _dst_group, _misc_group, _scheduled_loader_group):
        add(parser)
    return config_parser, parser


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The flag values of a ``-c`` YAML file (dashes or underscores), each converted and checked like a flag."""
    cfg = read_yaml_config(path, parser.error) or {}
    if not isinstance(cfg, dict):
        parser.error(f'-c/--config {path}: expected a mapping of flag names to values, got {type(cfg).__name__}')
    # keys are dests or any long option name (sparse_init is --distribution)
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    for a in list(actions.values()):
        actions.update({o.lstrip('-').replace('-', '_'): a for o in a.option_strings if o.startswith('--')})
    out, unknown, keys = {}, [], {}
    for key, value in cfg.items():
        action = actions.get(str(key).lstrip('-').replace('-', '_'))
        if action is None:
            unknown.append(str(key))
            continue
        if action.dest in keys:  # batch-size and batch_size, or sparse_init and distribution
            flag = next((o for o in action.option_strings if o.startswith('--')), action.dest)
            parser.error(f'-c/--config {path}: keys {keys[action.dest]} and {key} both set {flag}; keep one')
        keys[action.dest] = key
        try:
            out[action.dest] = _coerce(action, value)
        except ValueError as e:
            parser.error(f'-c/--config {path}: key {key}: {value!r} is not accepted; expected {e}')
    if unknown:
        parser.error(f'unknown key(s) in config {path}: {", ".join(unknown)} (keys are the flag names, see --help)')
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags (and a ``-c`` YAML config, whose values the flags override); unknown flags or keys are errors."""
    config_parser, parser = create_parser()
    args_config, remaining = config_parser.parse_known_args(argv)
    config = _config_defaults(parser, args_config.config) if args_config.config else {}
    parser.set_defaults(**config)
    args = parser.parse_args(remaining)
    args.config = args_config.config
    apply_default_family(args, _given_on_command_line(remaining) | set(config), recipe='dst' in config)
    _validate(parser, args)
    return args


def _given_on_command_line(argv: list[str]) -> set[str]:
    """The dests that ``argv`` itself sets (not a default, not a config): parsed again with every default
    suppressed."""
    class Given(argparse.Namespace):
        def __getattr__(self, name: str) -> None:  # an unset flag reads None (ParseKwargs adds to what is there)
            if name.startswith('_'):
                raise AttributeError(name)
            return None

    _, probe = create_parser()
    for a in probe._actions:
        a.default = argparse.SUPPRESS
    return set(vars(probe.parse_known_args(argv, Given())[0]))


def apply_default_family(args: argparse.Namespace, given: set[str], recipe: bool = False) -> bool:
    """Give the flags of :data:`DEFAULTS_DIFFER` that neither the command line nor the config set timm's defaults
    (:data:`TIMM_DEFAULTS`) when data is given, as timm's train.py would; else keep the built-in ones.

    Data is given by the positional data folder, ``--data-dir`` or ``--dataset``, unless the data set is one of the
    built-in ones (Fashion-MNIST, synthetic). A timm-dst recipe (a ``-c`` config that sets ``dst``) keeps the built-in
    defaults for what it leaves out, so that the papers' recipes run as written whatever data folder is given.

    Args:
        args: The parsed flags, changed in place.
        given: The dests set on the command line or by the config.
        recipe: The config is a timm-dst recipe.

    Returns:
        Whether timm's defaults were applied.
    """
    named = 'dataset' in given
    if recipe or not (named or args.data or args.data_dir):
        return False
    dataset = args.dataset if named else TIMM_DEFAULTS['dataset']
    if normalize_dataset_name(dataset) in _BUILT_IN_DATA:
        return False
    for dest, value in TIMM_DEFAULTS.items():
        if dest not in given:
            setattr(args, dest, value)
    return True


# --------------------------------------------------------------------------------------------------------------------
# validation: cheap checks of everything that would otherwise fail later, each naming the flag and what is accepted
def _flag(dest: str) -> str:
    return '--' + dest.replace('_', '-')


def _defaults() -> dict[str, Any]:
    """The flags' own defaults (a ``-c`` config replaces the parser's: compare with these)."""
    return {a.dest: a.default for a in create_parser()[1]._actions}


def _check_refused(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    defaults = _defaults()
    given = [d for d in REFUSED if getattr(args, d) != defaults[d] and getattr(args, d) not in _REFUSED_OK.get(d, ())]
    if given:
        reasons: dict[str, list[str]] = {}
        for d in given:
            reasons.setdefault(REFUSED[d], []).append(_flag(d))
        parser.error('not supported by timm-dst-train: ' + '; '.join(f'{", ".join(f)}: {r}'
                                                                      for r, f in reasons.items()))


def _check_model_and_opt(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import timm
    from timm.optim import get_optimizer_info
    if not timm.is_model(args.model):
        close = timm.list_models(f'*{args.model.split(".")[0][:6]}*')[:10] if args.model else []
        hint = f'; similar names: {", ".join(close)}' if close else ''
        parser.error(f'--model {args.model!r} is not a timm model (see timm.list_models()){hint}')
    opt = args.opt.lower()
    base = opt.split('_', 1)[1] if opt.startswith('lookahead_') else opt
    try:
        get_optimizer_info(base)
    except ValueError:
        from timm.optim import list_optimizers
        parser.error(f'--opt {args.opt!r} is not a timm optimizer; accepted: {", ".join(list_optimizers())} '
                     '(optionally prefixed lookahead_)')


def _check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads {args.threads!r} must be >= 1')
    for dest in ('epochs', 'batch_size', 'grad_accum_steps', 'log_interval', 'val_interval', 'checkpoint_hist'):
        if getattr(args, dest) < 1:
            parser.error(f'{_flag(dest)} {getattr(args, dest)!r} must be >= 1')
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        parser.error(f'--val-fraction {args.val_fraction!r} must lie in [0, 1)')
    if args.lr is not None and args.lr < 0:
        parser.error(f'--lr {args.lr!r} must be >= 0')
    mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup and args.mixup_mode in ('batch', 'pair') and args.batch_size % 2:
        parser.error(f'-b/--batch-size {args.batch_size}: mixup / cutmix (--mixup-mode {args.mixup_mode}) mix pairs '
                     'of samples and need an even batch size')
    if args.mixup_mode not in ('batch', 'pair', 'elem'):
        parser.error(f'--mixup-mode {args.mixup_mode!r}: accepted: batch, pair, elem')
    if args.dist_bn not in ('broadcast', 'reduce', ''):
        parser.error(f'--dist-bn {args.dist_bn!r}: accepted: broadcast, reduce, "" (off)')
    if args.lr_base_scale not in ('', 'linear', 'sqrt'):
        parser.error(f'--lr-base-scale {args.lr_base_scale!r}: accepted: linear, sqrt')


def _check_fsdp(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What ``--fsdp`` cannot train yet, refused before anything is built."""
    from ..methods._registry import list_sharded_methods
    from .sharded import accelerate_fsdp_version
    version = accelerate_fsdp_version()
    if version is not None:  # accelerate launch --use_fsdp: shard (Accelerate's FSDP2 on GPUs, else --fsdp's own)
        if version != 2:
            parser.error(f'accelerate launch --use_fsdp --fsdp_version {version}: FSDP{version} (flat parameters) '
                         'cannot carry the sparse masks; launch with --fsdp_version 2 (FSDP2), or pass --fsdp')
        args.fsdp = True
    if args.fsdp_modules and not args.fsdp:
        parser.error('--fsdp-modules: only with --fsdp')
    if not args.fsdp:
        return
    supported = list_sharded_methods()
    if args.dst not in supported:
        parser.error(f'--dst {args.dst} with --fsdp: the method chooses its initial topology itself, which is not '
                     f'supported on a sharded model yet; with --fsdp: {", ".join(supported)}')
    refused = {'model_ema': 'EMA copies of a sharded model are not supported yet',
               'structure': 'structured sparsity on a sharded model is not supported yet',
               'torchcompile': 'torch.compile of a sharded sparse model is not supported yet',
               'sync_bn': 'SyncBatchNorm under FSDP2 is not supported',
               'channels_last': 'channels-last parameters are not supported by the sharded masks yet'}
    given = [d for d in refused if getattr(args, d, None)]
    if given:
        parser.error('with --fsdp: ' + '; '.join(f'{_flag(d)}: {refused[d]}' for d in given))


def _check_output(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    folder = output_dir(args)
    problem = writable_folder_problem(folder)
    if problem:
        given = f'--output {args.output}' if args.output else '--output (default: beside --resume, else output/train)'
        parser.error(f'{given}: cannot write the run folder {os.path.abspath(folder)}: {problem}; give a writable '
                     'folder')


def _check_files(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.pretrained_path and not os.path.isfile(args.pretrained_path):
        parser.error(f'--pretrained-path {args.pretrained_path!r}: no such file')
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        parser.error(f'--initial-checkpoint {args.initial_checkpoint!r}: no such file')
    phase = get_method_info(args.dst).dense_phase
    both_phases = phase is not None and not getattr(args, phase.trained_state_arg)
    if phase is not None:
        trained, rewind_state = (_flag(a) for a in (phase.trained_state_arg, phase.rewind_state_arg))
        step_flag, step = _flag(phase.rewind_step_arg), getattr(args, phase.rewind_step_arg)
        if step is not None and not both_phases:
            parser.error(f'{step_flag} is for --dst {args.dst} without {trained} (the CLI then trains the dense '
                         'phase itself and saves the rewind point)')
        if step is not None and step < 0:
            parser.error(f'{step_flag} {step!r} must be >= 0')
        if both_phases and getattr(args, phase.rewind_state_arg):
            parser.error(f'{rewind_state} needs {trained} (without it the CLI trains the dense phase and saves its '
                         f'own rewind point: see {step_flag})')
    if args.resume and both_phases:
        if not os.path.exists(args.resume):  # both phases: a run folder or either phase's checkpoint
            parser.error(f'--resume: {args.resume!r}: no such checkpoint file or run folder')
    elif args.resume:
        try:
            args.resume = resolve_resume(args.resume)
        except FileNotFoundError as e:
            parser.error(f'--resume: {e}')


def _resolve_aliases(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """timm's aliases and implied values: the positional data folder, --drop-connect, --pretrained-path."""
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if args.drop_connect is not None:
        if args.drop_path is not None and args.drop_path != args.drop_connect:
            parser.error('--drop-connect is the old name of --drop-path: give one of them')
        args.drop_path = args.drop_connect
    if args.pretrained_path and not args.pretrained:
        args.pretrained = True
    if args.log_wandb:
        import importlib.util
        if importlib.util.find_spec('wandb') is None:
            parser.error('--log-wandb needs the wandb package (pip install wandb)')
    for module in args.device_modules or ():
        import importlib
        try:
            importlib.import_module(module)
        except ImportError as e:
            parser.error(f'--device-modules {module}: cannot be imported ({e})')
    if args.fast_norm:
        from timm.layers import set_fast_norm
        set_fast_norm()


def _check_data_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that cannot act on the chosen data set are refused, not ignored."""
    name = normalize_dataset_name(args.dataset)
    if name in ('synthetic', 'fashion_mnist'):
        for dest in ('class_map', 'input_key', 'target_key'):
            if getattr(args, dest):
                parser.error(f'{_flag(dest)}: applies to timm data sets (folder, torch/..., hfds/...), not to '
                             f'--dataset {name}')


def synthetic_ignored(args: argparse.Namespace) -> list[str]:
    """The image-transform flags set away from their defaults that the synthetic (tensor) data set cannot apply (a
    run says so in a warning; recipes for image data run on synthetic stand-ins in the tests)."""
    defaults = _defaults()
    return [_flag(d) for d in ('aa', 'reprob', 'color_jitter_prob', 'grayscale_prob', 'gaussian_blur_prob',
                               'train_crop_mode', 'crop_padding', 'input_img_mode')
            if getattr(args, d) != defaults[d]]


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_refused(parser, args)
    _resolve_aliases(parser, args)
    _check_model_and_opt(parser, args)
    validate_dst_args(args, parser.error)
    _check_ranges(parser, args)
    _check_fsdp(parser, args)
    _check_data_flags(parser, args)
    _check_files(parser, args)
    _check_output(parser, args)
    try:
        check_dataset(args.dataset, args.data_dir, args.dataset_download, args.train_split)
    except FileNotFoundError as e:
        parser.error(str(e))


def flag_status(action: argparse.Action) -> str:
    """How a flag relates to timm's train.py: ``as timm``, ``as timm, default ...``, ``DST``, ``timm-dst-train``, or
    ``refused: why`` (docs/cli.md's table)."""
    if action.dest in REFUSED:
        return f'refused: {REFUSED[action.dest]}'
    probe = argparse.ArgumentParser(add_help=False)
    if action.dest in {a.dest for a in _add(probe)._group_actions}:
        return 'DST'
    if action.dest in OWN_FLAGS:
        return 'timm-dst-train'
    if action.dest in DEFAULTS_DIFFER:
        return f'as timm; default: {DEFAULTS_DIFFER[action.dest]}'
    if action.dest in MEANING_DIFFERS:
        return f'as timm, except: {MEANING_DIFFERS[action.dest]}'
    return 'as timm'


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


def output_dir(args: argparse.Namespace) -> str:
    """``--output`` is the run folder itself (timm adds a dated sub-folder; recipes and sweeps name their folders)."""
    if args.output:
        out = args.output
    elif args.resume:
        out = os.path.dirname(os.path.abspath(args.resume))
    else:
        from timm.models import safe_model_name
        out = os.path.join('output', 'train', f'{datetime.now().strftime("%Y%m%d-%H%M%S")}-'
                                              f'{safe_model_name(args.model)}')
    if args.experiment:
        out = os.path.join(out, args.experiment)
    return out


def user_error(message: str) -> SystemExit:
    """A user error found while building the run: one line on stderr, exit status 2 (as argparse's)."""
    print(f'timm-dst-train: error: {message}', file=sys.stderr, flush=True)
    return SystemExit(2)
