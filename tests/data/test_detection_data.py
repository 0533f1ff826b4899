"""The detection readers: VOC devkit folders written by hand here, COCO-format json, the fake VOC set."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.detection import SHAPE_CLASSES, VOC_CLASSES, CocoDetectionSet, VOCDetectionSet, make_fake_detection
from selfsup.errors import DatasetFormatError, DatasetNotFoundError


def _write_voc(root, year, image_set, images):
    """images: {name: [(class, xmin, ymin, xmax, ymax, difficult)]}, VOC's 1-based pixel boxes."""
    base = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name, objs in images.items():
        Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
        xml = "".join(f"<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
                      f"<xmax>{x}</xmax><ymax>{y}</ymax></bndbox></object>" for c, a, b, x, y, d in objs)
        (base / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>50</width><height>40</height></size>"
            f"{xml}</annotation>")
    (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(n + "\n" for n in images))


def test_voc_reader_boxes_labels_difficult_and_ids(tmp_path):
    _write_voc(tmp_path, 2007, "trainval", {"000005": [("dog", 1, 2, 10, 20, 0), ("person", 5, 5, 30, 35, 1)],
                                            "000007": [("tvmonitor", 11, 1, 50, 40, 0)]})
    _write_voc(tmp_path, 2012, "trainval", {"2008_000001": [("aeroplane", 3, 4, 5, 6, 0)]})
    ds = VOCDetectionSet(str(tmp_path), [2007, 2012], "trainval")
    assert len(ds) == 3
    image, t = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 50)
    # VOC's 1-based inclusive xmin..xmax -> 0-based continuous (xmin - 1, ymin - 1, xmax, ymax)
    assert t["boxes"].tolist() == [[0, 1, 10, 20], [4, 4, 30, 35]]
    assert t["labels"].tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1]
    assert t["difficult"].tolist() == [False, True]
    assert t["image_id"] == "2007_000005"
    assert ds[1][1]["labels"].tolist() == [20] and ds[1][1]["image_id"] == "2007_000007"
    _, t2 = ds[2]
    assert t2["image_id"] == "2012_2008_000001" and t2["labels"].tolist() == [1]
    assert t2["boxes"].tolist() == [[2, 3, 5, 6]]


def test_voc_reader_names_missing_folders_and_unknown_classes(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="VOCdevkit/VOC2012"):
        VOCDetectionSet(str(tmp_path), [2012], "trainval")
    _write_voc(tmp_path, 2007, "test", {"000001": [("unicorn", 1, 1, 5, 5, 0)]})
    with pytest.raises(DatasetFormatError, match="unicorn"):
        VOCDetectionSet(str(tmp_path), [2007], "test")[0]


def test_coco_reader_converts_xywh_and_flags_crowd(tmp_path):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    ann = {"images": [{"id": 7, "file_name": "a.png", "width": 30, "height": 20}],
           "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [2, 3, 10, 5], "iscrowd": 0},
                           {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 1}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = CocoDetectionSet(str(tmp_path), str(tmp_path / "ann.json"))
    assert ds.classes == ("dog", "cat")   # by category id
    image, t = ds[0]
    assert image.shape == (3, 20, 30)
    assert t["boxes"].tolist() == [[2, 3, 12, 8], [0, 0, 4, 4]]
    assert t["labels"].tolist() == [2, 1] and t["difficult"].tolist() == [False, True] and t["image_id"] == "7"


def test_fake_detection_is_a_readable_voc_set_with_difficult_objects(tmp_path):
    info = make_fake_detection(str(tmp_path), trainval=12, test=6, size=48, difficult_size=10, seed=1)
    train = VOCDetectionSet(str(tmp_path), [2007], "trainval", SHAPE_CLASSES)
    test = VOCDetectionSet(str(tmp_path), [2007], "test", SHAPE_CLASSES)
    assert (len(train), len(test)) == (12, 6)
    targets = [train[i][1] for i in range(12)] + [test[i][1] for i in range(6)]
    assert sum(len(t["labels"]) for t in targets) == info["objects"]
    assert sum(int(t["difficult"].sum()) for t in targets) == info["difficult"] > 0
    for t in targets:
        b = t["boxes"]
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all() and b.min() >= 0 and b.max() <= 48
        side = b[:, 2] - b[:, 0]
        assert torch.equal(t["difficult"], side < 10)   # small shapes are the difficult ones
        assert set(t["labels"].tolist()) <= {1, 2, 3}
