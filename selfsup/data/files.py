"""File-backed image sets for ImageNet-scale data: image folders (with a cached file index), file
lists, and zipped ImageNet with map files (PIC's layout), read without extracting.

A :class:`FileImageSet` is a list of keys (file paths, or member names of a zip), labels and
class names, and a *store* that turns a key into bytes. It is what the loader's workers read
(see :mod:`selfsup.data.loader`); ``to_memory`` decodes it into an in-memory
:class:`~selfsup.data.datasets.ImageDataset` for small sets.

Layouts::

    imagefolder   ROOT/train/<class>/**/*.jpg  (or ROOT/<class>/..., or flat files: unlabelled)
                  data.labels=none: every image below ROOT (or ROOT/train), unlabelled, whatever the folders
                  ROOT/val/<class>/... (test split), or data.file_list=LIST (lines "path[<TAB>label]")
    imagenet-zip  ROOT/train.zip, ROOT/train_map.txt, ROOT/val.zip, ROOT/val_map.txt;
                  each map line "relative/path.JPEG<TAB>label"

The folder index (the sorted file list and labels) is written once to
``data.index_cache`` (default ``~/.cache/selfsup/index``) and reused while the modification
times of the folder and every sub-folder are unchanged (adding, removing or renaming a file
changes its folder's time), so millions of files are not re-listed at every start.
Symlinked folders are followed, each real folder at most once (a symlink loop, or a second
link to a folder already listed, is skipped), so indexing ends and lists no file twice.

Images are decoded to 8-bit RGB; 16-bit images (e.g. 16-bit grayscale PNG) are scaled to 8 bits
(value / 257), not clipped.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import DatasetFormatError, DatasetNotFoundError
from .images import IMAGE_EXTENSIONS, ImageDataset

__all__ = ["FileImageSet", "FolderStore", "ZipStore", "index_folder", "read_file_list", "read_map",
           "open_imagefolder", "open_imagenet_zip", "decode_bytes", "CACHE_MODES", "DEFAULT_INDEX_CACHE",
           "STREAMABLE"]

INDEX_VERSION = 2   # 2: symlinked folders listed once (a version-1 index may hold loop duplicates)
CACHE_MODES = ("none", "full", "part")
DEFAULT_INDEX_CACHE = "~/.cache/selfsup/index"   # where imagefolder file indexes go (config: data.index_cache)
STREAMABLE = ("imagefolder", "imagenet-zip")     # the file-backed sets: read from files step by step or decoded


def _is_image(fname: str) -> bool:
    return fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith(".")


# --------------------------------------------------------------------------- #
# Stores: key -> bytes
# --------------------------------------------------------------------------- #
class FolderStore:
    """Files under `root`; keys are paths relative to it."""

    def __init__(self, root: str):
        self.root = root

    def read(self, key: str) -> bytes:
        with open(os.path.join(self.root, key), "rb") as f:
            return f.read()

    def where(self, key: str) -> str:
        return os.path.join(self.root, key)


class ZipStore:
    """Members of one zip file, read without extracting. Each process (DataLoader worker) opens
    its own handle on first use, so forked workers never share a file position."""

    def __init__(self, path: str):
        self.path = path
        self._zip, self._pid, self._lock = None, None, threading.Lock()

    def __getstate__(self):   # workers started with spawn get a fresh handle
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def handle(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (OSError, zipfile.BadZipFile) as e:
                raise DatasetFormatError(f"cannot open zip file {self.path}: {e}") from e
            self._pid = os.getpid()
        return self._zip

    def read(self, key: str) -> bytes:
        """The bytes of member `key`; DatasetFormatError naming zip:member when it is missing or
        does not read back (bad CRC, corrupt deflate data, truncated member), so data.on_error=skip
        can skip it."""
        with self._lock:   # one handle per process; threads (indexing, to_memory) take turns
            try:
                return self.handle().read(key)
            except KeyError:
                raise DatasetFormatError(f"zip file {self.path} has no member {key}") from None
            except DatasetFormatError:   # the zip itself does not open (handle() names it)
                raise
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
                    NotImplementedError, RuntimeError) as e:
                raise DatasetFormatError(f"cannot read {self.where(key)}: {type(e).__name__}: {e} "
                                         "(corrupt or truncated zip member)") from e

    def where(self, key: str) -> str:
        return f"{self.path}:{key}"


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #
def decode_bytes(data: bytes, where: str):
    """PIL RGB image of encoded `data` (the header only: pixels decode lazily, so `draft` can still
    shrink a JPEG). DatasetFormatError naming `where` for anything PIL cannot read."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.size  # noqa: B018  (header parsed)
        return im
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetFormatError(f"cannot decode image {where}: {type(e).__name__}: {e}") from e


def load_rgb(im, where: str):
    """Decode the pixels of a lazily opened PIL image to RGB; DatasetFormatError naming `where`
    for corrupt or truncated data."""
    from PIL import Image

    try:
        im.load()
        return _to_8bit(im).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetFormatError(f"cannot decode image {where}: {type(e).__name__}: {e}") from e


def _to_8bit(im):
    """A 16-bit grayscale image (modes I;16*, or I holding values above 255) scaled to mode L by
    value / 257 (rounded), so 0..65535 maps to 0..255 instead of being clipped at 255. PIL already
    reduces 16-bit RGB(A) PNGs to 8 bits."""
    from PIL import Image

    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    a = np.asarray(im).astype(np.int64)
    if im.mode == "I" and a.size and a.max() <= 255 and a.min() >= 0:
        return Image.fromarray(a.astype(np.uint8), "L")   # 8-bit values stored in a 32-bit image
    a = (np.clip(a, 0, 65535) + 128) // 257
    return Image.fromarray(a.astype(np.uint8), "L")


def _draft_size(wh: tuple[int, int], size: int) -> tuple[int, int]:
    """The smallest (w, h) with shorter side `size` and the aspect ratio of `wh`."""
    w, h = wh
    scale = size / min(w, h)
    return max(size, round(w * scale)), max(size, round(h * scale))


def resize_center(im, size: int | None):
    """Decoded PIL image -> shorter side resized to `size` (bicubic), centre crop size x size
    (None: unchanged)."""
    from PIL import Image

    if size is None:
        return im
    nw, nh = _draft_size(im.size, size)
    w, h = im.size
    left, top = (nw - size) / 2 * w / nw, (nh - size) / 2 * h / nh
    return im.resize((size, size), Image.BICUBIC, box=(left, top, left + size * w / nw, top + size * h / nh))


# --------------------------------------------------------------------------- #
# Index: folder, file list, map file
# --------------------------------------------------------------------------- #
def _walk_once(top: str, seen: set[str]):
    """os.walk(top) following directory symlinks, but entering each real directory at most once:
    a sub-folder whose real path is in `seen` (already listed, or an ancestor: a symlink loop) is
    skipped, so loops end and no file is listed twice. Hidden folders are skipped. Yields
    (dirpath, sorted file names)."""
    for dirpath, dirnames, fnames in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        yield dirpath, sorted(fnames)


def _dir_times(folder: str) -> dict[str, int]:
    """{relative dir: mtime_ns} of `folder` and every folder below it."""
    return {os.path.relpath(dirpath, folder): os.stat(dirpath).st_mtime_ns
            for dirpath, _ in _walk_once(folder, {os.path.realpath(folder)})}


def _times_unchanged(folder: str, times: dict[str, int]) -> bool:
    try:
        return all(os.stat(os.path.join(folder, d)).st_mtime_ns == t for d, t in times.items())
    except OSError:
        return False


def _walk_folder(folder: str, labelled: bool = True) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, labels, classes): class sub-folders (images found recursively) give labels
    0..C-1 in sorted order; with none, the images directly in `folder` are unlabelled (-1).
    `labelled=False` (data.labels=none): every image in `folder` and below, unlabelled, no classes."""
    if not labelled:
        keys = []
        for dirpath, fnames in _walk_once(folder, {os.path.realpath(folder)}):
            rel = os.path.relpath(dirpath, folder)
            keys.extend(os.path.normpath(os.path.join(rel, f)) for f in fnames if _is_image(f))
        return keys, [-1] * len(keys), []
    subdirs = sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
    keys, labels, classes = [], [], []
    # a class folder is listed only under its own name (a symlink to it from elsewhere is skipped)
    tops = {d: os.path.realpath(os.path.join(folder, d)) for d in subdirs}
    seen = {os.path.realpath(folder), *tops.values()}
    listed = set()
    for d in subdirs:
        if tops[d] in listed:   # a second name (symlink) for a class folder already listed
            continue
        listed.add(tops[d])
        found = []
        for dirpath, fnames in _walk_once(os.path.join(folder, d), seen):
            rel = os.path.relpath(dirpath, folder)
            found.extend(os.path.join(rel, f) for f in fnames if _is_image(f))
        if found:
            labels.extend([len(classes)] * len(found))
            classes.append(d)
            keys.extend(found)
    if not classes:
        keys = sorted(f for f in os.listdir(folder) if _is_image(f) and os.path.isfile(os.path.join(folder, f)))
        labels = [-1] * len(keys)
    return keys, labels, classes


def index_folder(folder: str, cache_dir: str | None = DEFAULT_INDEX_CACHE, rebuild: bool = False,
                 labelled: bool = True) -> dict:
    """The file index of `folder`: {"keys", "labels", "classes", "cached"} (cached: read from the
    index cache). With `cache_dir` (None: no cache) the index is stored as JSON named by the
    folder's absolute path and reused while no folder below `folder` changed. `labelled=False`:
    every image below `folder`, unlabelled (data.labels=none; cached under its own name)."""
    folder = os.path.abspath(folder)
    path = None
    if cache_dir:
        cache_dir = os.path.expanduser(str(cache_dir))
        name = hashlib.sha1(folder.encode()).hexdigest()[:20] + ("" if labelled else "-unlabelled")
        path = os.path.join(cache_dir, name + ".json")
        if not rebuild and os.path.isfile(path):
            try:
                with open(path) as f:
                    idx = json.load(f)
                if idx.get("version") == INDEX_VERSION and idx.get("folder") == folder and \
                        _times_unchanged(folder, idx["dir_times"]):
                    return {"keys": idx["keys"], "labels": idx["labels"], "classes": idx["classes"], "cached": True}
            except (OSError, ValueError, KeyError):
                pass   # unreadable or stale cache: rebuild it
    times = _dir_times(folder)
    keys, labels, classes = _walk_folder(folder, labelled)
    if path and _times_unchanged(folder, times):   # the tree did not change while it was listed
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(cache_dir, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"version": INDEX_VERSION, "folder": folder, "dir_times": times, "keys": keys,
                           "labels": labels, "classes": classes}, f)
            os.replace(tmp, path)
        except OSError as e:   # the cache is optional: a read-only or full place costs only the next listing
            print(f"[selfsup] folder index not cached ({e.strerror}: {e.filename or cache_dir}); "
                  "set data.index_cache to a writable folder, or null", file=sys.stderr)
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return {"keys": keys, "labels": labels, "classes": classes, "cached": False}


def read_file_list(path: str) -> tuple[list[str], list[int]]:
    """Lines "path" or "path<TAB>label" (blank lines and '#' comments skipped); relative paths are
    relative to the list's folder. Returns (paths, labels), label -1 where none is given."""
    return _read_lines(path, need_label=False)


def read_map(path: str) -> tuple[list[str], list[int]]:
    """A PIC/Swin map file: lines "relative/path.JPEG<TAB>label" -> (member names, labels)."""
    return _read_lines(path, need_label=True)


def _read_lines(path: str, need_label: bool) -> tuple[list[str], list[int]]:
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"{'map' if need_label else 'file list'} {path} not found")
    keys, labels = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) == 1 and need_label:
                parts = line.rsplit(None, 1)
            try:
                label = int(parts[1]) if len(parts) > 1 else -1
                if len(parts) > 2 or (need_label and len(parts) != 2) or label < -1:
                    raise ValueError
            except ValueError:
                want = "relative/path<TAB>label" if need_label else "path or path<TAB>label"
                raise DatasetFormatError(f"{path}, line {n}: expected '{want}', got {line!r}") from None
            keys.append(parts[0])
            labels.append(label)
    if not keys:
        raise DatasetFormatError(f"{path} lists no images")
    return keys, labels


def _classes_for(keys: list[str], labels: list[int]) -> list[str]:
    """Class names for integer labels: the folder holding the files when it names one label only
    (ImageNet's wnid folders), else the label number."""
    if not labels or max(labels) < 0:
        return []
    n = max(labels) + 1
    names: dict[int, set] = {}
    for k, y in zip(keys, labels):
        if y >= 0:
            names.setdefault(y, set()).add(os.path.basename(os.path.dirname(k)) or None)
    out = []
    for c in range(n):
        s = names.get(c, set())
        out.append(next(iter(s)) if len(s) == 1 and None not in s else str(c))
    return out if len(set(out)) == n else [str(c) for c in range(n)]


# --------------------------------------------------------------------------- #
# The image set
# --------------------------------------------------------------------------- #
class FileImageSet:
    """Keys, labels and classes of a file-backed image set, and the store that reads them.

    `cache(indices)` keeps the encoded bytes of those items in one numpy buffer (cache_mode
    full / part), shared copy-on-write with forked DataLoader workers.
    """

    def __init__(self, store, keys: list[str], labels, classes: list[str], name: str, source: str):
        if not keys:
            raise ValueError(f"{name}: dataset is empty (0 images) in {source}")
        self.store, self.keys, self.classes, self.name, self.source = store, list(keys), list(classes), name, source
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self._slot = None   # item -> position in the cache (-1: not cached)
        self._buf = self._offsets = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def where(self, i: int) -> str:
        """Where item i lives, for error messages (file path or zip:member)."""
        return self.store.where(self.keys[i])

    def read_bytes(self, i: int) -> bytes:
        i = int(i)
        if self._slot is not None and self._slot[i] >= 0:
            s = self._slot[i]
            return self._buf[self._offsets[s]:self._offsets[s + 1]].tobytes()
        try:
            return self.store.read(self.keys[i])
        except FileNotFoundError as e:
            raise DatasetFormatError(f"image {self.where(i)} listed in {self.source} is missing: {e}") from None
        except OSError as e:
            raise DatasetFormatError(f"cannot read image {self.where(i)}: {e}") from e

    def open(self, i: int):
        """Lazily decoded PIL image of item i (header read)."""
        return decode_bytes(self.read_bytes(i), self.where(i))

    def load(self, i: int, size: int | None = None) -> np.ndarray:
        """uint8 (H, W, 3) pixels of item i; with `size`, shorter side resized and centre-cropped."""
        im = self.open(i)
        if size is not None:
            im.draft("RGB", _draft_size(im.size, size))   # JPEG: decode at a reduced scale >= the target
        return np.array(resize_center(load_rgb(im, self.where(i)), size), dtype=np.uint8)

    def cache(self, indices, threads: int = 8) -> int:
        """Keep the encoded bytes of `indices` in memory; returns the bytes cached."""
        indices = np.asarray(sorted({int(i) for i in indices}), dtype=np.int64)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            blobs = list(pool.map(self.read_bytes, indices.tolist()))
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        buf = np.empty(int(offsets[-1]), dtype=np.uint8)
        for b, s in zip(blobs, offsets[:-1]):
            buf[s:s + len(b)] = np.frombuffer(b, dtype=np.uint8)
        slot = np.full(len(self), -1, dtype=np.int64)
        slot[indices] = np.arange(len(indices))
        self._buf, self._offsets, self._slot = buf, offsets, slot
        return int(offsets[-1])

    def scan(self, threads: int = 8) -> list[tuple[int, str]]:
        """Decode every item once; [(index, error message)] for the unreadable ones."""
        def check(i):
            try:
                load_rgb(self.open(i), self.where(i))
                return None
            except DatasetFormatError as e:
                return i, str(e)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            return [r for r in pool.map(check, range(len(self))) if r is not None]

    def to_memory(self, image_size: int | None, on_error: str = "raise", threads: int | None = None) -> ImageDataset:
        """Decode every image into an in-memory ImageDataset (small sets; eval commands)."""
        import warnings

        def work(i):
            try:
                return self.load(i, image_size), None
            except DatasetFormatError as e:
                return None, e

        with ThreadPoolExecutor(max_workers=threads or min(8, (os.cpu_count() or 1) + 2)) as pool:
            results = list(pool.map(work, range(len(self))))
        arrays, keep, bad = [], [], []
        for i, (arr, err) in enumerate(results):
            if err is not None:
                if on_error == "raise":
                    raise err
                bad.append(self.where(i))
                continue
            arrays.append(arr)
            keep.append(i)
        if bad:
            warnings.warn(f"{self.name}: skipped {len(bad)} unreadable image(s), e.g. {bad[0]}", stacklevel=2)
        if not arrays:
            raise ValueError(f"{self.name}: no readable images in {self.source} ({len(bad)} unreadable)")
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            ex = sorted(shapes)[:3]
            raise ValueError(f"{self.name}: images in {self.source} have different sizes (e.g. "
                             f"{', '.join(f'{s[1]}x{s[0]}' for s in ex)}); set data.image_size to resize them")
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return ImageDataset(images=images, labels=self.labels[keep], classes=self.classes, name=self.name)


def _split_folder(root: str, split: str) -> str:
    """root/<split> (test also root/val); for train, root itself when it has no split folders."""
    names = ["train"] if split == "train" else ["test", "val"]
    tried = [os.path.join(root, n) for n in names]
    folder = next((p for p in tried if os.path.isdir(p)), None)
    if folder is None:
        has_splits = any(os.path.isdir(os.path.join(root, n)) for n in ("train", "test", "val"))
        if split == "train" and not has_splits:
            return root
        raise DatasetNotFoundError(
            f"imagefolder {split} split not found; tried: {', '.join(tried)}"
            + ("" if split != "train" else f" (and {root} itself, which has test/val sub-folders)"))
    return folder


def open_imagefolder(root: str | None, split: str, file_list: str | None = None,
                     index_cache: str | None = DEFAULT_INDEX_CACHE, labels_mode: str = "auto") -> FileImageSet:
    """The image-folder (or file-list) set of `split`; see the module docstring for the layout.
    `labels_mode` "none" (data.labels=none): every image found below the split folder (or every line of
    the list), unlabelled: sub-folders are not classes, a list's labels are ignored."""
    labelled = labels_mode != "none"
    if file_list:
        lst = file_list.format(split=split)
        keys, labels = read_file_list(lst)
        if not labelled:
            labels = [-1] * len(labels)
        base = os.path.dirname(os.path.abspath(lst))
        keys = [k if os.path.isabs(k) else os.path.join(base, k) for k in keys]
        return FileImageSet(FolderStore(""), keys, labels, _classes_for(keys, labels), f"imagefolder/{split}", lst)
    if root is None:
        raise DatasetNotFoundError("imagefolder needs data.root=DIR (a folder of images or of class folders) "
                                   "or data.file_list=LIST")
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"imagefolder root {root} does not exist or is not a folder")
    folder = _split_folder(root, split)
    idx = index_folder(folder, index_cache, labelled=labelled)
    if not idx["keys"]:
        raise DatasetFormatError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder} "
                                 + ("or its class sub-folders" if labelled else "or below it"))
    return FileImageSet(FolderStore(folder), idx["keys"], idx["labels"], idx["classes"], f"imagefolder/{split}",
                        folder)


def open_imagenet_zip(root: str | None, split: str) -> FileImageSet:
    """`split`.zip with `split`_map.txt in `root` (test reads val.zip / val_map.txt). Every member the
    map names must be in the zip: a missing one fails here, with its name."""
    if root is None:
        raise DatasetNotFoundError("imagenet-zip needs data.root=DIR holding train.zip, train_map.txt, "
                                   "val.zip and val_map.txt")
    root = os.path.expanduser(str(root))
    names = [split] if split != "test" else ["val", "test"]
    tried = [(os.path.join(root, f"{n}.zip"), os.path.join(root, f"{n}_map.txt")) for n in names]
    found = next(((z, m) for z, m in tried if os.path.isfile(z) and os.path.isfile(m)), None)
    if found is None:
        raise DatasetNotFoundError(f"imagenet-zip {split} split not found; looked for "
                                   + " or ".join(f"{z} with {m}" for z, m in tried))
    zpath, mpath = found
    keys, labels = read_map(mpath)
    store = ZipStore(zpath)
    members = set(store.handle().namelist())
    missing = [k for k in keys if k not in members]
    if missing:
        raise DatasetFormatError(f"{mpath} names {len(missing)} member(s) missing from {zpath}, "
                                 f"first: {missing[0]}")
    if min(labels) < 0:
        raise DatasetFormatError(f"{mpath}: negative label")
    return FileImageSet(store, keys, labels, _classes_for(keys, labels), f"imagenet-zip/{split}", zpath)
