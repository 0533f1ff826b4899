"""In-memory image datasets and a registry of loaders.

Every dataset is held in memory as one uint8 tensor of shape (N, C, H, W)
(C = 1 for grayscale, 3 for colour) plus an int64 label tensor of shape (N,),
with -1 marking unlabelled items. Loaders read the standard on-disk formats
themselves (idx, CIFAR python pickles, STL-10 binaries, image folders) and
raise errors that name the files involved.

Where they look: Fashion-MNIST in `root`, then $SELFSUP_DATA, then the system folder (see
SYSTEM_DATA_ENV_VAR). CIFAR and STL-10 only in `root` (or, when `root` is None, in
$SELFSUP_DATA), never in system folders; CIFAR batches are pickles, read with a restricted
unpickler that accepts only containers, bytes, str, numbers and numpy arrays.

Usage::

    ds = build_dataset("fashion-mnist", "train")
    image, label, index = ds[0]     # uint8 (1, 28, 28), int, int
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DatasetFormatError, DatasetNotFoundError
from .files import DEFAULT_INDEX_CACHE, open_imagefolder, open_imagenet_zip
from .images import IMAGE_EXTENSIONS, ImageDataset, require_labels

__all__ = [
    "ImageDataset",
    "DATASETS",
    "register_dataset",
    "build_dataset",
    "DatasetNotFoundError",
    "DatasetFormatError",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
    "STL10_CLASSES",
    "IMAGE_EXTENSIONS",
    "require_labels",
]

# Environment variable naming an extra base folder to search (before the system folder).
DATA_ENV_VAR = "SELFSUP_DATA"
# The system-wide folder searched last (`apt-get install dataset-fashion-mnist` puts its files in
# DEFAULT_SYSTEM_DATA/fashion-mnist); $SELFSUP_SYSTEM_DATA replaces it, and set to "" turns it off
# (the test suite does, so it never reads the machine's data).
SYSTEM_DATA_ENV_VAR = "SELFSUP_SYSTEM_DATA"
DEFAULT_SYSTEM_DATA = "/usr/share/datasets"


def system_dirs(*parts: str) -> list[str]:
    """[the system data folder joined with `parts`], or [] when $SELFSUP_SYSTEM_DATA is empty."""
    base = os.environ.get(SYSTEM_DATA_ENV_VAR, DEFAULT_SYSTEM_DATA)
    return [os.path.join(base, *parts)] if base else []


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer",
    "dog", "horse", "monkey", "ship", "truck",
]
# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #
DATASETS: dict[str, Callable[..., ImageDataset]] = {}


def register_dataset(name: str, splits: tuple[str, ...] = ("train", "test")) -> Callable:
    """Decorator registering `fn(split, root, download, image_size, on_error, **kw) -> ImageDataset`.

    `splits` lists the valid split names; build_dataset checks them before calling.
    """

    def decorator(fn: Callable[..., ImageDataset]) -> Callable[..., ImageDataset]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        fn.splits = tuple(splits)
        DATASETS[name] = fn
        return fn

    return decorator


def build_dataset(
    name: str,
    split: str,
    root: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    on_error: str = "raise",
    **kwargs,
) -> ImageDataset:
    """Load dataset `name`, split `split`, fully into memory.

    Args:
        name: registry name (see DATASETS); case-insensitive, "_" == "-".
        split: e.g. "train", "test" (stl10 also "unlabeled", "train+unlabeled").
        root: folder holding the data (searched first).
        download: if the data is not found, fetch it with torchvision's downloader.
        image_size: if given, images are resized to image_size x image_size
            (shorter side resized, then centre crop); required for image folders
            whose images differ in size.
        on_error: "raise" or "skip" for unreadable images (imagefolder only).
        **kwargs: passed to the loader (e.g. synthetic: num_samples, num_classes, seed).

    Returns:
        ImageDataset with images uint8 (N, C, H, W) and labels int64 (N,).
    """
    key = str(name).lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    loader = DATASETS[key]
    splits = getattr(loader, "splits", None)
    if splits is not None and split not in splits:
        raise ValueError(f"unknown split {split!r} for dataset {key!r}; valid splits: {', '.join(splits)}")
    if image_size is not None and int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return loader(split, root=root, download=download, image_size=image_size, on_error=on_error, **kwargs)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _candidate_dirs(root: str | None, subdirs: list[str], system: list[str], env: bool = True) -> list[str]:
    """Folders to search, in order: root (+subdirs), $SELFSUP_DATA (+subdirs) if `env`, system folders."""
    bases = [b for b in (root, os.environ.get(DATA_ENV_VAR) if env else None) if b]
    dirs = []
    for base in bases:
        base = os.path.expanduser(str(base))
        dirs.append(base)
        dirs.extend(os.path.join(base, s) for s in subdirs)
    dirs.extend(system)
    return list(dict.fromkeys(dirs))  # dedupe, keep order


def _not_found(what: str, files: list[str], dirs: list[str], hint: str, extra: str = "") -> DatasetNotFoundError:
    tried = "\n".join(f"  {d}" for d in dirs) or "  (no folders to search)"
    msg = f"{what} not found. Looked for {', '.join(files)} in:\n{tried}\nTo get it: {hint}"
    if extra:
        msg += f"\n{extra}"
    return DatasetNotFoundError(msg)


def _default_download_root(root: str | None) -> str:
    return os.path.expanduser(root or os.environ.get(DATA_ENV_VAR) or "~/.cache/selfsup/data")


def _torchvision_download(cls_name: str, root: str, **kw) -> str:
    """Run torchvision.datasets.<cls_name>(root, download=True, **kw).

    Returns "" on success, else a one-line description of the failure (for the not-found error).
    """
    try:
        import torchvision.datasets as tvd

        getattr(tvd, cls_name)(root, download=True, **kw)
        return ""
    except Exception as e:  # network errors, checksum failures, ...
        detail = " ".join(str(e).split())
        return (f"download=true was tried: torchvision.datasets.{cls_name} into {root} failed "
                f"({type(e).__name__}: {detail})")


def _resize_images(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) so the shorter side is `size`, centre-crop to (N, C, size, size)."""
    n, c, h, w = images.shape
    if h == size and w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for s in range(0, n, chunk):
        x = images[s : s + chunk].float()
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        out[s : s + chunk] = x[:, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
    return out


def _finish(images: torch.Tensor, labels: torch.Tensor, classes: list[str], name: str,
            image_size: int | None, source: str) -> ImageDataset:
    """Check non-empty, optionally resize, wrap in ImageDataset."""
    if images.shape[0] == 0:
        raise ValueError(f"{name}: dataset is empty (0 images) in {source}")
    if image_size is not None:
        images = _resize_images(images, int(image_size))
    return ImageDataset(images=images.contiguous(), labels=labels.to(torch.int64), classes=list(classes), name=name)


# --------------------------------------------------------------------------- #
# Fashion-MNIST (idx format)
# --------------------------------------------------------------------------- #
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FMNIST_HINT = (
    "apt-get install -y dataset-fashion-mnist (installs to {system}), or pass data.root=DIR containing "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz (un-gzipped files also work), or set data.download=true where the network allows"
)


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Parse an idx file (gzipped if `path` ends in .gz).

    Args:
        path: file path.
        expected_magic: 0x00000803 for images (N, H, W), 0x00000801 for labels (N,).

    Returns:
        uint8 numpy array with the dims stored in the header.

    Raises:
        DatasetFormatError naming `path` for bad gzip, wrong magic or wrong size.
    """
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetFormatError(f"cannot read idx file {path}: {e}") from e
    if len(data) < 4:
        raise DatasetFormatError(f"idx file {path} is truncated ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DatasetFormatError(
            f"idx file {path} has magic 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(wrong file or corrupt)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(f"idx file {path} is truncated (header incomplete)")
    dims = [int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4)]
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise DatasetFormatError(
            f"idx file {path} has {len(data)} bytes, expected {expected} for dims {dims} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: str, base: str) -> str | None:
    for cand in (base + ".gz", base):
        p = os.path.join(folder, cand)
        if os.path.isfile(p):
            return p
    return None


@register_dataset("fashion-mnist", splits=("train", "test"))
def load_fashion_mnist(split: str, root: str | None = None, download: bool = False,
                       image_size: int | None = None, on_error: str = "raise") -> ImageDataset:
    """Fashion-MNIST from idx(.gz) files. Returns images uint8 (N, 1, 28, 28), labels 0..9."""
    img_base, lbl_base = _FMNIST_FILES[split]
    subdirs = [os.path.join("FashionMNIST", "raw"), "fashion-mnist"]
    dirs = _candidate_dirs(root, subdirs, system_dirs("fashion-mnist"))
    found, extra = None, ""
    for d in dirs:
        ip, lp = _find_idx(d, img_base), _find_idx(d, lbl_base)
        if ip and lp:
            found = (ip, lp)
            break
    if found is None and download:
        droot = _default_download_root(root)
        extra = _torchvision_download("FashionMNIST", droot, train=(split == "train"))
        d = os.path.join(droot, "FashionMNIST", "raw")
        ip, lp = _find_idx(d, img_base), _find_idx(d, lbl_base)
        if ip and lp:
            found = (ip, lp)
        elif d not in dirs:
            dirs.append(d)
    if found is None:
        raise _not_found(
            f"Fashion-MNIST {split} split",
            [img_base + "[.gz]", lbl_base + "[.gz]"],
            dirs,
            _FMNIST_HINT.format(system=os.path.join(DEFAULT_SYSTEM_DATA, "fashion-mnist")),
            extra,
        )
    ip, lp = found
    images = read_idx(ip, 0x00000803)
    labels = read_idx(lp, 0x00000801)
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(f"{ip} has {images.shape[0]} images but {lp} has {labels.shape[0]} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DatasetFormatError(f"{lp} has label {int(labels.max())} outside 0..9")
    images_t = torch.from_numpy(images.copy()).unsqueeze(1)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    return _finish(images_t, labels_t, FASHION_MNIST_CLASSES, f"fashion-mnist/{split}", image_size, ip)


# --------------------------------------------------------------------------- #
# CIFAR-10 / CIFAR-100 (python pickles)
# --------------------------------------------------------------------------- #
def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a CIFAR batch may name: numpy array, dtype and scalar reconstruction (under the
    numpy 1 `numpy.core` and numpy 2 `numpy._core` names), and `_codecs.encode` (how pickle protocol
    < 3 writes bytes)."""
    import codecs

    try:
        from numpy._core import multiarray, numeric
    except ImportError:   # numpy 1
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain containers, bytes, str, numbers and numpy arrays only: any other global
    (os.system, builtins.eval, ...) is refused before it is called, so a crafted file runs no code."""

    def __init__(self, f, path: str):
        super().__init__(f, encoding="bytes")
        self.path, self.allowed = path, _numpy_globals()

    def find_class(self, module: str, name: str):
        obj = self.allowed.get((module, name))
        if obj is None:
            raise DatasetFormatError(
                f"{self.path} is not a CIFAR python batch: it asks to load the global {module}.{name}, "
                f"which is refused (a genuine batch holds only lists, bytes and numpy arrays); "
                f"replace it with the file from the official archive")
        return obj


def _unpickle(path: str) -> dict:
    """The dict in a CIFAR python batch, read with a restricted unpickler (see _BatchUnpickler)."""
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, path).load()
    except DatasetFormatError:
        raise
    except Exception as e:
        raise DatasetFormatError(f"cannot unpickle {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path} does not hold a dict (got {type(obj).__name__})")
    return obj


def _get(d: dict, key: str, path: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetFormatError(f"{path} has no {key!r} entry (keys: {list(d)[:8]})")


def _load_cifar(split: str, root: str | None, download: bool, image_size: int | None, *,
                name: str, folder: str, train_files: list[str], test_files: list[str],
                meta_file: str, label_key: str, names_key: str, tv_class: str,
                default_classes: list[str] | None) -> ImageDataset:
    files = train_files if split == "train" else test_files
    dirs = _candidate_dirs(root, [folder], [], env=root is None)
    found = next((d for d in dirs if all(os.path.isfile(os.path.join(d, f)) for f in files)), None)
    extra = ""
    if found is None and download:
        droot = _default_download_root(root)
        extra = _torchvision_download(tv_class, droot, train=(split == "train"))
        d = os.path.join(droot, folder)
        if all(os.path.isfile(os.path.join(d, f)) for f in files):
            found = d
        elif d not in dirs:
            dirs.append(d)
    if found is None:
        raise _not_found(
            f"{name} {split} split", files, dirs,
            f"pass data.root=DIR containing {folder}/ (the CIFAR 'python version' archive, "
            f"extracted), or set data.download=true where the network allows",
            extra,
        )
    images, labels = [], []
    for fname in files:
        path = os.path.join(found, fname)
        batch = _unpickle(path)
        data = np.asarray(_get(batch, "data", path))
        lab = np.asarray(_get(batch, label_key, path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != lab.shape[0]:
            raise DatasetFormatError(
                f"{path}: expected uint8 data (N, 3072) and N labels, got {data.dtype} {data.shape} "
                f"and {lab.shape[0]} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    classes = default_classes
    meta_path = os.path.join(found, meta_file)
    if os.path.isfile(meta_path):
        names = _get(_unpickle(meta_path), names_key, meta_path)
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    if classes is None:
        raise DatasetNotFoundError(f"{name}: class-name file {meta_path} not found")
    images_t = torch.from_numpy(np.concatenate(images))
    labels_t = torch.from_numpy(np.concatenate(labels))
    if labels_t.numel() and (labels_t.min() < 0 or labels_t.max() >= len(classes)):
        raise DatasetFormatError(f"{name}: labels in {found} fall outside 0..{len(classes) - 1}")
    return _finish(images_t, labels_t, classes, f"{name}/{split}", image_size, found)


@register_dataset("cifar10", splits=("train", "test"))
def load_cifar10(split: str, root: str | None = None, download: bool = False,
                 image_size: int | None = None, on_error: str = "raise") -> ImageDataset:
    """CIFAR-10 from root/cifar-10-batches-py (or root itself). Images uint8 (N, 3, 32, 32), labels 0..9."""
    return _load_cifar(
        split, root, download, image_size, name="cifar10", folder="cifar-10-batches-py",
        train_files=[f"data_batch_{i}" for i in range(1, 6)], test_files=["test_batch"],
        meta_file="batches.meta", label_key="labels", names_key="label_names", tv_class="CIFAR10",
        default_classes=CIFAR10_CLASSES,
    )


@register_dataset("cifar100", splits=("train", "test"))
def load_cifar100(split: str, root: str | None = None, download: bool = False,
                  image_size: int | None = None, on_error: str = "raise") -> ImageDataset:
    """CIFAR-100 (fine labels) from root/cifar-100-python (or root itself).

    Images uint8 (N, 3, 32, 32), labels 0..99.
    """
    return _load_cifar(
        split, root, download, image_size, name="cifar100", folder="cifar-100-python",
        train_files=["train"], test_files=["test"], meta_file="meta", label_key="fine_labels",
        names_key="fine_label_names", tv_class="CIFAR100", default_classes=None,
    )


# --------------------------------------------------------------------------- #
# STL-10 (binary)
# --------------------------------------------------------------------------- #
_STL_FILES = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}


def _read_stl_images(path: str) -> np.ndarray:
    """Read an STL-10 *_X.bin file -> uint8 (N, 3, 96, 96) (stored column-major, so transpose H/W)."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DatasetFormatError(f"cannot read {path}: {e}") from e
    per = 3 * 96 * 96
    if raw.size % per:
        raise DatasetFormatError(f"{path} has {raw.size} bytes, not a multiple of 3*96*96 (truncated or corrupt)")
    return raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)


@register_dataset("stl10", splits=("train", "test", "unlabeled", "train+unlabeled"))
def load_stl10(split: str, root: str | None = None, download: bool = False,
               image_size: int | None = None, on_error: str = "raise") -> ImageDataset:
    """STL-10 from root/stl10_binary (or root itself). Images uint8 (N, 3, 96, 96); labels 0..9, -1 unlabelled."""
    parts = split.split("+")
    needed = [f for p in parts for f in _STL_FILES[p] if f]
    dirs = _candidate_dirs(root, ["stl10_binary"], [], env=root is None)
    found = next((d for d in dirs if all(os.path.isfile(os.path.join(d, f)) for f in needed)), None)
    extra = ""
    if found is None and download:
        droot = _default_download_root(root)
        extra = _torchvision_download("STL10", droot, split=split)
        d = os.path.join(droot, "stl10_binary")
        if all(os.path.isfile(os.path.join(d, f)) for f in needed):
            found = d
        elif d not in dirs:
            dirs.append(d)
    if found is None:
        raise _not_found(
            f"stl10 {split} split", needed, dirs,
            "pass data.root=DIR containing stl10_binary/ (extracted stl10_binary.tar.gz), "
            "or set data.download=true where the network allows",
            extra,
        )
    images, labels = [], []
    for p in parts:
        xf, yf = _STL_FILES[p]
        x = _read_stl_images(os.path.join(found, xf))
        if yf is None:
            y = np.full(x.shape[0], -1, dtype=np.int64)
        else:
            ypath = os.path.join(found, yf)
            y = np.fromfile(ypath, dtype=np.uint8).astype(np.int64) - 1
            if y.shape[0] != x.shape[0]:
                raise DatasetFormatError(f"{ypath} has {y.shape[0]} labels but {xf} has {x.shape[0]} images")
            if y.size and (y.min() < 0 or y.max() > 9):
                raise DatasetFormatError(f"{ypath} has labels outside 1..10")
        images.append(torch.from_numpy(np.ascontiguousarray(x)))
        labels.append(torch.from_numpy(y))
    classes = STL10_CLASSES
    names_path = os.path.join(found, "class_names.txt")
    if os.path.isfile(names_path):
        with open(names_path) as f:
            classes = [line.strip() for line in f if line.strip()]
    images_t = images[0] if len(images) == 1 else torch.cat(images)
    labels_t = labels[0] if len(labels) == 1 else torch.cat(labels)
    return _finish(images_t, labels_t, classes, f"stl10/{split}", image_size, found)


# --------------------------------------------------------------------------- #
# Image folders and zipped ImageNet (decoded into memory; selfsup.data.files streams them)
# --------------------------------------------------------------------------- #
@register_dataset("imagefolder", splits=("train", "test"))
def load_imagefolder(split: str, root: str | None = None, download: bool = False,
                     image_size: int | None = None, on_error: str = "raise",
                     num_workers: int | None = None, file_list: str | None = None,
                     index_cache: str | None = DEFAULT_INDEX_CACHE, labels: str = "auto") -> ImageDataset:
    """Images from a folder, decoded into memory. Returns images uint8 (N, 3, H, W), H = W = image_size if given.

    The split folder is root/<split> (test also accepts root/val); for "train"
    root itself is used when it has no train/test/val sub-folders. In the split
    folder, class sub-folders give a labelled set (classes = sorted folder names,
    images found recursively); otherwise the images directly in it form an
    unlabelled set (labels -1, classes []). `file_list` (a path; "{split}" is
    replaced by the split) lists "path[<TAB>label]" lines instead. The file index
    is cached in `index_cache` (see selfsup.data.files). `labels="none"`: every image
    found below the split folder, unlabelled, whatever its sub-folders.
    """
    return open_imagefolder(root, split, file_list, index_cache, labels).to_memory(image_size, on_error, num_workers)


@register_dataset("imagenet-zip", splits=("train", "test"))
def load_imagenet_zip(split: str, root: str | None = None, download: bool = False,
                      image_size: int | None = None, on_error: str = "raise",
                      num_workers: int | None = None) -> ImageDataset:
    """ImageNet in PIC's zip layout (root/train.zip + train_map.txt, root/val.zip + val_map.txt; the
    test split reads val), decoded into memory: images uint8 (N, 3, image_size, image_size). Large sets
    stream instead (data.stream=true, the default for imagenet-zip in training)."""
    return open_imagenet_zip(root, split).to_memory(image_size, on_error, num_workers)


# --------------------------------------------------------------------------- #
# Synthetic
# --------------------------------------------------------------------------- #
@register_dataset("synthetic", splits=("train", "test"))
def load_synthetic(split: str, root: str | None = None, download: bool = False,
                   image_size: int | None = None, on_error: str = "raise",
                   num_samples: int | None = None, num_classes: int = 10, seed: int = 0) -> ImageDataset:
    """Procedural oriented-grating images, deterministic from `seed` (train and test use different seeds).

    Class c is a sinusoidal grating with orientation pi*c/num_classes and one of
    three spatial frequencies, shown inside a Gaussian window. Per image the
    window position and width, phase, orientation (+-1/4 of the class spacing),
    frequency (+-12%), foreground/background colours and pixel noise are random,
    so colour and position carry no class information.

    Returns:
        ImageDataset with images uint8 (N, 3, S, S), S = image_size or 32;
        N = num_samples or 2000 (train) / 500 (test); labels balanced in 0..num_classes-1.
    """
    size = int(image_size or 32)
    n = int(num_samples if num_samples is not None else (2000 if split == "train" else 500))
    k = int(num_classes)
    if k < 1 or n < 0:
        raise ValueError(f"synthetic: need num_classes >= 1 and num_samples >= 0, got {k}, {n}")
    g = torch.Generator().manual_seed(int(seed) * 2 + (0 if split == "train" else 1))

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    cls = labels.float()
    theta = math.pi * cls / k + (rand(n) - 0.5) * (math.pi / k) * 0.5
    freq = (2.5 + 2.0 * (labels % 3).float()) * (0.88 + 0.24 * rand(n))   # cycles per image
    phase = 2 * math.pi * rand(n)
    cx, cy = 0.3 + 0.4 * rand(n), 0.3 + 0.4 * rand(n)
    sigma = 0.22 + 0.15 * rand(n)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)
    ct, st = torch.cos(theta).view(n, 1, 1), torch.sin(theta).view(n, 1, 1)
    u = xx * ct + yy * st
    wave = 0.5 + 0.5 * torch.sin(2 * math.pi * freq.view(n, 1, 1) * u + phase.view(n, 1, 1))
    env = torch.exp(-((xx - cx.view(n, 1, 1)) ** 2 + (yy - cy.view(n, 1, 1)) ** 2) / (2 * sigma.view(n, 1, 1) ** 2))
    mix = (wave * env).unsqueeze(1)                               # (n, 1, S, S) in [0, 1]
    bg = rand(n, 3, 1, 1)
    fg = (bg + 0.3 + 0.4 * rand(n, 3, 1, 1)) % 1.0                 # every channel differs by >= 0.3
    img = bg + (fg - bg) * mix + 0.06 * torch.randn(n, 3, size, size, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    classes = [f"grating{c}" for c in range(k)]
    return _finish(images, labels.to(torch.int64), classes, f"synthetic/{split}", None, "synthetic generator")
