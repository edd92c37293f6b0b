"""Dataset loaders on data generated here: a fake CIFAR pickle folder, an ImageFolder of PNGs,
scikit-learn's digits, synthetic data; clear errors for missing / malformed folders."""
import os
import pickle

import numpy as np
import pytest
import torch

from oba_ext.data import DatasetError, get_dataset, make_loader
from tolerances import F32_PIXELS


def _write_cifar(root, n=6, which="cifar10"):
    rng = np.random.default_rng(0)
    if which == "cifar10":
        base = os.path.join(root, "cifar-10-batches-py")
        files, key, ncls = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
    else:
        base = os.path.join(root, "cifar-100-python")
        files, key, ncls = ["train", "test"], b"fine_labels", 100
    os.makedirs(base)
    for f in files:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             key: list(rng.integers(0, ncls, n))}
        with open(os.path.join(base, f), "wb") as fh:
            pickle.dump(d, fh)
    return base


@pytest.mark.parametrize("which,ntrain", [("cifar10", 30), ("cifar100", 6)])
def test_cifar_folder(tmp_path, which, ntrain):
    base = _write_cifar(str(tmp_path), which=which)
    info = get_dataset(which, str(tmp_path), train=True)
    assert len(info.dataset) == ntrain and info.input_shape == (3, 32, 32)
    x, y = info.dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= int(y) < info.num_classes
    # pixel layout: channel-major rows of 1024, as torchvision reads them
    with open(os.path.join(base, "data_batch_1" if which == "cifar10" else "train"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    red = (x[0] * 0.2470 + 0.4914) * 255
    assert torch.allclose(red.flatten(), torch.tensor(raw[:1024], dtype=torch.float32), atol=F32_PIXELS)
    assert len(get_dataset(which, str(tmp_path), train=False).dataset) == 6


def test_cifar_errors(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        get_dataset("cifar10", str(tmp_path))
    base = _write_cifar(str(tmp_path))
    os.remove(os.path.join(base, "data_batch_3"))
    with pytest.raises(DatasetError, match="data_batch_3"):
        get_dataset("cifar10", str(tmp_path))
    with open(os.path.join(base, "data_batch_3"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DatasetError, match="not a CIFAR pickle"):
        get_dataset("cifar10", str(tmp_path))
    with pytest.raises(DatasetError, match="--data-root"):
        get_dataset("cifar10", None)
    with pytest.raises(DatasetError, match="unknown dataset"):
        get_dataset("mnist-ish", str(tmp_path))


def test_imagefolder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog", "eel"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    info = get_dataset("imagefolder", str(tmp_path), train=True, image_size=16)
    assert info.num_classes == 3 and len(info.dataset) == 6
    x, y = info.dataset[5]
    assert x.shape == (3, 16, 16) and int(y) == 2
    xb, yb = next(iter(make_loader(info.dataset, batch_size=4)))
    assert xb.shape == (4, 3, 16, 16)
    with pytest.raises(DatasetError, match="does not exist"):
        get_dataset("imagefolder", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not an ImageFolder"):
        get_dataset("imagefolder", str(tmp_path / "empty"))


def test_digits_and_synthetic():
    tr = get_dataset("digits", train=True)
    te = get_dataset("digits", train=False, image_size=16)
    assert len(tr.dataset) + len(te.dataset) == 1797 and tr.num_classes == 10
    assert tr.dataset[0][0].shape == (1, 8, 8) and te.dataset[0][0].shape == (1, 16, 16)
    s1 = get_dataset("synthetic", image_size=8)
    s2 = get_dataset("synthetic", image_size=8)
    assert torch.equal(s1.dataset.tensors[0], s2.dataset.tensors[0])  # seeded
    a = [y for _, y in make_loader(s1.dataset, 16, shuffle=True, seed=3)]
    b = [y for _, y in make_loader(s1.dataset, 16, shuffle=True, seed=3)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
