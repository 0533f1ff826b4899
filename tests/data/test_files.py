"""File-backed image sets (selfsup.data.files) and the streaming loader (selfsup.data.loader):
every reader gives the same images and labels, the folder index cache, bad files named or
skipped and counted, crops that do not depend on workers, per-rank shards."""
import os
import random
import zipfile

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from selfsup.data.datasets import DatasetFormatError, DatasetNotFoundError, build_dataset
from selfsup.data.fake import make_fake_imagenet
from selfsup.data.files import index_folder, open_imagefolder, open_imagenet_zip, read_map
from selfsup.data.loader import StreamLoader, ViewReader, crop_box, decode_on_device
from selfsup.data.samplers import build_index_schedule


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet"))
    make_fake_imagenet(root, classes=3, train_per_class=12, val_per_class=4, min_size=40, max_size=90)
    return root


def _readers(root, cache_dir):
    folder = open_imagefolder(root, "train", index_cache=cache_dir)
    zipped = open_imagenet_zip(root, "train")
    cached = open_imagenet_zip(root, "train")
    cached.cache(range(len(cached)))
    lst = os.path.join(root, "train_list.txt")
    with open(lst, "w") as f:
        f.writelines(f"train/{k}\t{int(y)}\n" for k, y in zip(zipped.keys, zipped.labels))
    listed = open_imagefolder(None, "train", file_list=lst)
    return {"folder": folder, "zip": zipped, "zip-cached": cached, "file-list": listed}


def test_every_reader_gives_the_same_images_and_labels(fake, tmp_path):
    readers = _readers(fake, str(tmp_path / "idx"))
    ref = readers["zip"]
    assert len(ref) == 36 and ref.classes == ["n01440764", "n01441764", "n01442764"]
    assert ref.labels.tolist() == sorted(ref.labels.tolist())
    for name, r in readers.items():
        assert len(r) == len(ref) and torch.equal(r.labels, ref.labels), name
        for i in range(len(ref)):
            assert r.read_bytes(i) == ref.read_bytes(i), (name, i)
        assert np.array_equal(r.load(5, 32), ref.load(5, 32)), name
    assert readers["file-list"].classes == ref.classes
    # decoded into memory through the dataset registry: same pixels from the folder and the zip
    a = build_dataset("imagefolder", "test", root=fake, image_size=32, index_cache=str(tmp_path / "idx"))
    b = build_dataset("imagenet-zip", "test", root=fake, image_size=32)
    assert a.images.shape == (12, 3, 32, 32) and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_streamed_views_agree_across_readers_and_cache_modes(fake, tmp_path):
    specs = [(24, (0.2, 1.0), (3 / 4, 4 / 3)), (16, (0.05, 0.3), (3 / 4, 4 / 3))]
    out = {}
    for name, r in _readers(fake, str(tmp_path / "idx")).items():
        sched = build_index_schedule("epoch", len(r), 8, seed=3)
        out[name] = list(StreamLoader(r, specs, sched, total=4, seed=3))
    ref = out["zip"]
    for name, batches in out.items():
        for (i1, v1, _), (i2, v2, _) in zip(batches, ref):
            assert torch.equal(i1, i2) and all(torch.equal(a, b) for a, b in zip(v1, v2)), name
    assert [tuple(v.shape) for v in ref[0][1]] == [(8, 3, 24, 24), (8, 3, 16, 16)]


def test_crops_do_not_depend_on_the_number_of_workers(fake):
    r = open_imagenet_zip(fake, "train")
    specs = [(20, (0.08, 1.0), (3 / 4, 4 / 3))] * 2

    def run(workers):
        sched = build_index_schedule("sliding_window", len(r), 6, seed=1, window=18, stride=6)
        return list(StreamLoader(r, specs, sched, start=0, total=5, seed=1, workers=workers))

    a, b = run(0), run(2)
    for (i1, v1, _), (i2, v2, _) in zip(a, b):
        assert torch.equal(i1, i2) and all(torch.equal(x, y) for x, y in zip(v1, v2))
    assert not torch.equal(a[0][1][0], a[0][1][1])   # two views of one item differ


def test_crop_box_is_torchvisions_random_resized_crop():
    rng = random.Random(0)
    for _ in range(500):
        h, w = rng.randint(20, 300), rng.randint(20, 300)
        t, l, bh, bw = crop_box(rng, h, w, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= t and t + bh <= h and 0 <= l and l + bw <= w and bh > 0 and bw > 0
    # a very wide image and an impossible scale fall back to the central crop clamped to the ratio
    assert crop_box(random.Random(0), 10, 100, (0.99, 1.0), (3 / 4, 4 / 3)) == (0, 43, 10, 13)


def test_device_decode_matches_cpu_decode(fake):
    """decode=device (torchvision.io, here on the CPU) cuts the same boxes as the PIL workers."""
    r = open_imagenet_zip(fake, "train")
    specs = [(24, (0.3, 1.0), (3 / 4, 4 / 3))]
    items = [(i, 1000 + i) for i in range(6)]
    cpu = ViewReader(r, specs, "cpu")
    dev = ViewReader(r, specs, "device")
    a = torch.stack([cpu[it][1][0] for it in items])
    got = [dev[it][1] for it in items]
    b = decode_on_device([g[0] for g in got], torch.stack([g[1] for g in got]), specs, "cpu")[0]
    assert a.shape == b.shape == (6, 3, 24, 24)
    assert (a.float() - b.float()).abs().mean() < 6   # two JPEG decoders and resamplers, same crops


def test_index_cache_is_reused_and_invalidated(tmp_path):
    root = tmp_path / "tree"
    make_fake_imagenet(str(root), classes=2, train_per_class=3, val_per_class=1, min_size=32, max_size=40,
                       layouts=("folder",))
    cache = str(tmp_path / "cache")
    folder = str(root / "train")
    first = index_folder(folder, cache)
    assert not first["cached"] and len(first["keys"]) == 6
    again = index_folder(folder, cache)
    assert again["cached"] and again["keys"] == first["keys"] and again["labels"] == first["labels"]
    # a new image in a class folder invalidates the index
    src = root / "train" / first["keys"][0]
    os.link(src, root / "train" / "n01441764" / "extra.JPEG")
    added = index_folder(folder, cache)
    assert not added["cached"] and len(added["keys"]) == 7 and "n01441764/extra.JPEG" in added["keys"]
    assert index_folder(folder, cache)["cached"]
    # a removed image, and a new nested folder, too
    os.remove(root / "train" / "n01441764" / "extra.JPEG")
    assert len(index_folder(folder, cache)["keys"]) == 6
    nested = root / "train" / "n01440764" / "more"
    nested.mkdir()
    os.link(src, nested / "deep.JPEG")
    idx = index_folder(folder, cache)
    assert not idx["cached"] and "n01440764/more/deep.JPEG" in idx["keys"]
    # a corrupt cache file is rebuilt
    for f in os.listdir(cache):
        (tmp_path / "cache" / f).write_text("{not json")
    assert not index_folder(folder, cache)["cached"] and index_folder(folder, cache)["cached"]
    # unlabelled flat folder
    flat = tmp_path / "flat"
    flat.mkdir()
    os.link(src, flat / "a.jpg")
    os.link(src, flat / "b.jpg")
    idx = index_folder(str(flat), None)
    assert idx["keys"] == ["a.jpg", "b.jpg"] and idx["labels"] == [-1, -1] and idx["classes"] == []


@pytest.fixture
def broken(tmp_path, fake):
    """A copy of the fake set's train folder and zip with a truncated JPEG, a corrupt JPEG and a
    text file named .JPEG."""
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(os.path.join(fake, "train"), root / "train")
    keys, labels = read_map(os.path.join(fake, "train_map.txt"))
    bad = {keys[3]: "truncated", keys[10]: "corrupt", keys[20]: "text"}
    for k, kind in bad.items():
        p = root / "train" / k
        data = p.read_bytes()
        if kind == "truncated":
            data = data[:len(data) // 2]
        elif kind == "corrupt":
            data = data[:200] + bytes(random.Random(0).randrange(256) for _ in range(len(data) - 200))
        else:
            data = b"this is not an image\n"
        p.write_bytes(data)
    with zipfile.ZipFile(root / "train.zip", "w") as z:
        for k in keys:
            z.write(root / "train" / k, k)
    (root / "train_map.txt").write_text("".join(f"{k}\t{y}\n" for k, y in zip(keys, labels)))
    return root, bad, keys


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_bad_images_are_named_or_skipped_and_counted(broken, layout, tmp_path):
    root, bad, keys = broken
    r = open_imagefolder(str(root), "train", index_cache=None) if layout == "folder" else \
        open_imagenet_zip(str(root), "train")
    found = r.scan()
    assert sorted(keys[i] for i, _ in found) == sorted(bad)
    for i, msg in found:
        assert keys[i] in msg
    # in memory: the first bad file is named; skip drops and counts them
    with pytest.raises(DatasetFormatError, match="cannot decode image .*" + keys[3].split("/")[1]):
        r.to_memory(32)
    with pytest.warns(UserWarning, match="skipped 3 unreadable"):
        ds = r.to_memory(32, on_error="skip")
    assert len(ds) == len(keys) - 3
    # streamed: raise names the file; skip substitutes the next image and reports the bad one
    specs = [(16, (0.2, 1.0), (3 / 4, 4 / 3))]
    with pytest.raises(DatasetFormatError, match=keys[3].split("/")[1]):
        ViewReader(r, specs)[(3, 0)]
    idx, views, where = ViewReader(r, specs, on_error="skip")[(3, 0)]
    assert idx == 3 and views[0].shape == (3, 16, 16) and keys[3] in where
    sched = build_index_schedule("epoch", len(r), 12, seed=0)
    skipped = [w for _, _, bad_items in StreamLoader(r, specs, sched, total=3, on_error="skip") for w in bad_items]
    assert sorted(w.split(":")[-1].split("/train/")[-1] for w in skipped) == sorted(bad)


def test_zip_map_naming_a_missing_member_fails_with_its_name(fake, tmp_path):
    import shutil

    root = tmp_path / "z"
    root.mkdir()
    shutil.copy(os.path.join(fake, "train.zip"), root / "train.zip")
    text = open(os.path.join(fake, "train_map.txt")).read() + "n01440764/n01440764_missing.JPEG\t0\n"
    (root / "train_map.txt").write_text(text)
    with pytest.raises(DatasetFormatError, match="n01440764_missing.JPEG"):
        open_imagenet_zip(str(root), "train")
    (root / "train_map.txt").write_text("n01440764/a.JPEG 0\nno-label-here\n")
    with pytest.raises(DatasetFormatError, match="line 2"):
        open_imagenet_zip(str(root), "train")
    with pytest.raises(DatasetNotFoundError, match="val.zip"):
        open_imagenet_zip(str(root), "test")


def _shard_indices(rank, world, root, part):
    r = open_imagenet_zip(root, "train")
    sched = build_index_schedule("epoch", len(r), 12, seed=5, partition_world=world if part else None)
    if part:
        r.cache(torch.arange(rank, len(r), world))
    specs = [(16, (0.2, 1.0), (3 / 4, 4 / 3))]
    return torch.cat([i for i, _, _ in StreamLoader(r, specs, sched, rank=rank, world=world,
                                                    total=sched.epoch_length, seed=5)])


@pytest.mark.parametrize("part", [False, True])
def test_rank_shards_are_disjoint_and_cover_the_set(fake, part):
    a, b = run_distributed(_shard_indices, 2, fake, part)
    assert len(a) == len(b) == 18
    assert not set(a.tolist()) & set(b.tolist()) and set(a.tolist()) | set(b.tolist()) == set(range(36))
    if part:   # each rank reads only its own partition (the items it cached)
        assert all(i % 2 == 0 for i in a.tolist()) and all(i % 2 == 1 for i in b.tolist())


def test_a_small_crop_of_a_large_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    """PIL draft (JPEG DCT scaling): a 32 px view of an 800 px photo decodes at 1/8 scale, a crop
    that needs the full resolution decodes at full size."""
    import selfsup.data.loader as L
    from selfsup.data.fake import encode_jpeg

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "big.jpg").write_bytes(encode_jpeg(torch.randint(0, 256, (3, 800, 800), dtype=torch.uint8)))
    r = open_imagefolder(str(tmp_path), "train", index_cache=None)
    sizes = []
    real = L.load_rgb
    monkeypatch.setattr(L, "load_rgb", lambda im, where: sizes.append(im.size) or real(im, where))
    whole = (1.0, 1.0), (1.0, 1.0)
    ViewReader(r, [(32, *whole)])[(0, 0)]
    ViewReader(r, [(800, *whole)])[(0, 0)]
    assert sizes == [(100, 100), (800, 800)]
