"""Data for the training CLI, through timm's data pipeline.

Data sets come from ``timm.data.create_dataset`` (image folders, ``torch/cifar10`` ... and every other name timm
knows), except Fashion-MNIST, read from the Debian package's idx files (torchvision's reader wants its own download
layout), and a synthetic set for smoke runs. Transforms and loaders are timm's ``create_loader`` (which builds
``create_transform``) with the data config of ``resolve_data_config``; mixup / cutmix is timm's ``Mixup``.

Validation: the data set's ``--val-split`` when it has one, else ``--val-fraction`` of the training set held out
with a fixed permutation (the ITOP paper holds out 10%); the official test split is kept apart and only reported.

In-memory data (Fashion-MNIST, synthetic) keep one fast path: when the transform timm would apply is only
``ToTensor + Normalize`` (no augmentation and the native size), whole batches are gathered and normalised in one
tensor operation, with the same result (``tests/test_cli_data.py`` checks it against timm's transform).
"""
from __future__ import annotations

import gzip
import logging
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..core._seeding import derived_generator

__all__ = [
    'DATASETS', 'FASHION_MNIST_DIR', 'DataInfo', 'DataSplits', 'SplitView', 'read_idx', 'check_dataset', 'collate',
    'open_datasets', 'data_config_args', 'create_loaders', 'create_mixup', 'normalize_dataset_name',
    'describe_sizes',
]

_logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


@dataclass(frozen=True)
class _Known:
    """A data set the CLI knows: native input size, classes and its own normalisation (used unless --mean / --std;
    its images are used at their native size with no centre crop unless --img-size / --crop-pct say otherwise)."""

    input_size: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    crop_padding: int = 0


_KNOWN = {
    'fashion_mnist': _Known((1, 28, 28), 10, (0.2860,), (0.3530,)),
    'cifar10': _Known((3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), crop_padding=4),
    'cifar100': _Known((3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), crop_padding=4),
}

_ALIASES = {
    'fashion_mnist': 'fashion_mnist', 'fashion-mnist': 'fashion_mnist', 'fashionmnist': 'fashion_mnist',
    'fmnist': 'fashion_mnist', 'torch/fashion_mnist': 'fashion_mnist', 'torch/fashionmnist': 'fashion_mnist',
    'cifar10': 'cifar10', 'cifar-10': 'cifar10', 'torch/cifar10': 'cifar10',
    'cifar100': 'cifar100', 'cifar-100': 'cifar100', 'torch/cifar100': 'cifar100',
    'synthetic': 'synthetic', '': 'folder', 'folder': 'folder', 'imagefolder': 'folder',
}
#: Names accepted by ``--dataset`` (anything else is handed to timm's ``create_dataset``).
DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'folder', 'synthetic')

_FMNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_CIFAR_DIRS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}
_CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar.html'


@dataclass
class DataInfo:
    """What the model and the data config need to know about a data set (native values; flags override them)."""

    name: str
    num_classes: int
    in_chans: int
    img_size: tuple[int, int]
    mean: tuple[float, ...] | None = None  # None: the model's pretrained config (timm's default)
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    crop_padding: int = 0
    train_size: int = 0
    val_size: int = 0
    test_size: int = 0
    val_source: str = ''


@dataclass
class DataSplits:
    """Untransformed train / validation / test views (transforms are set by :func:`create_loaders`)."""

    train: SplitView
    val: SplitView | None
    test: SplitView | None
    info: DataInfo
    extra: dict[str, Any] = field(default_factory=dict)


def normalize_dataset_name(name: str | None) -> str:
    """Canonical ``--dataset`` name (unknown names are returned unchanged for timm's ``create_dataset``)."""
    name = (name or '').strip()
    return _ALIASES.get(name.lower(), name)


# ----------------------------------------------------------------------------------------------------------------
# readers
def _find_file(root: str, stem: str) -> str | None:
    for cand in (stem + '.gz', stem, stem.replace('-idx', '.idx') + '.gz', stem.replace('-idx', '.idx')):
        for folder in (root, os.path.join(root, 'FashionMNIST', 'raw')):
            path = os.path.join(folder, cand)
            if os.path.isfile(path):
                return path
    return None


def read_idx(path: str) -> torch.Tensor:
    """Read an idx file (optionally gzip-compressed) into a uint8 tensor of its stored shape.

    Args:
        path: ``*-idx?-ubyte`` or ``*-idx?-ubyte.gz``.

    Raises:
        ValueError: When the file is not a uint8 idx file.
    """
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f'{path}: not a uint8 idx file (magic {data[:4].hex()})')
    shape = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = math.prod(shape)
    if len(data) - offset != count:
        raise ValueError(f'{path}: {len(data) - offset} bytes of data for shape {shape}; the file is truncated')
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).view(*shape)


class _IdxImages(Dataset):
    """uint8 images (N, H, W) held in memory, served as PIL images (for timm's transforms) or gathered whole."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mode: str = 'L'):
        self.images, self.targets, self.mode = images, targets.long(), mode

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image
        img = Image.fromarray(self.images[index].numpy(), mode='L')
        if self.mode != 'L':
            img = img.convert(self.mode)
        return img, int(self.targets[index])

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images scaled to [0, 1] as one float (N, C, H, W) tensor (what ``ToTensor`` gives per sample)."""
        imgs = self.images.index_select(0, idx).unsqueeze(1).float().div_(255.0)
        if self.mode == 'RGB':
            imgs = imgs.expand(-1, 3, -1, -1)
        return imgs, self.targets.index_select(0, idx)


class _TensorSamples(Dataset):
    """Float samples (N, C, H, W) held in memory (the synthetic set: no image transforms apply)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.index_select(0, idx), self.targets.index_select(0, idx)


class SplitView(Dataset):
    """A split of a base data set (all of it, or ``indices``) with its own transform.

    The base yields untransformed samples; timm's ``create_loader`` sets ``transform`` here. ``pre_transform`` runs
    first (CIFAR's pad-and-crop). With ``fast_norm = (mean, std)`` and a base that can ``gather``, a batch is gathered
    and normalised in one operation (used only where timm's transform would be ``ToTensor + Normalize``).
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None = None, tensors: bool = False):
        self.base = base
        self.indices = list(indices) if indices is not None else None
        self.tensors = tensors  # samples are tensors already: no image transforms
        self.transform: Callable | None = None
        self.pre_transform: Callable | None = None
        self.fast_norm: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)

    def _index(self, i: int) -> int:
        return self.indices[i] if self.indices is not None else i

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, target = self.base[self._index(i)]
        if self.tensors or self.fast_norm is not None:
            if not torch.is_tensor(img):
                from torchvision.transforms.functional import pil_to_tensor
                img = pil_to_tensor(img).float().div_(255.0)
            if self.fast_norm is not None:
                img = (img - self.fast_norm[0][0]) / self.fast_norm[1][0]
            return img, target
        if self.pre_transform is not None:
            img = self.pre_transform(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def __getitems__(self, indices: list[int]) -> Any:
        if self.fast_norm is None or not hasattr(self.base, 'gather'):
            return [self[i] for i in indices]
        idx = torch.as_tensor([self._index(i) for i in indices], dtype=torch.long)
        imgs, targets = self.base.gather(idx)
        mean, std = self.fast_norm
        return _Batch((torch.addcmul(-mean / std, imgs, 1.0 / std), targets))


class _Batch(tuple):
    """A batch already collated by :meth:`SplitView.__getitems__` (passed through by :func:`collate`)."""


def collate(data: Any) -> Any:
    """``default_collate``, except for batches gathered whole by an in-memory view (returned as they are)."""
    if isinstance(data, _Batch):
        return tuple(data)
    from torch.utils.data import default_collate
    return default_collate(data)


def _synthetic(num_samples: int, num_classes: int, shape: tuple[int, int, int], seed: int,
               prototype_seed: int = 1234) -> _TensorSamples:
    """A learnable synthetic set: one Gaussian prototype per class (from ``prototype_seed``) plus unit noise drawn
    from ``seed``; identical on every rank. Both streams are mixed from their seeds (:func:`derive_seed`), so that
    they never replay the stream a user's ``--seed`` feeds into the model's initialisation."""
    prototypes = torch.randn((num_classes, *shape), generator=derived_generator(prototype_seed, 'synthetic-prototypes'))
    g = derived_generator(seed, 'synthetic-samples')
    targets = torch.randint(0, num_classes, (num_samples,), generator=g)
    images = prototypes[targets] + torch.randn((num_samples, *shape), generator=g)
    return _TensorSamples(images, targets)


# ----------------------------------------------------------------------------------------------------------------
# checks (cheap, before any work)
def _fmnist_dir(data_dir: str | None) -> str:
    return data_dir or FASHION_MNIST_DIR


def check_dataset(name: str, data_dir: str | None, download: bool = False, train_split: str = 'train') -> None:
    """Fail early, with how to get it, when a data set is not where it should be.

    Raises:
        FileNotFoundError: The data set is missing; the message says how to install or download it.
    """
    name = normalize_dataset_name(name)
    if name == 'synthetic':
        return
    if name == 'fashion_mnist':
        root = _fmnist_dir(data_dir)
        missing = [s for files in _FMNIST_FILES.values() for s in files if _find_file(root, s) is None]
        if missing:
            raise FileNotFoundError(
                f'Fashion-MNIST not found in {root} (missing {", ".join(m + "[.gz]" for m in missing)}). '
                'Install the Debian package: `sudo apt-get update && sudo apt-get install dataset-fashion-mnist` '
                f'(its idx files land in {FASHION_MNIST_DIR}), or pass --data-dir to a folder holding the idx files.')
        return
    if name in _CIFAR_DIRS:
        if download:
            return
        folder = os.path.join(data_dir or '', _CIFAR_DIRS[name])
        if not data_dir or not os.path.isdir(folder):
            where = data_dir if data_dir else '(no --data-dir given)'
            raise FileNotFoundError(
                f'{name.upper()} not found in {where}: expected the folder {_CIFAR_DIRS[name]}/ from the python '
                f'version of the data set. Download it from {_CIFAR_URL} and extract it into --data-dir, '
                'or add --dataset-download to let torchvision fetch it (needs network access).')
        return
    if name == 'folder':
        if not data_dir or not os.path.isdir(data_dir):
            raise FileNotFoundError(
                f'--dataset folder needs --data-dir (or the positional data folder) pointing to an ImageFolder root '
                f'(with {train_split}/<class>/*.jpg and optionally validation/ and test/); got {data_dir!r}')
        if not os.path.isdir(os.path.join(data_dir, train_split)):
            raise FileNotFoundError(f'no {train_split}/ folder in {data_dir}: an ImageFolder root holds '
                                    f'{train_split}/<class>/<images> (and optionally validation/ and test/)')
        return
    if not data_dir and not download:
        raise FileNotFoundError(f'--dataset {name!r} is passed to timm.data.create_dataset and needs --data-dir '
                                f'(or --dataset-download); known names: {", ".join(DATASETS)}')


# ----------------------------------------------------------------------------------------------------------------
# data sets
def _split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=derived_generator(seed, 'validation-split')).tolist()
    n_val = int(round(fraction * n))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _num_classes(ds: Any) -> int:
    if hasattr(ds, 'classes'):
        return len(ds.classes)
    reader = getattr(ds, 'reader', None)
    if reader is not None and hasattr(reader, 'class_to_idx'):
        return len(reader.class_to_idx)
    raise ValueError('could not infer the number of classes from the data set: pass --num-classes')


def _has_folder_split(root: str | None, split: str) -> bool:
    from timm.data.dataset_factory import _search_split
    if not root or not split:
        return False
    return os.path.abspath(_search_split(root, split)) != os.path.abspath(root)


def _img_mode(args: Any, native_chans: int) -> str:
    if getattr(args, 'input_img_mode', None):
        return args.input_img_mode
    chans = args.input_size[0] if args.input_size else (args.in_chans or native_chans)
    return 'RGB' if chans == 3 else 'L'


def _timm_dataset(ds_name: str, args: Any, split: str, is_training: bool, mode: str, num_samples: int | None = None):
    from timm.data import create_dataset
    ds = create_dataset(
        ds_name, root=args.data_dir, split=split, is_training=is_training, class_map=args.class_map,
        download=args.dataset_download, batch_size=args.batch_size, seed=args.seed, input_img_mode=mode,
        input_key=args.input_key, target_key=args.target_key, num_samples=num_samples,
        trust_remote_code=args.dataset_trust_remote_code)
    if isinstance(ds, torch.utils.data.IterableDataset):
        raise ValueError(f'--dataset {args.dataset!r} is an iterable (streaming) data set; timm-dst-train needs '
                         'map-style data (a folder, torch/*, hfds/*) for its exact-resume data order')
    ds.transform = None
    return ds


def open_datasets(args: Any) -> DataSplits:
    """Train / validation / test views (untransformed) and the :class:`DataInfo` of the parsed CLI ``args``."""
    name = normalize_dataset_name(args.dataset)
    check_dataset(name, args.data_dir, args.dataset_download, args.train_split)
    known = _KNOWN.get(name)
    tensors = False
    val_base = None
    if name == 'fashion_mnist':
        root = _fmnist_dir(args.data_dir)
        arrays = {s: (read_idx(_find_file(root, i)), read_idx(_find_file(root, t)))
                  for s, (i, t) in _FMNIST_FILES.items()}
        mode = _img_mode(args, 1)
        base, test_base = _IdxImages(*arrays['train'], mode=mode), _IdxImages(*arrays['test'], mode=mode)
        info = DataInfo(name, known.num_classes, *_native(known))
    elif name == 'synthetic':
        shape = _synthetic_shape(args)
        n_cls = args.num_classes or 10
        base = _synthetic(args.synthetic_train_size, n_cls, shape, seed=1)
        test_base = _synthetic(args.synthetic_test_size, n_cls, shape, seed=2)
        info = DataInfo(name, n_cls, shape[0], tuple(shape[1:]), (0.0,) * shape[0], (1.0,) * shape[0], 1.0)
        tensors = True
    else:
        mode = _img_mode(args, known.input_size[0] if known else 3)
        if name in _CIFAR_DIRS:
            ds_name, test_split = f'torch/{name}', 'test'
        else:
            ds_name, test_split = ('' if name == 'folder' else name), args.test_split
        base = _timm_dataset(ds_name, args, args.train_split, True, mode, args.train_num_samples)
        test_base = None
        if name in _CIFAR_DIRS or (name != 'folder' and test_split) or _has_folder_split(args.data_dir, test_split):
            try:
                test_base = _timm_dataset(ds_name, args, test_split, False, mode)
            except Exception as e:  # a data set without a test split is fine: only validation is reported
                _logger.warning('no test split %r (%s): test accuracy will not be reported', test_split, e)
        if args.val_fraction is None and args.val_split and name not in _CIFAR_DIRS and (
                name != 'folder' or _has_folder_split(args.data_dir, args.val_split)):
            val_base = _timm_dataset(ds_name, args, args.val_split, False, mode, args.val_num_samples)
        if known is not None:
            info = DataInfo(name, known.num_classes, *_native(known))
        else:
            info = DataInfo(name, _num_classes(base), 3 if mode == 'RGB' else 1, (224, 224))
    if args.num_classes:
        info.num_classes = args.num_classes

    if val_base is not None:
        train, val = SplitView(base, tensors=tensors), SplitView(val_base, tensors=tensors)
        info.val_source = f'split {args.val_split!r}'
    else:
        fraction = 0.1 if args.val_fraction is None else args.val_fraction
        train_idx, val_idx = _split_indices(len(base), fraction, args.split_seed)
        train = SplitView(base, train_idx, tensors=tensors)
        val = SplitView(base, val_idx, tensors=tensors) if val_idx else None
        info.val_source = f'{fraction:g} of the training set' if val_idx else 'none'
    test = SplitView(test_base, tensors=tensors) if test_base is not None else None
    info.train_size, info.val_size = len(train), len(val) if val is not None else 0
    info.test_size = len(test) if test is not None else 0
    return DataSplits(train, val, test, info)


def _native(known: _Known) -> tuple:
    return (known.input_size[0], tuple(known.input_size[1:]), known.mean, known.std, known.crop_pct,
            known.crop_padding)


def _synthetic_shape(args: Any) -> tuple[int, int, int]:
    if args.input_size:
        c, h, w = args.input_size
        return int(c), int(h), int(w)
    size = args.img_size or 32
    return int(args.in_chans or 3), int(size), int(size)


# ----------------------------------------------------------------------------------------------------------------
# data config, transforms, loaders
def data_config_args(args: Any, info: DataInfo) -> dict[str, Any]:
    """The ``args`` of ``timm.data.resolve_data_config``: the flags, with a known data set's native size and
    normalisation standing in for the model's pretrained config where no flag is given."""
    cfg = {k: getattr(args, k, None) for k in ('in_chans', 'input_size', 'img_size', 'mean', 'std', 'crop_pct',
                                               'crop_mode', 'interpolation')}
    native = info.name in _KNOWN or info.name == 'synthetic'
    if cfg['in_chans'] is None and not cfg['input_size']:
        cfg['in_chans'] = info.in_chans if native or info.in_chans != 3 else None
    if native:
        if not cfg['input_size'] and not cfg['img_size']:
            chans = cfg['in_chans'] or info.in_chans
            cfg['input_size'] = (chans, *info.img_size)
        if cfg['mean'] is None and info.mean is not None:
            cfg['mean'] = info.mean if len(info.mean) > 1 or not cfg.get('in_chans') else info.mean
        if cfg['std'] is None and info.std is not None:
            cfg['std'] = info.std
        if cfg['crop_pct'] is None and info.crop_pct is not None:
            cfg['crop_pct'] = info.crop_pct
    chans = cfg['input_size'][0] if cfg['input_size'] else (cfg['in_chans'] or 3)
    for key in ('mean', 'std'):  # a 3-channel normalisation for 1 channel and back, as timm's eval script does
        v = cfg[key]
        if v is not None and len(v) not in (1, chans):
            cfg[key] = (sum(v) / len(v),) if chans == 1 else None
    return cfg


def _fast_ok(view: SplitView, data_config: dict[str, Any], is_training: bool, args: Any, info: DataInfo) -> bool:
    """Whether timm's transform of this view is ``ToTensor + Normalize`` (no resize, crop or augmentation)."""
    if view.tensors:
        return True
    if not hasattr(view.base, 'gather') or tuple(data_config['input_size'][1:]) != tuple(info.img_size):
        return False
    if is_training:
        return bool(args.no_aug)
    return data_config.get('crop_pct') == 1.0 and data_config.get('crop_mode') in (None, 'center')


def create_mixup(args: Any, num_classes: int):
    """timm's ``Mixup`` for ``--mixup`` / ``--cutmix`` / ``--cutmix-minmax`` (None when inactive)."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def create_loaders(splits: DataSplits, data_config: dict[str, Any], args: Any,
                   eval_batch_size: int) -> tuple[DataLoader, DataLoader | None, DataLoader | None]:
    """Training, validation and test loaders from timm's ``create_loader`` (single-process loaders: Accelerate
    shards their batches and seeds the training order by ``--seed`` and epoch)."""
    from timm.data import create_loader
    info = splits.info
    interp = data_config['interpolation']
    train_interp = interp if (args.no_aug or not args.train_interpolation) else args.train_interpolation
    common = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                  pin_memory=args.pin_mem, use_prefetcher=False, distributed=False, collate_fn=collate,
                  worker_seeding=args.worker_seeding)

    def _workers(view: SplitView) -> int:
        return 0 if (view.fast_norm is not None or view.tensors) else args.workers

    def _mark(view: SplitView, is_training: bool) -> None:
        view.fast_norm = None
        if _fast_ok(view, data_config, is_training, args, info):
            c = data_config['input_size'][0]
            mean = torch.tensor(data_config['mean'], dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
            std = torch.tensor(data_config['std'], dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
            view.fast_norm = (mean.clone(), std.clone())

    train = splits.train
    _mark(train, True)
    pad = _crop_padding(args, info)
    scale, ratio = args.scale, args.ratio
    if pad and not args.no_aug and not train.tensors:
        from torchvision import transforms as T
        train.pre_transform = T.RandomCrop(tuple(data_config['input_size'][1:]), padding=pad)
        scale, ratio = (1.0, 1.0), (1.0, 1.0)  # timm's random-resized crop then keeps the whole padded crop
    train_loader = create_loader(
        train, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, re_split=args.resplit, train_crop_mode=args.train_crop_mode,
        scale=scale, ratio=ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_splits=0,
        interpolation=train_interp, num_workers=_workers(train), **common)
    loaders: list[DataLoader | None] = [train_loader]
    for view in (splits.val, splits.test):
        if view is None:
            loaders.append(None)
            continue
        _mark(view, False)
        loaders.append(create_loader(
            view, batch_size=eval_batch_size, is_training=False, interpolation=interp,
            crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), num_workers=_workers(view),
            **common))
    return loaders[0], loaders[1], loaders[2]


def _crop_padding(args: Any, info: DataInfo) -> int:
    return info.crop_padding if args.crop_padding is None else args.crop_padding


def describe_sizes(info: DataInfo) -> str:
    return (f'{info.name}: train {info.train_size}, validation {info.val_size} ({info.val_source}), '
            f'test {info.test_size}')
