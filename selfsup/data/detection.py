"""Object-detection data: PASCAL VOC devkit folders, a COCO-format set, and a fake VOC-format set.

Every set here yields ``(image, target)``: ``image`` uint8 (3, H, W); ``target`` a dict with
``boxes`` float32 (N, 4) as (x1, y1, x2, y2) in pixels, 0-based, continuous (a VOC box
xmin..xmax, 1-based inclusive, becomes xmin - 1 .. xmax, as detectron2 reads it), ``labels``
int64 (N,) in 1..K (0 is the detector's background), ``difficult`` bool (N,) and ``image_id`` (str).

VOC (``VOCDetectionSet``): read with torchvision's ``VOCDetection`` (never downloads) from
``ROOT/VOCdevkit/VOC<year>/{JPEGImages,Annotations,ImageSets/Main}``; trainval of the chosen years
for training, VOC2007 test for testing; difficult objects are kept in training (as detectron2,
which MoCo used, does) and flagged so the evaluation ignores them. COCO (``CocoDetectionSet``): a
json with images, annotations (xywh boxes) and categories, images under a folder; ``iscrowd``
annotations are flagged difficult. ``make_fake_detection``: coloured shapes on textured noise in the
VOC layout (``selfsup fake-detection OUT``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import torch

from ..errors import DatasetFormatError, DatasetNotFoundError

__all__ = [
    "SHAPE_CLASSES",
    "VOC_CLASSES",
    "CocoDetectionSet",
    "VOCDetectionSet",
    "detection_sets",
    "make_fake_detection",
    "voc_target",
]

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
SHAPE_CLASSES = ("square", "disc", "triangle")


def _to_tensor(pil) -> torch.Tensor:
    arr = np.asarray(pil.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def voc_target(annotation: dict, classes: tuple[str, ...]) -> dict:
    """A VOC annotation (the dict torchvision's ``VOCDetection`` parses from the XML) -> the target
    dict of the module docstring. Objects of classes not in `classes` raise DatasetFormatError."""
    ann = annotation["annotation"]
    boxes, labels, difficult = [], [], []
    for obj in ann.get("object", []):
        name = obj["name"].strip()
        if name not in classes:
            raise DatasetFormatError(f"{ann.get('filename', '?')}: object class '{name}' is not one of "
                                     f"{', '.join(classes)} (set eval.det_classes)")
        b = obj["bndbox"]
        boxes.append([float(b["xmin"]) - 1, float(b["ymin"]) - 1, float(b["xmax"]), float(b["ymax"])])
        labels.append(classes.index(name) + 1)
        difficult.append(int(obj.get("difficult", "0") or 0) == 1)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "difficult": torch.tensor(difficult, dtype=torch.bool),
            "image_id": Path(ann.get("filename", "")).stem}


class VOCDetectionSet(torch.utils.data.Dataset):
    """The union of VOC ``image_set`` of each year in `years` under ROOT/VOCdevkit (no download)."""

    def __init__(self, root: str, years, image_set: str, classes=VOC_CLASSES):
        from torchvision.datasets import VOCDetection

        self.classes = tuple(classes)
        self.parts = []
        for year in years:
            base = Path(root) / "VOCdevkit" / f"VOC{year}"
            need = [base / "JPEGImages", base / "Annotations", base / "ImageSets" / "Main" / f"{image_set}.txt"]
            missing = [str(p) for p in need if not p.exists()]
            if missing:
                raise DatasetNotFoundError(f"VOC{year} {image_set} not found: missing {', '.join(missing)}. "
                                           "eval.det_root (--root) must hold VOCdevkit/VOC2007 (and VOC2012) with "
                                           "JPEGImages, Annotations and ImageSets/Main, as the devkit tars unpack")
            self.parts.append((str(year), VOCDetection(str(root), year=str(year), image_set=image_set)))
        self.offsets = np.cumsum([0] + [len(p) for _, p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        year, part = self.parts[k]
        image, ann = part[i - int(self.offsets[k])]
        target = voc_target(ann, self.classes)
        target["image_id"] = f"{year}_{target['image_id']}"
        return _to_tensor(image), target


class CocoDetectionSet(torch.utils.data.Dataset):
    """A COCO-format json (`ann_file`) over images in `root`; categories become labels 1..K in the
    json's order (or the order of `classes` when given, by name); iscrowd boxes are flagged difficult."""

    def __init__(self, root: str, ann_file: str, classes=None):
        if not Path(ann_file).is_file():
            raise DatasetNotFoundError(f"COCO annotation file '{ann_file}' not found (eval.det_ann / --ann)")
        try:
            data = json.loads(Path(ann_file).read_text())
            cats = {c["id"]: c["name"] for c in data["categories"]}
            self.images = sorted(data["images"], key=lambda im: im["id"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DatasetFormatError(f"'{ann_file}' is not a COCO detection json (images, annotations, "
                                     f"categories): {e}") from None
        self.classes = tuple(classes) if classes else tuple(cats[k] for k in sorted(cats))
        unknown = sorted(set(cats.values()) - set(self.classes))
        if unknown:
            raise DatasetFormatError(f"'{ann_file}': categories {unknown} are not in eval.det_classes")
        self.label_of = {cid: self.classes.index(name) + 1 for cid, name in cats.items()}
        self.root = Path(root)
        self.anns: dict = {}
        for a in data.get("annotations", []):
            self.anns.setdefault(a["image_id"], []).append(a)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        im = self.images[i]
        path = self.root / im["file_name"]
        if not path.is_file():
            raise DatasetNotFoundError(f"image '{path}' of the COCO json not found (eval.det_root / --root)")
        with Image.open(path) as pil:
            image = _to_tensor(pil)
        anns = [a for a in self.anns.get(im["id"], []) if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        return image, {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                       "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
                       "difficult": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
                       "image_id": str(im["id"])}


def detection_sets(e) -> tuple:
    """(train, test) sets of the eval config section `e` (eval.det_data, det_root, det_ann, det_test_ann,
    det_years, det_classes). Errors name the missing path and the key that sets it."""
    from ..errors import ConfigError

    if not e.det_root:
        raise ConfigError("eval.det_root is not set: give --root DIR (VOC: the folder holding VOCdevkit/; "
                          "COCO: the image folder)")
    if e.det_data == "voc":
        classes = tuple(e.det_classes) if e.det_classes else VOC_CLASSES
        return (VOCDetectionSet(e.det_root, list(e.det_years), "trainval", classes),
                VOCDetectionSet(e.det_root, [2007], "test", classes))
    if not e.det_ann or not e.det_test_ann:
        raise ConfigError("--data coco needs --ann TRAIN.json and --test-ann TEST.json (eval.det_ann, "
                          "eval.det_test_ann)")
    classes = tuple(e.det_classes) if e.det_classes else None
    train = CocoDetectionSet(e.det_root, e.det_ann, classes)
    return train, CocoDetectionSet(e.det_root, e.det_test_ann, train.classes)


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
    `difficult_size` is marked difficult. Returns {"root", "trainval", "test", "classes", "objects", "difficult"}."""
    from PIL import Image

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
            Image.fromarray(img.round().astype(np.uint8)).save(base / "JPEGImages" / f"{name}.jpg", quality=92)
            (base / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, size, size, objects))
            names[split].append(name)
    for split, lines in names.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(n + "\n" for n in lines))
    return {"root": os.fspath(root), "trainval": trainval, "test": test, "classes": list(SHAPE_CLASSES),
            "objects": n_obj, "difficult": n_diff}
