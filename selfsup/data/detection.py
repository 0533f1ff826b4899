"""Object-detection data: PASCAL VOC devkit folders, a COCO-format set, and a fake VOC-format set.

Every set here yields ``(image, target)``: ``image`` uint8 (3, H, W); ``target`` a dict with
``boxes`` float32 (N, 4) as (x1, y1, x2, y2) in pixels, 0-based, continuous (a VOC box
xmin..xmax, 1-based inclusive, becomes xmin - 1 .. xmax, as detectron2 reads it), ``labels``
int64 (N,) in 1..K (0 is the detector's background), ``difficult`` bool (N,) and ``image_id`` (str).

VOC (``VOCDetectionSet``): read (never downloaded) from
``ROOT/VOCdevkit/VOC<year>/{JPEGImages,Annotations,ImageSets/Main}``; trainval of the chosen years
for training, VOC2007 test for testing; difficult objects are kept in training (as detectron2,
which MoCo used, does) and flagged so the evaluation ignores them. COCO (``CocoDetectionSet``): a
json with images, annotations (xywh boxes) and categories, images under a folder; ``iscrowd``
annotations are flagged difficult. Both read and check every annotation when they are made, before
any training: a damaged file, object or box (empty, inverted, outside the image) raises a
DatasetFormatError naming the file and the object, or with on_error="skip" (data.on_error) is left
out and counted in ``skipped``. ``make_fake_detection``: coloured shapes on textured noise in the
VOC layout (``selfsup fake-detection OUT``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import torch

from ..errors import ConfigError, DatasetFormatError, DatasetNotFoundError

__all__ = [
    "SHAPE_CLASSES",
    "VOC_CLASSES",
    "CocoDetectionSet",
    "VOCDetectionSet",
    "detection_sets",
    "make_fake_detection",
]

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
SHAPE_CLASSES = ("square", "disc", "triangle")


def _to_tensor(pil) -> torch.Tensor:
    arr = np.asarray(pil.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _read_image(path: Path) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as pil:
            return _to_tensor(pil)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:   # a truncated or non-image file
        raise DatasetFormatError(f"image '{path}' cannot be read ({e}): replace or remove it") from None


class _Damage:
    """Damaged annotations met while a set is read. on_error="raise": the first one raises a
    DatasetFormatError naming the file and the object; "skip": the object (or the image) is left out
    and counted, and `summary` says how many."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"data.on_error={on_error!r} is not valid. Choose one of: raise, skip")
        self.skip, self.objects, self.images, self.first = on_error == "skip", 0, 0, None

    def __call__(self, where: str, images: int = 0) -> None:
        """One damaged object (images=0), or `images` images left out whole."""
        if not self.skip:
            raise DatasetFormatError(f"{where}: fix or remove it, or set data.on_error=skip to leave damaged "
                                     "annotations out")
        self.first = self.first or where
        self.images += images
        self.objects += not images

    def summary(self, name: str) -> str | None:
        if not (self.objects or self.images):
            return None
        return (f"{name}: skipped {self.images} damaged image(s) and {self.objects} damaged object(s) "
                f"(data.on_error=skip), e.g. {self.first}")


def _number(v) -> float | None:
    """`v` (XML text or a json value) as a finite float, or None."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    try:
        x = float(v)
    except (ValueError, OverflowError):
        return None
    return x if np.isfinite(x) else None


def _show(v) -> str:
    """repr(v), cut to 60 characters (a message quotes what it found)."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _box_fault(box: list, w: float, h: float) -> str | None:
    """What is wrong with the (x1, y1, x2, y2) box (float32 values, as stored) in a w x h image, or None."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return "is empty or inverted"
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        return f"is outside the {w:g}x{h:g} image"
    return None


def _f32(box: list) -> list:
    with np.errstate(over="ignore"):   # beyond float32: inf, which no image holds
        return [float(v) for v in np.asarray(box, dtype=np.float64).astype(np.float32)]


def _target(boxes: list, labels: list, difficult: list) -> dict:
    """numpy arrays (small beside tensors: a COCO set holds one per image); tensors in __getitem__."""
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64), "difficult": np.asarray(difficult, dtype=bool)}


def _item(path: Path, target: dict, image_id: str):
    return _read_image(path), {**{k: torch.from_numpy(v.copy()) for k, v in target.items()}, "image_id": image_id}


def _image_size(path: Path, w, h, damage: _Damage, where: str) -> tuple | None:
    """(w, h) as the annotation gives them when both are numbers > 0, else read from the image header."""
    from PIL import Image

    w, h = _number(w), _number(h)
    if w and h and w > 0 and h > 0:
        return w, h
    try:
        with Image.open(path) as pil:
            return pil.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        damage(f"{where}: no image size, and image '{path}' cannot be read ({e})", images=1)
        return None


def _voc_annotation(xml: Path, image: Path, classes: tuple[str, ...], damage: _Damage) -> dict | None:
    """boxes, labels, difficult (numpy, see `_target`) of one VOC annotation file, its objects checked:
    a name in `classes` (else DatasetFormatError: the classes are a setting, not damage), a numeric
    bndbox, non-empty, not inverted and inside the image; difficult 0 or 1. A damaged object or file
    goes to `damage` (raise, or skip it); None when the whole file is skipped."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError, UnicodeDecodeError) as e:
        damage(f"{xml}: not a readable VOC annotation ({e})", images=1)
        return None
    if root.tag != "annotation":
        damage(f"{xml}: not a VOC annotation (the root element is <{root.tag}>, not <annotation>)", images=1)
        return None
    size = _image_size(image, root.findtext("size/width"), root.findtext("size/height"), damage, str(xml))
    if size is None:
        return None
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"{xml}: object {k} ({_show(name)})"
        if name not in classes:
            if not name:
                damage(f"{where} has no <name>")
                continue
            raise DatasetFormatError(f"{where}: class {_show(name)} is not one of {', '.join(classes)} "
                                     "(set det.classes)")
        raw = [obj.findtext(f"bndbox/{c}") for c in ("xmin", "ymin", "xmax", "ymax")]
        xy = [_number(v) for v in raw]
        if None in xy:
            damage(f"{where}: bndbox xmin, ymin, xmax, ymax {_show(raw)} are not four finite numbers")
            continue
        box = _f32([xy[0] - 1, xy[1] - 1, xy[2], xy[3]])   # 1-based inclusive -> 0-based continuous
        fault = _box_fault(box, *size)
        if fault:
            damage(f"{where}: bndbox xmin, ymin, xmax, ymax {_show(raw)} {fault}")
            continue
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            damage(f"{where}: difficult is {_show(flag)}, not 0 or 1")
            continue
        boxes.append(box)
        labels.append(classes.index(name) + 1)
        difficult.append(flag == "1")
    return _target(boxes, labels, difficult)


class VOCDetectionSet(torch.utils.data.Dataset):
    """The union of VOC ``image_set`` of each year in `years` under ROOT/VOCdevkit (no download). Every
    annotation is read and checked here (:func:`_voc_annotation`; on_error "raise" or "skip"), before
    any training; `skipped` is the line saying what was left out (None when nothing was)."""

    def __init__(self, root: str, years, image_set: str, classes=VOC_CLASSES, on_error: str = "raise"):
        self.classes = tuple(classes)
        self.items: list = []   # (image path, target, image_id)
        damage = _Damage(on_error)
        for year in years:
            base = Path(root) / "VOCdevkit" / f"VOC{year}"
            listed = base / "ImageSets" / "Main" / f"{image_set}.txt"
            need = [base / "JPEGImages", base / "Annotations", listed]
            missing = [str(p) for p in need if not p.exists()]
            if missing:
                raise DatasetNotFoundError(f"VOC{year} {image_set} not found: missing {', '.join(missing)}. "
                                           "det.root (--root) must hold VOCdevkit/VOC2007 (and VOC2012) with "
                                           "JPEGImages, Annotations and ImageSets/Main, as the devkit tars unpack")
            try:
                names = [n.strip() for n in listed.read_text().splitlines() if n.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise DatasetFormatError(f"'{listed}' is not a readable image list ({e})") from None
            for name in names:
                xml, jpg = base / "Annotations" / f"{name}.xml", base / "JPEGImages" / f"{name}.jpg"
                if not (xml.is_file() and jpg.is_file()):
                    damage(f"{listed}: image '{name}' has no {xml if not xml.is_file() else jpg}", images=1)
                    continue
                target = _voc_annotation(xml, jpg, self.classes, damage)
                if target is not None:
                    self.items.append((jpg, target, f"{year}_{name}"))
        self.skipped = damage.summary(f"VOC {'+'.join(map(str, years))} {image_set}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return _item(*self.items[i])


class CocoDetectionSet(torch.utils.data.Dataset):
    """A COCO-format json (`ann_file`) over images in `root`; categories become labels 1..K in the
    json's order (or the order of `classes` when given, by name); iscrowd boxes are flagged difficult.

    Every image and annotation is checked here, before any training (on_error "raise" or "skip"): an
    image needs a unique id and a file_name of an existing file (a duplicated id leaves out every image
    holding it); an annotation a known image_id and category_id, a bbox of 4 finite numbers with width
    and height > 0 inside the image, iscrowd 0 or 1. `skipped`: the line saying what was left out."""

    def __init__(self, root: str, ann_file: str, classes=None, on_error: str = "raise"):
        if not Path(ann_file).is_file():
            raise DatasetNotFoundError(f"COCO annotation file '{ann_file}' not found (det.ann / --ann)")
        try:
            data = json.loads(Path(ann_file).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise DatasetFormatError(f"'{ann_file}' is not a json file ({type(e).__name__}: {e})") from None
        if not (isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get(
                "categories"), list) and isinstance(data.get("annotations", []), list)):
            raise DatasetFormatError(f"'{ann_file}' is not a COCO detection json: it needs the lists images, "
                                     "annotations and categories")
        images, anns, cats = data["images"], data.get("annotations", []), {}
        for k, c in enumerate(data["categories"]):
            if not isinstance(c, dict) or _id_key(c.get("id")) is None or not isinstance(c.get("name"), str) \
                    or c["id"] in cats:
                raise DatasetFormatError(f"'{ann_file}': categories[{k}] is not {{\"id\": a unique integer or "
                                         f"string, \"name\": a string}}: {_show(c)}")
            cats[c["id"]] = c["name"]
        self.classes = tuple(classes) if classes else tuple(cats[k] for k in sorted(cats, key=_id_key))
        unknown = sorted(set(cats.values()) - set(self.classes))
        if unknown:
            raise DatasetFormatError(f"'{ann_file}': categories {unknown} are not in det.classes")
        self.label_of = {cid: self.classes.index(name) + 1 for cid, name in cats.items()}
        self.root = Path(root)
        damage = _Damage(on_error)
        at: dict = {}   # image id -> its positions in images
        for k, im in enumerate(images):
            if isinstance(im, dict) and _id_key(im.get("id")) is not None:
                at.setdefault(im["id"], []).append(k)
        for iid, ks in at.items():
            if len(ks) > 1:
                damage(f"'{ann_file}': images{_show(ks)} have the same id {_show(iid)} (one would get the "
                       "others' boxes)", images=len(ks))
        sizes = {}   # image id -> (w, h) of the images kept
        for k, im in enumerate(images):
            where = f"'{ann_file}': images[{k}]"
            if not isinstance(im, dict) or _id_key(im.get("id")) is None:
                damage(f"{where} has no id (an integer or a string)", images=1)
            elif len(at[im["id"]]) > 1:
                continue   # a duplicated id, counted above
            elif not isinstance(im.get("file_name"), str) or not im["file_name"]:
                damage(f"{where} (id {_show(im['id'])}) has no file_name", images=1)
            elif not (self.root / im["file_name"]).is_file():
                damage(f"{where} (id {_show(im['id'])}): image '{self.root / im['file_name']}' not found "
                       "(det.root / --root)", images=1)
            elif (wh := _image_size(self.root / im["file_name"], im.get("width"), im.get("height"), damage,
                                    where)) is not None:
                sizes[im["id"]] = wh
        per_image: dict = {i: ([], [], []) for i in sizes}
        for k, a in enumerate(anns):
            where = f"'{ann_file}': annotations[{k}]" + (f" (id {_show(a.get('id'))})" if isinstance(a, dict) else "")
            if not isinstance(a, dict):
                damage(f"{where} is not an object")
                continue
            iid, bbox = a.get("image_id"), a.get("bbox")
            if _id_key(iid) is None or iid not in at:
                damage(f"{where}: image_id {_show(iid)} is not the id of an image in images")
                continue
            if iid not in sizes:
                continue   # its image was left out (and counted)
            if _id_key(a.get("category_id")) is None or a["category_id"] not in cats:
                damage(f"{where}: category_id {_show(a.get('category_id'))} is not the id of a category in categories")
                continue
            xywh = [_number(v) for v in bbox] if isinstance(bbox, list) and len(bbox) == 4 else [None]
            if None in xywh:
                damage(f"{where}: bbox {_show(bbox)} is not [x, y, width, height] (four finite numbers)")
                continue
            box = _f32([xywh[0], xywh[1], xywh[0] + xywh[2], xywh[1] + xywh[3]])
            fault = _box_fault(box, *sizes[iid])
            if fault:
                damage(f"{where}: bbox {_show(bbox)} {fault}")
                continue
            if a.get("iscrowd", 0) not in (0, 1):
                damage(f"{where}: iscrowd is {_show(a['iscrowd'])}, not 0 or 1")
                continue
            boxes, labels, crowd = per_image[iid]
            boxes.append(box)
            labels.append(self.label_of[a["category_id"]])
            crowd.append(bool(a.get("iscrowd", 0)))
        self.items = [(self.root / images[at[i][0]]["file_name"], _target(*per_image[i]), str(i))
                      for i in sorted(sizes, key=_id_key)]
        self.skipped = damage.summary(f"'{ann_file}'")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return _item(*self.items[i])


def _id_key(v):
    """A sort key of a COCO id (an integer or a string; integers first), None for anything else."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        return None
    return (isinstance(v, str), v)


def detection_sets(d, on_error: str = "raise") -> tuple:
    """(train, test) sets of the det config section `d` (det.data, root, ann, test_ann, years, classes),
    every annotation of both checked (on_error: data.on_error). Errors name the missing path and the key
    that sets it."""
    if not d.root:
        raise ConfigError("det.root is not set: give --root DIR (VOC: the folder holding VOCdevkit/; "
                          "COCO: the image folder)")
    if d.data == "voc":
        classes = tuple(d.classes) if d.classes else VOC_CLASSES
        return (VOCDetectionSet(d.root, list(d.years), "trainval", classes, on_error),
                VOCDetectionSet(d.root, [2007], "test", classes, on_error))
    if not d.ann or not d.test_ann:
        raise ConfigError("--data coco needs --ann TRAIN.json and --test-ann TEST.json (det.ann, "
                          "det.test_ann)")
    classes = tuple(d.classes) if d.classes else None
    train = CocoDetectionSet(d.root, d.ann, classes, on_error)
    return train, CocoDetectionSet(d.root, d.test_ann, train.classes, on_error)


# ---------------------------------------------------------------------------------------- the fake set
def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured noise (H, W, 3) float in [0, 255]: smooth blobs of colour plus fine grain."""
    coarse = rng.uniform(40, 215, size=(h // 8 + 2, w // 8 + 2, 3))
    ys, xs = np.linspace(0, h // 8 + 1, h), np.linspace(0, w // 8 + 1, w)
    y0, x0 = ys.astype(int).clip(max=h // 8), xs.astype(int).clip(max=w // 8)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    smooth = (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
              + coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx)
    return (smooth + rng.normal(0, 18, size=(h, w, 3))).clip(0, 255)


def _shape_mask(kind: str, size: int) -> np.ndarray:
    """A boolean (size, size) mask of a square, a disc or an upward triangle filling the box."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if kind == "square":
        return np.ones((size, size), dtype=bool)
    if kind == "disc":
        return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 2) ** 2
    return np.abs(xx - size / 2) <= yy / 2   # triangle: apex at the top, base at the bottom


def _voc_xml(name: str, h: int, w: int, objects: list) -> str:
    objs = "".join(
        f"<object><name>{escape(c)}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(d)}</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax>"
        f"<ymax>{y2}</ymax></bndbox></object>" for c, (x1, y1, x2, y2), d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>\n")


def make_fake_detection(root: str, trainval: int = 200, test: int = 100, size: int = 64, max_objects: int = 4,
                        difficult_size: int = 10, seed: int = 0) -> dict:
    """Write ROOT/VOCdevkit/VOC2007 (JPEGImages, Annotations, ImageSets/Main/{trainval,test}.txt) with
    `trainval` + `test` images of side `size`: 1..`max_objects` shapes (SHAPE_CLASSES, random colour and
    side from `difficult_size` - 4 to size / 2.5) on textured noise; a shape whose side is below
    `difficult_size` is marked difficult. Returns {"root", "trainval", "test", "classes", "objects", "difficult"}.
    ROOT must be new or empty (a set is never written over another); every file goes through a temporary
    file and the ImageSets lists come last. ConfigError naming the option for a value out of range."""
    import io

    from PIL import Image

    from ..atomic import write_bytes, write_text

    for option, value, low, high in (("--trainval", trainval, 1, None), ("--test", test, 1, None),
                                     ("--size", size, 16, 4096), ("--max-objects", max_objects, 1, None),
                                     ("--difficult-size", difficult_size, 0, size), ("--seed", seed, 0, None)):
        if not isinstance(value, int) or value < low or (high is not None and value > high):
            valid = f"from {low} to {high}" + (" (--size)" if option == "--difficult-size" else "") if high \
                else f"at least {low}"
            raise ConfigError(f"fake-detection {option} {value}: out of range, give a whole number {valid}")
    if Path(root).exists() and (not Path(root).is_dir() or any(Path(root).iterdir())):
        what = "is not empty" if Path(root).is_dir() else "is a file"
        raise ConfigError(f"fake-detection OUT '{root}' {what}: it writes a new set, never over another one (a "
                          "VOCdevkit's lists and annotations would be replaced): give a new or empty folder")
    base = Path(root) / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = {"trainval": [], "test": []}
    n_obj = n_diff = 0
    for split, count in (("trainval", trainval), ("test", test)):
        for _ in range(count):
            name = f"{len(names['trainval']) + len(names['test']):06d}"
            img = _texture(rng, size, size)
            objects = []
            for _ in range(int(rng.integers(1, max_objects + 1))):
                s = int(rng.integers(max(4, difficult_size - 4), max(difficult_size, int(size / 2.5)) + 1))
                x1, y1 = (int(v) for v in rng.integers(0, size - s + 1, size=2))
                kind = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
                colour = rng.uniform(0, 255, size=3)
                colour[int(rng.integers(3))] = rng.choice([0.0, 255.0])   # saturated: stands out of the noise
                mask = _shape_mask(kind, s)
                img[y1:y1 + s, x1:x1 + s][mask] = colour
                objects.append((kind, (x1, y1, x1 + s, y1 + s), s < difficult_size))
            n_obj += len(objects)
            n_diff += sum(d for *_, d in objects)
            jpg = io.BytesIO()
            Image.fromarray(img.round().astype(np.uint8)).save(jpg, format="JPEG", quality=92)
            write_bytes(base / "JPEGImages" / f"{name}.jpg", jpg.getvalue())
            write_text(base / "Annotations" / f"{name}.xml", _voc_xml(name, size, size, objects))
            names[split].append(name)
    for split, lines in names.items():
        write_text(base / "ImageSets" / "Main" / f"{split}.txt", "".join(n + "\n" for n in lines))
    return {"root": os.fspath(root), "trainval": trainval, "test": test, "classes": list(SHAPE_CLASSES),
            "objects": n_obj, "difficult": n_diff}
