"""Datasets by name, from local files only (nothing is ever downloaded).

==============  ===================================================================  =========
name            source                                                               input
==============  ===================================================================  =========
``cifar10``     ``ROOT/cifar-10-batches-py`` (torchvision's pickle format)          3×32×32
``cifar100``    ``ROOT/cifar-100-python`` (torchvision's pickle format)              3×32×32
``imagefolder`` ``ROOT/{train,val}/<class>/*.png|jpg`` (ImageNet layout) or          3×S×S
                ``ROOT/<class>/*`` directly
``digits``      scikit-learn's bundled 8×8 digits (1,797 images, 10 classes),        1×S×S
                80/20 split with a fixed seed; upsampled to ``image_size``
``synthetic``   Gaussian images with random labels (tests, smoke runs)               C×S×S
==============  ===================================================================  =========

Every loader returns a :class:`DatasetInfo` (dataset, num_classes, input shape) and raises
:class:`DatasetError` naming the folder and what was expected when data is missing or malformed.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(ValueError):
    """A dataset folder that is missing or malformed, or an unknown dataset name."""


@dataclass
class DatasetInfo:
    dataset: Dataset
    num_classes: int
    input_shape: Tuple[int, int, int]  # (C, H, W)


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- CIFAR
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def _read_cifar_file(path: str, label_key: bytes):
    if not os.path.isfile(path):
        raise DatasetError(f"root: missing CIFAR file {path!r}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"root: {path!r} is not a CIFAR pickle with b'data' and {label_key!r} "
                           f"({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DatasetError(f"root: {path!r} has data of shape {data.shape} and {len(labels)} labels; "
                           f"expected (N, 3072) uint8 rows and N labels")
    return data, labels


def cifar(root: str, name: str = "cifar10", train: bool = True, augment: bool = False) -> DatasetInfo:
    """CIFAR-10/100 from ``root`` in torchvision's format (``torchvision.datasets.CIFAR10(root,
    download=False)`` reads the same folder). Images (3, 32, 32) float32, per-channel normalized;
    ``augment`` adds torchvision's ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip``.

    The files are read here rather than by ``torchvision.datasets.CIFAR10``: that class checks
    the MD5 of every file against the official release (and needs ``batches.meta``), so it
    refuses any other folder in the same format, and names no file when one is missing or
    malformed; this reader raises :class:`DatasetError` naming the file and what was expected."""
    folder, train_files, test_files, label_key, ncls = _CIFAR[name]
    base = os.path.join(root, folder)
    if not os.path.isdir(base):
        raise DatasetError(f"root: {root!r} has no {folder!r} folder; expected torchvision's {name} "
                           f"layout ({folder}/{'/'.join(train_files[:1])} ...); nothing is downloaded")
    parts = [_read_cifar_file(os.path.join(base, f), label_key)
             for f in (train_files if train else test_files)]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() >= ncls:
        raise DatasetError(f"root: labels in {base!r} outside [0, {ncls})")
    x = _normalize(torch.from_numpy(data).float() / 255.0, CIFAR_MEAN, CIFAR_STD)
    ds = TensorDataset(x, torch.from_numpy(labels))
    if augment:
        # torchvision is imported only where its transforms are used (heavy, optional here)
        from torchvision import transforms
        ds = _Augmented(ds, transforms.Compose([transforms.RandomCrop(32, padding=4),
                                                transforms.RandomHorizontalFlip()]))
    return DatasetInfo(ds, ncls, (3, 32, 32))


class _Augmented(Dataset):
    """``transform`` applied to the images of a dataset of ``(image, label)`` pairs."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.transform(x), y


# --------------------------------------------------------------------------- ImageFolder
def imagefolder(root: str, train: bool = True, image_size: int = 224) -> DatasetInfo:
    """ImageNet-style ``root/{train,val}/<class>/<image>`` (or ``root/<class>/<image>``).
    Resize to ``image_size·8/7``, center crop ``image_size``, ImageNet normalization."""
    from torchvision import datasets, transforms  # heavy, optional: only for this dataset
    if not os.path.isdir(root):
        raise DatasetError(f"root: folder {root!r} does not exist")
    split = os.path.join(root, "train" if train else "val")
    folder = split if os.path.isdir(split) else root
    tf = transforms.Compose([transforms.Resize(max(image_size, int(image_size * 8 / 7))),
                             transforms.CenterCrop(image_size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        ds = datasets.ImageFolder(folder, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetError(f"root: {folder!r} is not an ImageFolder tree (<class>/<image> with "
                           f"image files): {e}") from None
    if len(ds) == 0:
        raise DatasetError(f"root: no images under {folder!r}")
    return DatasetInfo(ds, len(ds.classes), (3, image_size, image_size))


# --------------------------------------------------------------------------- digits
def digits(train: bool = True, image_size: int = 8, seed: int = 0) -> DatasetInfo:
    """scikit-learn's bundled 8×8 digits: (1, S, S) float32 in [0, 1] minus 0.5, bilinearly
    upsampled when ``image_size > 8``; a fixed 80/20 train/test split by ``seed``."""
    from sklearn.datasets import load_digits  # optional dependency: only for this dataset
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.5
    y = torch.tensor(d.target, dtype=torch.int64)
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                            align_corners=False)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    idx = perm[:n_train] if train else perm[n_train:]
    return DatasetInfo(TensorDataset(x[idx], y[idx]), 10, (1, image_size, image_size))


# --------------------------------------------------------------------------- synthetic
def synthetic(train: bool = True, num_samples: int = 64, num_classes: int = 10,
              input_shape: Tuple[int, int, int] = (3, 32, 32), seed: int = 0) -> DatasetInfo:
    """Gaussian images (N, C, H, W) and uniform random labels; test split uses another seed."""
    g = torch.Generator().manual_seed(seed * 2 + (0 if train else 1))
    x = torch.randn((num_samples, *input_shape), generator=g)
    y = torch.randint(0, num_classes, (num_samples,), generator=g)
    return DatasetInfo(TensorDataset(x, y), num_classes, tuple(input_shape))


#: dataset name -> loader(root, train, image_size) -> DatasetInfo
DATASETS: Dict[str, Callable[..., DatasetInfo]] = {
    "cifar10": lambda root, train, image_size=None, **kw: cifar(_need_root(root, "cifar10"), "cifar10", train, **kw),
    "cifar100": lambda root, train, image_size=None, **kw: cifar(_need_root(root, "cifar100"), "cifar100", train, **kw),
    "imagefolder": lambda root, train, image_size=None, **kw: imagefolder(_need_root(root, "imagefolder"), train, image_size or 224),
    "imagenet": lambda root, train, image_size=None, **kw: imagefolder(_need_root(root, "imagenet"), train, image_size or 224),
    "digits": lambda root, train, image_size=None, **kw: digits(train, image_size or 8),
    "synthetic": lambda root, train, image_size=None, **kw: synthetic(train, input_shape=(3, image_size or 32, image_size or 32), **kw),
}


def _need_root(root: Optional[str], name: str) -> str:
    if not root:
        raise DatasetError(f"root: dataset {name!r} needs a local folder (--data-root PATH)")
    return root


def get_dataset(name: str, root: Optional[str] = None, train: bool = True,
                image_size: Optional[int] = None, **kw) -> DatasetInfo:
    """Dataset ``name`` from :data:`DATASETS`; ``DatasetError`` for unknown names or bad folders."""
    if name not in DATASETS:
        raise DatasetError(f"dataset: unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name](root, train, image_size, **kw)


def make_loader(ds: Dataset, batch_size: int = 64, shuffle: bool = False, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader with a seeded shuffle (reproducible order)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g,
                      num_workers=num_workers, drop_last=drop_last)
