"""Safe data (issue 13): a crafted CIFAR pickle runs no code, CIFAR/STL-10 are read only where
told, symlink loops in an image folder end and list each file once, 16-bit images are scaled to
8 bits (not clipped), a corrupt zip member is a bad file (named by raise, skipped by skip)."""
import io
import os
import pickle
import struct
import threading
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import datasets as D
from selfsup.data.datasets import DatasetFormatError, DatasetNotFoundError, build_dataset
from selfsup.data.files import index_folder, load_rgb, open_imagefolder, open_imagenet_zip
from selfsup.data.loader import ViewReader, decode_on_device


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    """An empty system folder and no $SELFSUP_DATA, so only the tmp files are found."""
    empty = tmp_path / "_system"
    empty.mkdir()
    monkeypatch.setenv(D.SYSTEM_DATA_ENV_VAR, str(empty))
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)


# ----------------------------------------------------------------- CIFAR pickles
def _cifar_batch(seed=0, n=2):
    imgs = np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return {b"batch_label": b"testing batch 1 of 1", b"labels": [seed % 10] * n, b"data": imgs,
            b"filenames": [b"a.png"] * n}


def _write_cifar10(folder, protocol=pickle.DEFAULT_PROTOCOL, numpy1_names=False):
    folder.mkdir(parents=True, exist_ok=True)
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    for i, fname in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = pickle.dumps(_cifar_batch(i), protocol=protocol)
        if numpy1_names:   # what the official archive names (numpy 1): numpy.core.multiarray
            data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / fname).write_bytes(data)


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.eval"])
def test_a_crafted_cifar_batch_runs_no_code_and_is_named(tmp_path, how):
    import builtins

    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    marker = tmp_path / "PWNED"
    payload = _Evil(os.system, f"touch {marker}") if how == "os.system" else \
        _Evil(builtins.eval, f"open({str(marker)!r}, 'w').write('x')")
    batch = _cifar_batch()
    batch[b"labels"] = payload
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(Exception) as e:
        build_dataset("cifar10", "test", root=str(tmp_path))
    assert not marker.exists(), "the crafted pickle ran code"
    assert isinstance(e.value, DatasetFormatError)
    msg = str(e.value)
    assert str(folder / "test_batch") in msg and how.split(".")[1] in msg   # (protocol 2 says __builtin__.eval)


@pytest.mark.parametrize("protocol,numpy1_names", [(2, True), (2, False), (4, False), (5, False)])
def test_genuine_cifar_batches_still_load(tmp_path, protocol, numpy1_names):
    _write_cifar10(tmp_path / "cifar-10-batches-py", protocol, numpy1_names)
    ds = build_dataset("cifar10", "train", root=str(tmp_path))
    assert ds.images.shape == (10, 3, 32, 32) and ds.classes == [f"c{i}" for i in range(10)]
    assert torch.equal(ds.images[:2], torch.from_numpy(_cifar_batch(0)[b"data"].reshape(2, 3, 32, 32)))
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_cifar_and_stl10_are_read_only_from_data_root_or_selfsup_data(tmp_path, monkeypatch):
    system = tmp_path / "_system"
    _write_cifar10(system / "cifar-10-batches-py")
    _write_cifar10(system / "cifar10" / "cifar-10-batches-py")
    stl = system / "stl10_binary"
    stl.mkdir()
    (stl / "test_X.bin").write_bytes(bytes(2 * 3 * 96 * 96))
    (stl / "test_y.bin").write_bytes(bytes([1, 2]))
    elsewhere = tmp_path / "elsewhere"
    _write_cifar10(elsewhere / "cifar-10-batches-py")
    (tmp_path / "root").mkdir()
    for name in ("cifar10", "stl10"):   # never the system folder
        with pytest.raises(DatasetNotFoundError):
            build_dataset(name, "test")
        with pytest.raises(DatasetNotFoundError):
            build_dataset(name, "test", root=str(tmp_path / "root"))
    monkeypatch.setenv(D.DATA_ENV_VAR, str(elsewhere))
    with pytest.raises(DatasetNotFoundError):   # data.root given: only there
        build_dataset("cifar10", "test", root=str(tmp_path / "root"))
    assert len(build_dataset("cifar10", "test")) == 2   # no data.root: $SELFSUP_DATA
    assert len(build_dataset("cifar10", "test", root=str(elsewhere))) == 2


# ----------------------------------------------------------------- symlink loops
def _png(path, value):
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def _class_tree(root):
    """root/{cat,dog}/... with 3 + 2 real images; returns the expected (keys, labels)."""
    for rel, v in (("cat/a.png", 10), ("cat/deep/b.png", 20), ("cat/deep/c.png", 30),
                   ("dog/d.png", 40), ("dog/e.png", 50)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _png(root / rel, v)
    return ["cat/a.png", "cat/deep/b.png", "cat/deep/c.png", "dog/d.png", "dog/e.png"], [0, 0, 0, 1, 1]


def _index_within(folder, cache_dir, seconds=60):
    out = {}
    t = threading.Thread(target=lambda: out.update(index_folder(str(folder), cache_dir)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"indexing {folder} did not finish in {seconds} s (symlink loop?)"
    return out


def test_a_symlink_loop_lists_each_file_once_with_its_label(tmp_path):
    root = tmp_path / "set"
    keys, labels = _class_tree(root)
    os.symlink("..", root / "cat" / "deep" / "up")   # cat/deep/up -> cat: a loop
    idx = _index_within(root, None)
    assert idx["keys"] == keys and idx["labels"] == labels and idx["classes"] == ["cat", "dog"]


def test_two_symlink_loops_and_a_link_across_classes_end(tmp_path):
    root = tmp_path / "set"
    keys, labels = _class_tree(root)
    os.symlink("..", root / "cat" / "deep" / "up")   # -> cat
    os.symlink("../..", root / "cat" / "deep" / "top")   # -> the set's root
    os.symlink("..", root / "dog" / "loop")   # -> the set's root
    os.symlink("../dog", root / "cat" / "dogs")   # another class: listed under its own name only
    ext = tmp_path / "outside"
    ext.mkdir()
    _png(ext / "f.png", 60)
    os.symlink(str(ext), root / "dog" / "more")   # a link out of the tree is followed (once)
    os.symlink(str(ext), root / "dog" / "more2")
    cache = str(tmp_path / "idx")
    for cached in (False, True):
        idx = _index_within(root, cache)
        assert idx["cached"] is cached
        assert idx["keys"] == keys + ["dog/more/f.png"] and idx["labels"] == labels + [1]
    ds = open_imagefolder(str(root), "train", index_cache=None).to_memory(None)
    assert len(ds) == 6 and ds.images[:, 0, 0, 0].tolist() == [10, 20, 30, 40, 50, 60]


# ----------------------------------------------------------------- 16-bit images
def _gradient16():
    return np.arange(65536, dtype=np.uint16).reshape(256, 256)   # every value 0..65535 once


def test_a_16bit_grayscale_png_is_scaled_to_8_bits(tmp_path):
    x = _gradient16()
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.fromarray(x).save(folder / "g16.png")
    assert (folder / "g16.png").read_bytes()[24] == 16   # IHDR bit depth: a real 16-bit PNG
    expected = torch.from_numpy(((x.astype(np.int64) + 128) // 257).astype(np.uint8))
    r = open_imagefolder(str(folder), "train", index_cache=None)
    ds = r.to_memory(None)
    assert ds.images.shape == (1, 3, 256, 256)
    for c in range(3):
        assert torch.equal(ds.images[0, c], expected)
    assert ds.images.float().mean().item() == pytest.approx(127.5, abs=0.5)
    # data.decode=device (torchvision's decoder, here on the CPU): the same values
    data = torch.frombuffer(bytearray((folder / "g16.png").read_bytes()), dtype=torch.uint8)
    boxes = torch.tensor([[[0, 0, 256, 256]]])
    out = decode_on_device([data], boxes, [(256, (1.0, 1.0), (1.0, 1.0))], "cpu")[0]
    assert (out[0].int() - expected.int()).abs().max().item() <= 1 and out.float().mean().item() < 130
    # streamed (data.decode=cpu): views are not saturated
    _, views, _ = ViewReader(r, [(32, (0.9, 1.0), (1.0, 1.0))])[(0, 0)]
    assert views[0].float().mean().item() < 200


def test_32bit_mode_I_images_are_scaled_too():
    x = _gradient16().astype(np.int32)
    im = Image.fromarray(x)
    assert im.mode == "I"
    rgb = np.asarray(load_rgb(im, "x"))
    assert np.array_equal(rgb[..., 0], (x + 128) // 257)
    small = Image.fromarray(np.arange(256, dtype=np.int32).reshape(16, 16))   # 8-bit values in mode I
    assert np.array_equal(np.asarray(load_rgb(small, "y"))[..., 1], np.arange(256).reshape(16, 16))


# ----------------------------------------------------------------- corrupt zip members
def _flip_member_bytes(zpath, member):
    """Flip a few bytes in the middle of `member`'s stored (compressed) data, found from its local header."""
    with zipfile.ZipFile(zpath) as z:
        info = z.getinfo(member)
    raw = bytearray(zpath.read_bytes())
    off = info.header_offset
    assert raw[off:off + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<HH", raw[off + 26:off + 30])
    start = off + 30 + name_len + extra_len
    mid = start + info.compress_size // 2
    for k in range(mid, mid + 4):
        raw[k] ^= 0xFF
    zpath.write_bytes(bytes(raw))


def test_a_corrupt_zip_member_is_named_or_skipped(tmp_path):
    root = tmp_path / "z"
    root.mkdir()
    keys = [f"n0/{i}.png" for i in range(6)]
    with zipfile.ZipFile(root / "train.zip", "w") as z:
        for i, k in enumerate(keys):
            buf = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(buf, format="PNG")
            # one member stored (a flipped byte: bad CRC), the others deflated (zlib error or bad CRC)
            z.writestr(k, buf.getvalue(), zipfile.ZIP_STORED if i == 1 else zipfile.ZIP_DEFLATED)
    (root / "train_map.txt").write_text("".join(f"{k}\t0\n" for k in keys))
    _flip_member_bytes(root / "train.zip", keys[1])
    _flip_member_bytes(root / "train.zip", keys[4])
    for k in (keys[1], keys[4]):
        with zipfile.ZipFile(root / "train.zip") as z, pytest.raises((zipfile.BadZipFile, zlib.error)):
            z.read(k)   # the corruption is real
    r = open_imagenet_zip(str(root), "train")
    assert sorted(i for i, _ in r.scan()) == [1, 4]
    with pytest.raises(DatasetFormatError, match=f"train.zip:{keys[1]}"):
        r.to_memory(None)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = r.to_memory(None, on_error="skip")
    assert ds.images[:, 0, 0, 0].tolist() == [0, 80, 120, 200]
    specs = [(8, (0.5, 1.0), (3 / 4, 4 / 3))]
    with pytest.raises(DatasetFormatError, match=f"train.zip:{keys[4]}"):
        ViewReader(r, specs)[(4, 0)]
    idx, views, where = ViewReader(r, specs, on_error="skip")[(4, 0)]
    assert idx == 4 and views[0].shape == (3, 8, 8) and keys[4] in where
    assert views[0].float().mean().item() == pytest.approx(200, abs=1)   # the next readable item
