"""Tests for selfsup.data.datasets: tiny files in the real on-disk formats."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import datasets as D
from selfsup.data.datasets import DatasetFormatError, ImageDataset, build_dataset


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    """An empty system folder and no $SELFSUP_DATA, so only the tmp files are found."""
    empty = tmp_path / "_system"
    empty.mkdir()
    monkeypatch.setenv(D.SYSTEM_DATA_ENV_VAR, str(empty))
    monkeypatch.delenv("SELFSUP_DATA", raising=False)


def test_the_system_folder_is_debians_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv(D.SYSTEM_DATA_ENV_VAR)   # a user's machine: apt-get's folder is searched last
    assert D.system_dirs("fashion-mnist") == ["/usr/share/datasets/fashion-mnist"]
    monkeypatch.setenv(D.SYSTEM_DATA_ENV_VAR, "/data/shared")
    assert D.system_dirs("stl10", "stl10_binary") == ["/data/shared/stl10/stl10_binary"]
    monkeypatch.setenv(D.SYSTEM_DATA_ENV_VAR, "")   # off (the test suite's setting)
    assert D.system_dirs("fashion-mnist") == []


def rng_images(n, c, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


# ----------------------------------------------------------------- fashion-mnist
def write_idx(path, arr, magic, compress=True):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def write_fmnist(folder, n_train=7, n_test=3, compress=True):
    os.makedirs(folder, exist_ok=True)
    ext = ".gz" if compress else ""
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        imgs = rng_images(n, 1, 28, 28, seed=n)[:, 0]
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), imgs, 0x803, compress)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), labels, 0x801, compress)
        out[split] = (imgs, labels)
    return out


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx(tmp_path, compress):
    written = write_fmnist(tmp_path, compress=compress)
    for split in ("train", "test"):
        ds = build_dataset("fashion-mnist", split, root=str(tmp_path))
        imgs, labels = written[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(imgs), 1, 28, 28)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs))
        assert ds.labels.tolist() == labels.tolist() and ds.labels.dtype == torch.int64
        assert ds.num_classes == 10 and ds.classes[0] == "T-shirt/top"


def test_fashion_mnist_torchvision_layout_and_env(tmp_path, monkeypatch):
    write_fmnist(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert len(build_dataset("fashion-mnist", "train", root=str(tmp_path / "tv"))) == 7
    write_fmnist(tmp_path / "env" / "fashion-mnist", n_train=5)
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path / "env"))
    assert len(build_dataset("fashion-mnist", "train")) == 5


def test_fashion_mnist_missing_names_paths(tmp_path):
    root = tmp_path / "nothing_here"
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("fashion-mnist", "train", root=str(root))
    msg = str(e.value)
    for p in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist", *D.system_dirs("fashion-mnist")):
        assert str(p) in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg and "data.root" in msg and "download" in msg


def test_fashion_mnist_download_failure_is_clear(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("no network")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fail)
    with pytest.raises(FileNotFoundError, match="no network"):
        build_dataset("fashion-mnist", "test", root=str(tmp_path / "dl"), download=True)


def test_fashion_mnist_bad_magic_and_truncation(tmp_path):
    write_fmnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(bad, rng_images(7, 1, 28, 28)[:, 0], 0x801)  # label magic on an image file
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz"):
        build_dataset("fashion-mnist", "train", root=str(tmp_path))
    # truncated payload
    with gzip.open(bad, "wb") as f:
        f.write((0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (7, 28, 28)) + b"\0" * 100)
    with pytest.raises(DatasetFormatError, match="truncated"):
        build_dataset("fashion-mnist", "train", root=str(tmp_path))
    # not gzip at all
    bad.write_bytes(b"this is not gzip")
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz"):
        build_dataset("fashion-mnist", "train", root=str(tmp_path))


def test_fashion_mnist_empty(tmp_path):
    write_fmnist(tmp_path, n_test=0)
    with pytest.raises(ValueError, match="empty.*t10k-images"):
        build_dataset("fashion-mnist", "test", root=str(tmp_path))


def test_fashion_mnist_image_size(tmp_path):
    write_fmnist(tmp_path)
    ds = build_dataset("fashion-mnist", "train", root=str(tmp_path), image_size=32)
    assert ds.images.shape == (7, 1, 32, 32) and ds.images.dtype == torch.uint8


# ----------------------------------------------------------------- CIFAR
def pickle_dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"c{i}" for i in range(10)]
    pickle_dump(folder / "batches.meta", {b"label_names": [n.encode() for n in names]})
    written = []
    for i, fname in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        imgs = rng_images(2, 3, 32, 32, seed=i)
        labels = [i % 10, (i + 3) % 10]
        pickle_dump(folder / fname, {b"data": imgs.reshape(2, 3072), b"labels": labels})
        written.append((imgs, labels))
    train = build_dataset("cifar10", "train", root=str(tmp_path))
    assert train.images.shape == (10, 3, 32, 32) and train.classes == names
    assert torch.equal(train.images, torch.from_numpy(np.concatenate([w[0] for w in written[:5]])))
    assert train.labels.tolist() == sum((w[1] for w in written[:5]), [])
    test = build_dataset("cifar10", "test", root=str(folder))  # root pointing at the batches dir
    assert torch.equal(test.images, torch.from_numpy(written[5][0])) and test.labels.tolist() == written[5][1]

    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match="test_batch"):
        build_dataset("cifar10", "test", root=str(tmp_path))


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"fine{i}" for i in range(100)]
    pickle_dump(folder / "meta", {b"fine_label_names": [n.encode() for n in names]})
    imgs = rng_images(4, 3, 32, 32)
    batch = {b"data": imgs.reshape(4, 3072), b"fine_labels": [0, 99, 5, 42], b"coarse_labels": [0] * 4}
    pickle_dump(folder / "train", batch)
    ds = build_dataset("cifar100", "train", root=str(tmp_path))
    assert torch.equal(ds.images, torch.from_numpy(imgs)) and ds.labels.tolist() == [0, 99, 5, 42]
    assert ds.num_classes == 100 and ds.classes[99] == "fine99"
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        build_dataset("cifar100", "test", root=str(tmp_path))


# ----------------------------------------------------------------- STL-10
def test_stl10_column_major(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    chw = rng_images(3, 3, 96, 96)  # non-symmetric images, as they should come back
    chw[0, 0, 0, :] = 255  # top row bright, so a missing transpose is obvious
    chw[0, 0, 1:, :] = 0
    chw.transpose(0, 1, 3, 2).tofile(folder / "train_X.bin")  # stored column-major
    np.array([1, 10, 4], dtype=np.uint8).tofile(folder / "train_y.bin")
    unl = rng_images(2, 3, 96, 96, seed=5)
    unl.transpose(0, 1, 3, 2).tofile(folder / "unlabeled_X.bin")
    (folder / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n")

    ds = build_dataset("stl10", "train", root=str(tmp_path))
    assert ds.images.shape == (3, 3, 96, 96) and torch.equal(ds.images, torch.from_numpy(chw))
    assert ds.images[0, 0, 0].eq(255).all() and ds.images[0, 0, :, 0].sum() == 255
    assert ds.labels.tolist() == [0, 9, 3] and ds.classes[9] == "k9"
    u = build_dataset("stl10", "unlabeled", root=str(folder))
    assert torch.equal(u.images, torch.from_numpy(unl)) and u.labels.tolist() == [-1, -1]
    both = build_dataset("stl10", "train+unlabeled", root=str(tmp_path))
    assert len(both) == 5 and both.labels.tolist() == [0, 9, 3, -1, -1]
    with pytest.raises(FileNotFoundError, match="test_X.bin"):
        build_dataset("stl10", "test", root=str(tmp_path))
    with open(folder / "train_X.bin", "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(DatasetFormatError, match="train_X.bin"):
        build_dataset("stl10", "train", root=str(tmp_path))


# ----------------------------------------------------------------- image folders
def save_png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def hwc(seed, h=8, w=10):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_imagefolder_labelled(tmp_path):
    for c, cls in enumerate(["cat", "ant", "bee"]):
        for j in range(2):
            save_png(str(tmp_path / cls / f"img{j}.png"), hwc(10 * c + j))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = build_dataset("imagefolder", "train", root=str(tmp_path))
    assert ds.classes == ["ant", "bee", "cat"]
    assert ds.images.shape == (6, 3, 8, 10)
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    expected = [hwc(10 * c + j) for c in (1, 2, 0) for j in range(2)]  # sorted: ant, bee, cat
    assert torch.equal(ds.images, torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2))
    img, label, idx = ds[3]
    assert img.shape == (3, 8, 10) and label == 1 and idx == 3


def test_imagefolder_flat_unlabelled_and_grayscale(tmp_path):
    save_png(str(tmp_path / "a.PNG"), hwc(1))
    Image.fromarray(np.full((8, 10), 77, np.uint8)).save(tmp_path / "b.bmp")
    ds = build_dataset("imagefolder", "train", root=str(tmp_path))
    assert ds.classes == [] and ds.labels.tolist() == [-1, -1] and ds.num_classes == 0
    assert torch.equal(ds.images[0], torch.from_numpy(hwc(1)).permute(2, 0, 1))
    assert ds.images[1].eq(77).all()
    with pytest.raises(FileNotFoundError, match="test"):
        build_dataset("imagefolder", "test", root=str(tmp_path))


def test_imagefolder_splits_and_resize(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for j in range(n):
            save_png(str(tmp_path / split / "x" / f"{j}.png"), hwc(j, h=20 + j, w=30))
    with pytest.raises(ValueError, match="data.image_size"):
        build_dataset("imagefolder", "train", root=str(tmp_path))
    tr = build_dataset("imagefolder", "train", root=str(tmp_path), image_size=16)
    te = build_dataset("imagefolder", "test", root=str(tmp_path), image_size=16)
    assert tr.images.shape == (3, 3, 16, 16) and te.images.shape == (2, 3, 16, 16)
    assert tr.classes == ["x"]


def test_imagefolder_corrupt_and_empty(tmp_path):
    for j in range(3):
        save_png(str(tmp_path / "c" / f"{j}.png"), hwc(j))
    bad = tmp_path / "c" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DatasetFormatError, match="broken.jpg"):
        build_dataset("imagefolder", "train", root=str(tmp_path))
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = build_dataset("imagefolder", "train", root=str(tmp_path), on_error="skip")
    assert len(ds) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images") as e:
        build_dataset("imagefolder", "train", root=str(empty))
    assert str(empty) in str(e.value)


# ----------------------------------------------------------------- synthetic / registry / container
def test_synthetic():
    a = build_dataset("synthetic", "train", image_size=32)
    b = build_dataset("synthetic", "train", image_size=32)
    t = build_dataset("synthetic", "test", image_size=32)
    assert a.images.shape == (2000, 3, 32, 32) and t.images.shape == (500, 3, 32, 32)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images[:500], t.images)
    assert a.num_classes == 10 and torch.bincount(a.labels).tolist() == [200] * 10
    s = build_dataset("synthetic", "train", image_size=16, num_samples=30, num_classes=3)
    assert s.images.shape == (30, 3, 16, 16) and s.num_classes == 3 and set(s.labels.tolist()) == {0, 1, 2}
    assert s.images.float().std() > 20  # not blank


def test_unknown_name_and_split():
    with pytest.raises(ValueError) as e:
        build_dataset("imagenet-9000", "train")
    assert "cifar10, cifar100, fashion-mnist, imagefolder, imagenet-zip, stl10, synthetic" in str(e.value)
    with pytest.raises(ValueError, match="unlabeled"):
        build_dataset("stl10", "val")
    with pytest.raises(ValueError, match="train, test"):
        build_dataset("cifar10", "unlabeled")


def test_image_dataset_container():
    ds = ImageDataset(torch.zeros(4, 1, 5, 5, dtype=torch.uint8), torch.tensor([0, 1, -1, 1]), ["a", "b"], "t")
    assert len(ds) == 4 and ds.num_classes == 2
    img, label, idx = ds[2]
    assert img.shape == (1, 5, 5) and label == -1 and idx == 2
    assert ds[-1][2] == 3
    moved = ds.to("cpu")
    assert moved is not ds and torch.equal(moved.images, ds.images)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    x, y, i = next(iter(loader))
    assert x.shape == (4, 1, 5, 5) and i.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(4, 2, 5, 5, dtype=torch.uint8), torch.zeros(4), [], "bad")
