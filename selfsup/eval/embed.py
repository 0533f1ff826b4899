"""Export clean features of a split: arrays (npy or safetensors) and TensorBoard projector files.

Layout of an export folder OUT:
    features.npy (N x D float32), labels.npy (N int64, -1 when unlabelled), indices.npy (N int64,
    positions in the split)        -- or embeddings.safetensors holding the same three tensors
    embed.json                     -- what was exported (split, dims, class names, files); written last,
                                      removed first on a new export: the folder is complete when it is there
    projector/                     -- `tensorboard --logdir OUT/projector`, Projector tab:
        projector_config.pbtxt, tensors.tsv, metadata.tsv (label, class, index), sprite.png
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..atomic import replacing, write_json, write_text

SPRITE_MAX_SIDE = 8192   # the projector refuses larger sprites


def subset_indices(n: int, max_points: int | None, seed: int = 0) -> Tensor:
    """Sorted indices of a deterministic random subset of at most `max_points` of range(n)
    (all of them when `max_points` is None or >= n)."""
    if max_points is None or max_points >= n:
        return torch.arange(n)
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points].sort().values


def save_features(out: Path, feats: Tensor, labels: Tensor, indices: Tensor, fmt: str = "npy",
                  metadata: dict | None = None) -> list[str]:
    """Write features (float32), labels and indices (int64) to `out` as three .npy files or one
    embeddings.safetensors (with `metadata` as JSON strings in its header), each through a temporary
    file. Returns the paths."""
    if fmt not in ("npy", "safetensors"):
        raise ValueError(f"unknown format '{fmt}': choose npy or safetensors")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"features": feats.detach().float().cpu().contiguous(),
              "labels": labels.detach().to(torch.int64).cpu().contiguous(),
              "indices": indices.detach().to(torch.int64).cpu().contiguous()}
    if fmt == "npy":
        paths = []
        for name, t in arrays.items():
            with replacing(out / f"{name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, t.numpy())
            paths.append(str(out / f"{name}.npy"))
        return paths
    from safetensors.torch import save_file

    path = out / "embeddings.safetensors"
    with replacing(path) as tmp:
        save_file(arrays, str(tmp), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    return [str(path)]


def sprite_image(images: Tensor, max_side: int = SPRITE_MAX_SIDE):
    """(PIL RGB image, thumbnail side) of uint8 `images` (N, C, H, W) tiled row-major in a square
    grid of ceil(sqrt(N)) rows and columns (the projector expects a square sprite; unused cells are
    black); thumbnails are shrunk so the sprite stays within `max_side`."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = cols
    side = max(1, min(max(h, w), max_side // cols))
    x = images.cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x[:, :3]
    if (h, w) != (side, side):
        x = F.interpolate(x.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    grid = torch.zeros(rows * cols, 3, side, side, dtype=torch.uint8)
    grid[:n] = x
    grid = grid.view(rows, cols, 3, side, side).permute(0, 3, 1, 4, 2).reshape(rows * side, cols * side, 3)
    return Image.fromarray(grid.numpy(), "RGB"), side


def _clean(name: str) -> str:
    return " ".join(str(name).split()) or "?"


def write_projector(out: Path, feats: Tensor, labels: Tensor, indices: Tensor, classes: list[str],
                    images: Tensor, name: str = "features") -> dict:
    """TensorBoard projector files for the rows of `feats` (labels, split indices and uint8 images
    aligned with them) in folder `out`. Returns {"dir", "points", "sprite_side"}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = feats.detach().float().cpu().numpy()
    with replacing(out / "tensors.tsv") as tmp:
        np.savetxt(tmp, rows, fmt="%.6g", delimiter="\t")
    meta = ["label\tclass\tindex\n"]
    for y, i in zip(labels.tolist(), indices.tolist()):
        cls = _clean(classes[y]) if 0 <= y < len(classes) else "unlabelled"
        meta.append(f"{y}\t{cls}\t{i}\n")
    write_text(out / "metadata.tsv", "".join(meta))
    sprite, side = sprite_image(images)
    with replacing(out / "sprite.png") as tmp:
        sprite.save(tmp, format="PNG")
    write_text(out / "projector_config.pbtxt", (
        "embeddings {\n"
        f'  tensor_name: "{_clean(name)}"\n'
        f"  tensor_shape: {rows.shape[0]}\n"
        f"  tensor_shape: {rows.shape[1]}\n"
        '  tensor_path: "tensors.tsv"\n'
        '  metadata_path: "metadata.tsv"\n'
        "  sprite {\n"
        '    image_path: "sprite.png"\n'
        f"    single_image_dim: {side}\n"
        f"    single_image_dim: {side}\n"
        "  }\n"
        "}\n"))
    return {"dir": str(out), "points": int(rows.shape[0]), "sprite_side": side}


def export_embeddings(out: Path, feats: Tensor, dataset, fmt: str = "npy", max_points: int | None = 5000,
                      name: str = "features") -> dict:
    """Write every row of `feats` (one per image of `dataset`, an ImageDataset) with its label and
    index, embed.json, and the projector files for a deterministic subset of at most `max_points`
    rows (None: all). Returns a summary with the paths. Every file goes through a temporary file; the
    embed.json of an earlier export into `out` is removed before any of its files is replaced, and the
    new one is written last: a folder with an embed.json is complete."""
    out = Path(out)
    n = feats.shape[0]
    if n != len(dataset):
        raise ValueError(f"{n} feature rows for a dataset of {len(dataset)} images")
    (out / "embed.json").unlink(missing_ok=True)
    for tmp in [*out.glob("*.tmp"), *out.glob("projector/*.tmp")]:   # left by an export that was killed
        tmp.unlink(missing_ok=True)
    labels, indices = dataset.labels.cpu(), torch.arange(n)
    meta = {"split": dataset.name, "classes": list(dataset.classes), "name": name}
    files = save_features(out, feats, labels, indices, fmt, meta)
    sub = subset_indices(n, max_points)
    proj = write_projector(out / "projector", feats[sub.to(feats.device)], labels[sub], sub, dataset.classes,
                           dataset.images[sub.to(dataset.images.device)], name)
    summary = {"out": str(out), "format": fmt, "files": files, "num": n, "dim": int(feats.shape[1]),
               "dataset": dataset.name, "classes": list(dataset.classes), "projector": proj["dir"],
               "projector_points": proj["points"], "sprite_side": proj["sprite_side"], "name": name}
    write_json(out / "embed.json", summary)
    return summary
