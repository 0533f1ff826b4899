"""data.decode=device (torchvision.io in the main process; here on the CPU) treats a file it cannot
decode as data.decode=cpu does: on_error=raise names it, on_error=skip replaces it by the next
readable item and reports it. A PNG among the JPEGs decodes."""
import io
import os
import shutil
import zipfile

import pytest
import torch
from PIL import Image

from selfsup.data.datasets import DatasetFormatError
from selfsup.data.fake import make_fake_imagenet
from selfsup.data.files import open_imagefolder, open_imagenet_zip, read_map
from selfsup.data.loader import StreamLoader
from selfsup.data.samplers import build_index_schedule

SPECS = [(16, (0.2, 1.0), (3 / 4, 4 / 3))]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet"))
    make_fake_imagenet(root, classes=2, train_per_class=6, val_per_class=1, min_size=40, max_size=80)
    return root


def _spoil(fake, root, layout, kinds):
    """A copy of the fake train set with keys[i] replaced per `kinds` {i: "truncated" | "garbage" | "png"};
    returns (the set, keys)."""
    shutil.copytree(os.path.join(fake, "train"), root / "train")
    keys, labels = read_map(os.path.join(fake, "train_map.txt"))
    for i, kind in kinds.items():
        p = root / "train" / keys[i]
        data = p.read_bytes()
        if kind == "truncated":   # the header parses: only a full decode finds it
            data = data[:len(data) // 2]
        elif kind == "garbage":
            data = b"this is not an image\n"
        else:
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buf, "PNG")
            data = buf.getvalue()
        p.write_bytes(data)
    with zipfile.ZipFile(root / "train.zip", "w") as z:
        for k in keys:
            z.write(root / "train" / k, k)
    (root / "train_map.txt").write_text("".join(f"{k}\t{y}\n" for k, y in zip(keys, labels)))
    r = open_imagefolder(str(root), "train", index_cache=None) if layout == "folder" else \
        open_imagenet_zip(str(root), "train")
    return r, keys


def _epoch(r, decode, on_error):
    sched = build_index_schedule("epoch", len(r), 4, seed=0)
    return list(StreamLoader(r, SPECS, sched, total=len(r) // 4, seed=2, decode=decode, on_error=on_error))


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_device_decode_names_a_file_it_cannot_decode(fake, tmp_path, layout):
    r, keys = _spoil(fake, tmp_path, layout, {2: "truncated", 7: "png"})
    for decode in ("cpu", "device"):
        with pytest.raises(DatasetFormatError, match=f"cannot decode image .*{keys[2]}"):
            _epoch(r, decode, "raise")
    assert (":" in r.where(2)) == (layout == "zip")   # the folder names the path, the zip zip:member


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_device_decode_skips_as_cpu_decode_does(fake, tmp_path, layout):
    # 2 and 3 unreadable in a row: 2 and 3 are both replaced by 4; 7 is a PNG, decoded
    r, _ = _spoil(fake, tmp_path, layout, {2: "truncated", 3: "garbage", 7: "png"})
    cpu, dev = _epoch(r, "cpu", "skip"), _epoch(r, "device", "skip")
    assert sorted(w for _, _, bad in dev for w in bad) == sorted([r.where(2), r.where(3)])
    for (i1, v1, bad1), (i2, v2, bad2) in zip(cpu, dev):
        assert torch.equal(i1, i2) and bad1 == bad2
        assert v1[0].shape == v2[0].shape == (4, 3, 16, 16)
        # the same item and crop box through two JPEG decoders and resamplers: < 6 here, another item > 15
        assert ((v1[0].float() - v2[0].float()).abs().mean((1, 2, 3)) < 10).all()
