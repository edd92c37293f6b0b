"""Generated CIFAR folders in the official python-version layout, for the loader tests.

``oba_ext.data.cifar`` reads CIFAR through ``torchvision.datasets.CIFAR10/CIFAR100``, which
checks every file's MD5 against the official release: generated files cannot pass that check.
:func:`skip_md5_check` turns off that check alone (torchvision's ``check_integrity`` in its
CIFAR module), so the rest of the real loading code runs on generated data."""
from __future__ import annotations

import os
import pickle

import numpy as np

#: name -> (folder, data files, label key, meta file, meta key, classes), as torchvision reads
LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                "labels", "batches.meta", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train", "test"], "fine_labels", "meta",
                 "fine_label_names", 100),
}


def write_cifar(root, n=6, which="cifar10", seed=0) -> str:
    """``root/<folder>`` with ``n`` random images per data file (the dict keys the official
    pickles load with in Python 3: ``"data"`` (n, 3072) uint8 rows, channel-major, and the
    labels) and the meta file; returns the folder."""
    folder, files, key, meta, meta_key, ncls = LAYOUT[which]
    rng = np.random.default_rng(seed)
    base = os.path.join(str(root), folder)
    os.makedirs(base)
    for f in files:
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             key: [int(v) for v in rng.integers(0, ncls, n)]}
        with open(os.path.join(base, f), "wb") as fh:
            pickle.dump(d, fh)
    with open(os.path.join(base, meta), "wb") as fh:
        pickle.dump({meta_key: [f"class{i}" for i in range(ncls)]}, fh)
    return base


def skip_md5_check(monkeypatch):
    """Let torchvision's CIFAR classes accept generated files: their MD5 check (of the data
    files and the meta file) always passes; everything else they do is unchanged."""
    from torchvision.datasets import cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: True)
