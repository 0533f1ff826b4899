"""A small ImageNet-like image set on disk, for tests, demos and `selfsup bench data`.

``make_fake_imagenet(root)`` writes JPEGs of varying size and aspect ratio (the procedural gratings
of the ``synthetic`` dataset, so classes are learnable) in both layouts selfsup reads::

    root/train/<wnid>/<wnid>_<k>.JPEG   root/val/<wnid>/<wnid>_<k>.JPEG      (imagefolder)
    root/train.zip  root/train_map.txt  root/val.zip  root/val_map.txt       (imagenet-zip)

Command line: ``selfsup fake-imagenet OUT [--classes 4 --train-per-class 50 --val-per-class 10]``.
"""
from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import load_synthetic

__all__ = ["make_fake_imagenet", "encode_jpeg"]


def encode_jpeg(image: torch.Tensor, quality: int = 90) -> bytes:
    """uint8 (3, H, W) -> JPEG bytes (PIL)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_fake_imagenet(root: str, classes: int = 4, train_per_class: int = 50, val_per_class: int = 10,
                       min_size: int = 64, max_size: int = 160, seed: int = 0, layouts=("folder", "zip")) -> dict:
    """Write the set (see the module docstring); returns {"root", "train", "val", "classes"}.

    Image sides are drawn in [min_size, max_size] independently (aspect ratios up to max/min)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    wnids = [f"n{1440764 + 1000 * c:08d}" for c in range(classes)]
    counts = {}
    for split, per_class, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
        n = classes * per_class
        blobs, done, chunk = [], 0, max(1, 64 // classes)
        while done < per_class:   # a few images per class at a time: memory stays small at any size
            m = min(chunk, per_class - done)
            src = load_synthetic("train", image_size=max_size, num_samples=m * classes, num_classes=classes,
                                 seed=split_seed * 100003 + done)   # balanced: m images of every class
            for i in range(len(src)):
                h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
                img = F.interpolate(src.images[i][None].float(), size=(h, w), mode="bilinear", antialias=True,
                                    align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
                blobs.append((int(src.labels[i]), encode_jpeg(img)))
            done += m
        blobs.sort(key=lambda b: b[0])   # stable: class by class
        lines, named = [], []
        for k, (c, data) in enumerate(blobs):
            name = f"{wnids[c]}/{wnids[c]}_{k:05d}.JPEG"
            lines.append(f"{name}\t{c}\n")
            named.append((name, data))
        blobs = named
        if "folder" in layouts:
            for name, data in blobs:
                path = os.path.join(root, split, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
        if "zip" in layouts:
            with zipfile.ZipFile(os.path.join(root, f"{split}.zip"), "w", zipfile.ZIP_STORED) as z:
                for name, data in blobs:
                    z.writestr(name, data)
            with open(os.path.join(root, f"{split}_map.txt"), "w") as f:
                f.writelines(lines)
        counts[split] = n
    return {"root": root, **counts, "classes": wnids}
