"""Datasets by name, from local files only (nothing is ever downloaded).

==============  ===================================================================  =========
name            source                                                               input
==============  ===================================================================  =========
``cifar10``     ``ROOT/cifar-10-batches-py``: the official files, read by            3×32×32
                ``torchvision.datasets.CIFAR10(ROOT, download=False)``
``cifar100``    ``ROOT/cifar-100-python``, by ``torchvision.datasets.CIFAR100``      3×32×32
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


# --------------------------------------------------------------------------- CIFAR
#: dataset name -> (class name in ``torchvision.datasets``, number of classes)
_CIFAR = {"cifar10": ("CIFAR10", 10), "cifar100": ("CIFAR100", 100)}


def _cifar_files(cls) -> list:
    """``[(file, md5)]``: every file of the official release that ``cls`` reads and checks."""
    return [tuple(f) for f in cls.train_list + cls.test_list] + [(cls.meta["filename"],
                                                                  cls.meta["md5"])]


def _cifar_md5_failures(cls, base: str) -> str:
    """The files in ``base`` whose MD5 differs from the official release (torchvision says
    only "not found or corrupted")."""
    from torchvision.datasets.utils import check_integrity
    bad = [f for f, md5 in _cifar_files(cls) if not check_integrity(os.path.join(base, f), md5)]
    if not bad:  # a file changed between torchvision's check and this one
        return "torchvision's integrity check failed"
    return f"{', '.join(bad)} fail{'s' if len(bad) == 1 else ''} the MD5 check"


def cifar(root: str, name: str = "cifar10", train: bool = True, augment: bool = False) -> DatasetInfo:
    """CIFAR-10/100 from ``root`` by ``torchvision.datasets.CIFAR10/CIFAR100(root, train,
    download=False)``: ``root/cifar-10-batches-py`` (``root/cifar-100-python``) holding the
    official python-version files, whose MD5s torchvision checks. Items: image (3, 32, 32)
    float32 (``ToTensor``, then per-channel ``Normalize`` by :data:`CIFAR_MEAN`/``CIFAR_STD``),
    label int. ``augment`` appends ``RandomCrop(32, padding=4)`` (zero padding after
    normalization) and ``RandomHorizontalFlip``.

    Raises :class:`DatasetError` naming the folder, the files missing or failing the MD5 check
    (or torchvision's error reading them), what is expected and how to get the files; nothing
    is ever downloaded."""
    from torchvision import datasets, transforms  # heavy, optional: only for this dataset
    cls_name, ncls = _CIFAR[name]
    cls = getattr(datasets, cls_name)
    expected = (f"the files {', '.join(f for f, _ in _cifar_files(cls))} of {cls.filename} "
                f"({cls.url})")
    how = (f"nothing is downloaded: extract that archive into {root!r}, or run "
           f"torchvision.datasets.{cls.__name__}({root!r}, download=True) once")
    base = os.path.join(root, cls.base_folder)
    if not os.path.isdir(base):
        raise DatasetError(f"root: {root!r} has no {cls.base_folder!r} folder; expected "
                           f"torchvision's {name} layout, {cls.base_folder}/ with {expected}; "
                           f"{how}")
    missing = [f for f, _ in _cifar_files(cls) if not os.path.isfile(os.path.join(base, f))]
    if missing:
        raise DatasetError(f"root: {base!r} lacks {', '.join(missing)}; expected {expected}; "
                           f"{how}")
    tf = [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    if augment:
        tf += [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    try:
        ds = cls(root, train=train, transform=transforms.Compose(tf), download=False)
    except RuntimeError as e:
        if "not found or corrupted" not in str(e):
            raise
        raise DatasetError(f"root: {base!r} is not the official {name} release: "
                           f"{_cifar_md5_failures(cls, base)}; expected {expected}; {how}"
                           ) from None
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as e:
        raise DatasetError(f"root: {base!r} holds files torchvision.datasets.{cls.__name__} "
                           f"cannot read as CIFAR pickles ({type(e).__name__}: {e}); expected "
                           f"{expected}") from None
    labels = np.asarray(ds.targets)
    if len(labels) and (labels.min() < 0 or labels.max() >= ncls):
        raise DatasetError(f"root: labels in {base!r} outside [0, {ncls})")
    return DatasetInfo(ds, ncls, (3, 32, 32))


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
