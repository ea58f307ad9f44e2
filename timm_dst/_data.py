"""Data for the training CLI: Fashion-MNIST (Debian idx files), CIFAR-10/100, image folders, a synthetic set.

A validation split is carved out of the training set with a fixed permutation (the ITOP paper holds out 10%);
the official test split is kept apart and only reported.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, Subset

__all__ = [
    'DATASETS', 'FASHION_MNIST_DIR', 'DataInfo', 'EpochSampler', 'TensorImageDataset', 'read_idx', 'check_dataset',
    'collate', 'create_datasets', 'create_loader', 'in_memory', 'normalize_dataset_name',
]

_logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

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
    """What the model and transforms need to know about a data set."""

    name: str
    num_classes: int
    in_chans: int
    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int = 0
    val_size: int = 0
    test_size: int = 0


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
    count = 1
    for s in shape:
        count *= s
    if len(data) - offset != count:
        raise ValueError(f'{path}: {len(data) - offset} bytes of data for shape {shape}; the file is truncated')
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).view(*shape)


class TensorImageDataset(Dataset):
    """Images held in one tensor (N, C, H, W), uint8 (scaled to [0, 1]) or float, with an optional transform.

    Args:
        images: The images.
        targets: Class indices (N,).
        transform: Applied to each (C, H, W) float image.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Callable | None = None):
        if images.ndim == 3:
            images = images.unsqueeze(1)
        self.images = images
        self.targets = targets.long()
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]
        img = img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def __getitems__(self, indices: list[int]) -> Any:
        """A whole batch in one gather: ``(images, targets)`` when the transform is a plain normalisation (done on the
        batch), else the list of samples (per-sample transforms, e.g. random crops, differ between samples)."""
        if self.transform is not None and not isinstance(self.transform, _Normalize):
            return [self[i] for i in indices]
        idx = torch.as_tensor(indices, dtype=torch.long)
        imgs = self.images.index_select(0, idx).float()
        scale = 1.0 / 255.0 if self.images.dtype == torch.uint8 else 1.0
        if self.transform is not None:
            imgs = self.transform.batch(imgs, scale)
        elif scale != 1.0:
            imgs.mul_(scale)
        return _Batch((imgs, self.targets.index_select(0, idx)))


class _Batch(tuple):
    """A batch already collated by :meth:`TensorImageDataset.__getitems__` (passed through by :func:`collate`)."""


def collate(data: Any) -> Any:
    """``default_collate``, except for batches gathered whole by a tensor data set (returned as they are)."""
    if isinstance(data, _Batch):
        return tuple(data)
    from torch.utils.data import default_collate
    return default_collate(data)


def _synthetic(num_samples: int, num_classes: int, shape: tuple[int, int, int], seed: int,
               prototype_seed: int = 1234) -> TensorImageDataset:
    """A learnable synthetic set: one Gaussian prototype per class (from ``prototype_seed``) plus unit noise drawn
    from ``seed``; identical on every rank."""
    prototypes = torch.randn((num_classes, *shape), generator=torch.Generator().manual_seed(prototype_seed))
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, num_classes, (num_samples,), generator=g)
    images = prototypes[targets] + torch.randn((num_samples, *shape), generator=g)
    return TensorImageDataset(images, targets)


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
                f'--dataset folder needs --data-dir pointing to an ImageFolder root (with {train_split}/<class>/'
                f'*.jpg and optionally test/ or val/); got {data_dir!r}')
        if not os.path.isdir(os.path.join(data_dir, train_split)):
            raise FileNotFoundError(f'no {train_split}/ folder in {data_dir}: an ImageFolder root holds '
                                    f'{train_split}/<class>/<images> (and optionally test/ or val/)')
        return
    if not data_dir and not download:
        raise FileNotFoundError(f'--dataset {name!r} is passed to timm.data.create_dataset and needs --data-dir '
                                f'(or --dataset-download); known names: {", ".join(DATASETS)}')


# ----------------------------------------------------------------------------------------------------------------
# transforms
def _tensor_transform(info: DataInfo, is_training: bool, args: Any) -> Callable:
    from torchvision.transforms import v2
    ops: list[Callable] = []
    if is_training and not args.no_aug and info.name != 'synthetic':  # synthetic prototypes are not flip-invariant
        pad = args.crop_padding or 0
        if pad > 0:
            ops.append(v2.RandomCrop(info.img_size, padding=pad))
        if args.hflip > 0:
            ops.append(v2.RandomHorizontalFlip(args.hflip))
        if args.vflip > 0:
            ops.append(v2.RandomVerticalFlip(args.vflip))
    ops.append(_Normalize(info.mean, info.std))
    return v2.Compose(ops) if len(ops) > 1 else ops[0]


class _Normalize:
    """``(img - mean) / std`` on a float (C, H, W) tensor (cheaper per sample than torchvision's dispatch)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.mean) / self.std

    def batch(self, imgs: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``(imgs * scale - mean) / std`` of a float (N, C, H, W) batch, in one fused op."""
        return torch.addcmul(-self.mean / self.std, imgs, scale / self.std)


def _pil_transform(info: DataInfo, is_training: bool, args: Any) -> Callable:
    from timm.data import create_transform
    from torchvision import transforms as T
    pad = args.crop_padding or 0
    if pad > 0 or (not is_training and info.name in _CIFAR_DIRS):
        # the CIFAR recipe of the papers: pad-and-crop plus flips, no resizing
        ops: list[Callable] = []
        if is_training and not args.no_aug:
            ops += [T.RandomCrop(info.img_size, padding=pad)]
            if args.hflip > 0:
                ops.append(T.RandomHorizontalFlip(args.hflip))
            if args.vflip > 0:
                ops.append(T.RandomVerticalFlip(args.vflip))
        ops += [T.ToTensor(), T.Normalize(info.mean, info.std)]
        return T.Compose(ops)
    return create_transform(
        input_size=(info.in_chans, *info.img_size), is_training=is_training, no_aug=args.no_aug,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, interpolation=args.interpolation or 'bilinear', mean=info.mean, std=info.std,
        crop_pct=args.crop_pct, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)


# ----------------------------------------------------------------------------------------------------------------
# data sets
def _split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f'--val-fraction={fraction!r} must lie in [0, 1)')
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(fraction * n))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _with_transform(ds: Dataset, transform: Callable) -> Dataset:
    if isinstance(ds, TensorImageDataset):
        return TensorImageDataset(ds.images, ds.targets, transform)
    ds.transform = transform
    return ds


def _num_classes(ds: Any) -> int:
    for attr in ('classes',):
        if hasattr(ds, attr):
            return len(getattr(ds, attr))
    reader = getattr(ds, 'reader', None)
    if reader is not None and hasattr(reader, 'class_to_idx'):
        return len(reader.class_to_idx)
    raise ValueError('could not infer the number of classes from the data set: pass --num-classes')


def create_datasets(args: Any) -> tuple[Dataset, Dataset | None, Dataset | None, DataInfo]:
    """Train / validation / test data sets and their :class:`DataInfo` for the parsed CLI ``args``.

    The validation set is ``--val-fraction`` of the training set (fixed permutation seeded by ``--split-seed``),
    with evaluation transforms; the test set is the data set's own test split (None when there is none).
    """
    name = normalize_dataset_name(args.dataset)
    check_dataset(name, args.data_dir, args.dataset_download, args.train_split)
    mean, std = args.mean, args.std

    def _info(n_cls, chans, size, m, s) -> DataInfo:
        return DataInfo(name, args.num_classes or n_cls, chans, size, tuple(mean or m), tuple(std or s))

    pil = False
    if name == 'fashion_mnist':
        root = _fmnist_dir(args.data_dir)
        arrays = {}
        for split, (img_f, lbl_f) in _FMNIST_FILES.items():
            arrays[split] = (read_idx(_find_file(root, img_f)), read_idx(_find_file(root, lbl_f)))
        base = TensorImageDataset(*arrays['train'])
        test_base: Dataset | None = TensorImageDataset(*arrays['test'])
        info = _info(10, 1, (28, 28), FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    elif name == 'synthetic':
        shape = _synthetic_shape(args)
        n_cls = args.num_classes or 10
        base = _synthetic(args.synthetic_train_size, n_cls, shape, seed=1)
        test_base = _synthetic(args.synthetic_test_size, n_cls, shape, seed=2)
        info = _info(n_cls, shape[0], tuple(shape[1:]), (0.0,) * shape[0], (1.0,) * shape[0])
    else:
        from timm.data import create_dataset
        pil = True
        if name in _CIFAR_DIRS:
            ds_name, test_split = f'torch/{name}', 'test'
        else:
            ds_name, test_split = ('' if name == 'folder' else name), args.test_split
        base = create_dataset(ds_name, root=args.data_dir, split=args.train_split, is_training=True,
                              download=args.dataset_download)
        test_base = None
        if name in _CIFAR_DIRS or _has_split(args.data_dir, test_split, name):
            try:
                test_base = create_dataset(ds_name, root=args.data_dir, split=test_split, is_training=False,
                                           download=args.dataset_download)
            except Exception as e:  # a data set without a test split is fine: only validation is reported
                _logger.warning('no test split %r (%s): test accuracy will not be reported', test_split, e)
        n_cls = _num_classes(base)
        if name == 'cifar10':
            info = _info(n_cls, 3, (32, 32), CIFAR10_MEAN, CIFAR10_STD)
        elif name == 'cifar100':
            info = _info(n_cls, 3, (32, 32), CIFAR100_MEAN, CIFAR100_STD)
        else:
            from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
            size = args.img_size or 224
            info = _info(n_cls, args.in_chans or 3, (size, size), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

    make_tf = _pil_transform if pil else _tensor_transform
    train_tf, eval_tf = make_tf(info, True, args), make_tf(info, False, args)
    train_idx, val_idx = _split_indices(len(base), args.val_fraction, args.split_seed)
    if pil:
        from timm.data import create_dataset
        eval_base = create_dataset(ds_name, root=args.data_dir, split=args.train_split, is_training=False,
                                   download=args.dataset_download)
    else:
        eval_base = base
    train_ds: Dataset = Subset(_with_transform(base, train_tf), train_idx)
    val_ds = Subset(_with_transform(eval_base, eval_tf), val_idx) if val_idx else None
    test_ds = _with_transform(test_base, eval_tf) if test_base is not None else None
    info.train_size, info.val_size = len(train_idx), len(val_idx)
    info.test_size = len(test_ds) if test_ds is not None else 0
    return train_ds, val_ds, test_ds, info


def _has_split(root: str | None, split: str, name: str) -> bool:
    if name != 'folder':
        return True
    return bool(root) and os.path.isdir(os.path.join(root, split))


def _synthetic_shape(args: Any) -> tuple[int, int, int]:
    if args.input_size:
        c, h, w = args.input_size
        return int(c), int(h), int(w)
    size = args.img_size or 32
    return int(args.in_chans or 3), int(size), int(size)


# ----------------------------------------------------------------------------------------------------------------
# loaders
class EpochSampler(Sampler[int]):
    """All indices, shuffled by a permutation that depends only on ``(seed, epoch)``: the same on every rank and
    after a resume (Accelerate shards its batches across processes).

    Args:
        n: Data set length.
        seed: Base seed.
        shuffle: Shuffle, or keep the order.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def in_memory(dataset: Dataset | None) -> bool:
    """Whether ``dataset`` (or the data set under a ``Subset``) is held in one tensor: batches are gathered whole,
    worker processes would only add overhead."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TensorImageDataset)


def create_loader(dataset: Dataset, batch_size: int, is_training: bool, seed: int = 0, workers: int = 0,
                  pin_memory: bool = False, drop_last: bool = False) -> DataLoader:
    """A DataLoader over an :class:`EpochSampler` (to be passed through ``accelerator.prepare``).

    In-memory tensor data sets are loaded in the main process (``workers`` is ignored), a whole batch at a time.
    """
    if in_memory(dataset):
        workers = 0
    sampler = EpochSampler(len(dataset), seed=seed, shuffle=is_training)
    batch_sampler = BatchSampler(sampler, batch_size, drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, collate_fn=collate)


def describe_sizes(info: DataInfo) -> str:
    return f'{info.name}: train {info.train_size}, validation {info.val_size}, test {info.test_size}'

