"""Dataset loaders on data generated here: a CIFAR folder in the official layout
(tests/cifar_files.py; torchvision's MD5 check skipped for it), an ImageFolder of PNGs,
scikit-learn's digits, synthetic data; clear errors for missing / malformed folders."""
import os
import pickle

import numpy as np
import pytest
import torch

from cifar_files import skip_md5_check, write_cifar
from oba_ext.data import DatasetError, get_dataset, make_loader
from tolerances import F32_PIXELS


@pytest.mark.parametrize("which,ntrain", [("cifar10", 30), ("cifar100", 6)])
def test_cifar_folder(tmp_path, monkeypatch, which, ntrain):
    skip_md5_check(monkeypatch)  # generated files cannot match the official MD5s
    base = write_cifar(tmp_path, which=which)
    info = get_dataset(which, str(tmp_path), train=True)
    assert len(info.dataset) == ntrain and info.input_shape == (3, 32, 32)
    x, y = info.dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= int(y) < info.num_classes
    # pixel layout: channel-major rows of 1024, as torchvision reads them
    with open(os.path.join(base, "data_batch_1" if which == "cifar10" else "train"), "rb") as f:
        raw = pickle.load(f)["data"][0]
    red = (x[0] * 0.2470 + 0.4914) * 255
    assert torch.allclose(red.flatten(), torch.tensor(raw[:1024], dtype=torch.float32), atol=F32_PIXELS)
    assert len(get_dataset(which, str(tmp_path), train=False).dataset) == 6
    # augmentation: a 4-pixel shift/flip of the same normalized image (padding is 0 after
    # normalization), so the centre 24×24 of the image shows up in the augmented one
    xa, ya = get_dataset(which, str(tmp_path), train=True, augment=True).dataset[0]
    assert xa.shape == (3, 32, 32) and ya == y
    centre = x[:, 4:28, 4:28]
    found = any(torch.equal(v[:, 4 + dy:28 + dy, 4 + dx:28 + dx], centre)
                for v in (xa, xa.flip(-1)) for dy in range(-4, 5) for dx in range(-4, 5))
    assert found, "augmented image is not a shifted/flipped copy of the image"


def test_cifar_errors(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="no 'cifar-10-batches-py' folder.*download=True"):
        get_dataset("cifar10", str(tmp_path))
    base = write_cifar(tmp_path)
    # files that are not the official release: torchvision's MD5 check refuses them, and the
    # error names the files that fail it and where the official ones come from
    with pytest.raises(DatasetError, match=r"data_batch_1, .*test_batch, batches.meta fail the "
                                           r"MD5 check.*cifar-10-python.tar.gz"):
        get_dataset("cifar10", str(tmp_path))
    os.remove(os.path.join(base, "data_batch_3"))
    with pytest.raises(DatasetError, match="lacks data_batch_3;"):
        get_dataset("cifar10", str(tmp_path))
    skip_md5_check(monkeypatch)  # from here on: what torchvision does after its MD5 check
    with open(os.path.join(base, "data_batch_3"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DatasetError, match="cannot read as CIFAR pickles"):
        get_dataset("cifar10", str(tmp_path))
    with open(os.path.join(base, "data_batch_3"), "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, f)
    with pytest.raises(DatasetError, match=r"labels .* outside \[0, 10\)"):
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
