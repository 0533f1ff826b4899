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


# ---------------------------------------------------------------------------------------- damaged annotations
def _obj(c, a, b, x, y, d="0", bndbox=True):
    box = f"<bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{x}</xmax><ymax>{y}</ymax></bndbox>" if bndbox else ""
    return f"<object><name>{c}</name><difficult>{d}</difficult>{box}</object>"


def _voc_test_xml(root, xml):
    """A VOC2007 set (50x40 images) whose one test annotation file holds `xml`."""
    _write_voc(root, 2007, "trainval", {"000001": [("dog", 1, 2, 10, 20, 0)]})
    _write_voc(root, 2007, "test", {"000002": []})
    path = root / "VOCdevkit/VOC2007/Annotations/000002.xml"
    path.write_text(xml)
    return path


def _voc_objects(*objs):
    good = _obj("dog", 1, 2, 10, 20)
    return (f"<annotation><filename>000002.jpg</filename><size><width>50</width><height>40</height></size>"
            f"{good}{''.join(objs)}</annotation>")


BAD_VOC = {   # the second object (object 1) is damaged; the first is good
    "inverted": (_voc_objects(_obj("cat", 20, 5, 10, 30)), r"object 1 \('cat'\).*empty or inverted"),
    "zero-size": (_voc_objects(_obj("cat", 11, 5, 10, 30)), r"object 1 \('cat'\).*empty or inverted"),
    "outside": (_voc_objects(_obj("cat", 40, 5, 51, 30)), r"object 1 \('cat'\).*outside the 50x40 image"),
    "not-a-number": (_voc_objects(_obj("cat", "ten", 5, 20, 30)), r"object 1 \('cat'\).*not four finite numbers"),
    "nan": (_voc_objects(_obj("cat", "nan", 5, 20, 30)), r"object 1 \('cat'\).*not four finite numbers"),
    "no-bndbox": (_voc_objects(_obj("cat", 1, 1, 2, 2, bndbox=False)), r"object 1 \('cat'\).*not four finite"),
    "no-name": (_voc_objects(_obj("", 1, 1, 5, 5)), r"object 1 \(''\) has no <name>"),
    "difficult": (_voc_objects(_obj("cat", 1, 1, 5, 5, d="yes")), r"object 1 \('cat'\).*difficult is 'yes'"),
}


@pytest.mark.parametrize("case", sorted(BAD_VOC))
def test_a_damaged_voc_object_is_refused_when_the_set_is_made_or_skipped(case, tmp_path):
    xml, message = BAD_VOC[case]
    path = _voc_test_xml(tmp_path, xml)
    with pytest.raises(DatasetFormatError, match=message) as e:
        VOCDetectionSet(str(tmp_path), [2007], "test")   # when the set is made: before any training
    assert str(path) in str(e.value) and "data.on_error=skip" in str(e.value)
    ds = VOCDetectionSet(str(tmp_path), [2007], "test", on_error="skip")
    assert len(ds) == 1 and ds[0][1]["boxes"].tolist() == [[0, 1, 10, 20]]   # the good object only
    assert "skipped 0 damaged image(s) and 1 damaged object(s)" in ds.skipped and str(path) in ds.skipped


@pytest.mark.parametrize("xml", ["<annotation><object><name>dog", "not xml at all", "<html></html>"])
def test_a_malformed_voc_file_is_refused_or_its_image_skipped(xml, tmp_path):
    path = _voc_test_xml(tmp_path, xml)
    with pytest.raises(DatasetFormatError, match="not a (readable )?VOC annotation") as e:
        VOCDetectionSet(str(tmp_path), [2007], "test")
    assert str(path) in str(e.value)
    ds = VOCDetectionSet(str(tmp_path), [2007], "test", on_error="skip")
    assert len(ds) == 0 and "skipped 1 damaged image(s) and 0 damaged object(s)" in ds.skipped


def test_a_missing_annotation_or_image_of_the_list_is_named(tmp_path):
    _voc_test_xml(tmp_path, _voc_objects())
    (tmp_path / "VOCdevkit/VOC2007/JPEGImages/000002.jpg").unlink()
    with pytest.raises(DatasetFormatError, match="image '000002' has no .*000002.jpg"):
        VOCDetectionSet(str(tmp_path), [2007], "test")


def test_detection_sets_check_the_test_split_too(tmp_path):
    from selfsup.config import load_config
    from selfsup.data.detection import detection_sets

    _voc_test_xml(tmp_path, BAD_VOC["inverted"][0])
    e = load_config("det-shapes-cpu", [f"det.root={tmp_path}", "det.classes=null"]).det
    with pytest.raises(DatasetFormatError, match="000002.xml: object 1"):
        detection_sets(e)
    train, test = detection_sets(e, "skip")
    assert (len(train), len(test)) == (1, 1) and train.skipped is None and "1 damaged object" in test.skipped


def test_a_perfect_detector_scores_1_once_damaged_boxes_are_left_out(tmp_path):
    """Scored, an inverted ground-truth box cost a perfect detector 0.18 of its AP50."""
    from selfsup.eval.detection import detection_scores

    _voc_test_xml(tmp_path, _voc_objects(_obj("dog", 30, 30, 20, 20)))
    ds = VOCDetectionSet(str(tmp_path), [2007], "test", on_error="skip")
    targets = [ds[i][1] for i in range(len(ds))]
    preds = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))} for t in targets]
    scores = detection_scores(preds, targets, len(VOC_CLASSES))
    assert scores["ap50"] == scores["voc07_ap50"] == 1.0


def _coco(tmp_path, change=None):
    """Three 30x20 images with a good box each, `change(json)` applied; the path of the json."""
    for n in "abc":
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / f"{n}.png")
    ann = {"images": [{"id": i + 1, "file_name": f"{n}.png", "width": 30, "height": 20} for i, n in enumerate("abc")],
           "categories": [{"id": 1, "name": "cat"}],
           "annotations": [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [1, 2, 10, 5]} for i in (1, 2, 3)]}
    if change:
        change(ann)
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return tmp_path / "ann.json"


def _set(**kw):
    def f(d):
        for k, v in kw.items():
            d["annotations"][1][k] = v
    return f


BAD_COCO = {   # (change, message, images skipped, objects skipped)
    "duplicate-id": (lambda d: (d["images"][2].update(id=2), d["annotations"][2].update(image_id=2)),
                     r"images\[1, 2\] have the same id 2", 2, 0),
    "missing-file-name": (lambda d: d["images"][1].pop("file_name"), r"images\[1\] \(id 2\) has no file_name", 1, 0),
    "missing-file": (lambda d: d["images"][1].update(file_name="x.png"), r"images\[1\].*x.png' not found", 1, 0),
    "negative-width": (_set(bbox=[1, 2, -3, 5]), r"annotations\[1\] \(id 12\): bbox \[1, 2, -3, 5\] is empty", 0, 1),
    "zero-height": (_set(bbox=[1, 2, 3, 0]), r"annotations\[1\] \(id 12\).*empty or inverted", 0, 1),
    "nan-width": (_set(bbox=[1, 2, float("nan"), 5]), r"annotations\[1\].*four finite numbers", 0, 1),
    "three-numbers": (_set(bbox=[1, 2, 3]), r"annotations\[1\].*bbox \[1, 2, 3\] is not \[x, y", 0, 1),
    "string-bbox": (_set(bbox="1,2,3,4"), r"annotations\[1\].*bbox '1,2,3,4' is not", 0, 1),
    "outside": (_set(bbox=[25, 2, 10, 5]), r"annotations\[1\].*outside the 30x20 image", 0, 1),
    "unknown-image": (_set(image_id=99), r"annotations\[1\].*image_id 99 is not the id of an image", 0, 1),
    "unknown-category": (_set(category_id=7), r"annotations\[1\].*category_id 7 is not the id of a category", 0, 1),
    "crowd": (_set(iscrowd="yes"), r"annotations\[1\].*iscrowd is 'yes'", 0, 1),
}


@pytest.mark.parametrize("case", sorted(BAD_COCO))
def test_a_damaged_coco_json_is_refused_when_the_set_is_made_or_skipped(case, tmp_path):
    change, message, images, objects = BAD_COCO[case]
    path = _coco(tmp_path, change)
    with pytest.raises(DatasetFormatError, match=message) as e:
        CocoDetectionSet(str(tmp_path), str(path))
    assert str(path) in str(e.value)
    ds = CocoDetectionSet(str(tmp_path), str(path), on_error="skip")
    assert len(ds) == 3 - images and f"skipped {images} damaged image(s) and {objects} damaged object(s)" in ds.skipped
    boxes = [ds[i][1]["boxes"].tolist() for i in range(len(ds))]
    assert sum(boxes, []) == [[1, 2, 11, 7]] * (3 - images - objects)


@pytest.mark.parametrize("text,message", [("[1, 2]", "needs the lists images"), ("{\"images\": 3}", "needs the lists"),
                                          ("{not json", "is not a json file"),
                                          ('{"images": [], "categories": [{"id": [1], "name": "x"}]}',
                                           r"categories\[0\] is not")])
def test_a_coco_json_of_another_shape_is_named(text, message, tmp_path):
    (tmp_path / "ann.json").write_text(text)
    with pytest.raises(DatasetFormatError, match=message):
        CocoDetectionSet(str(tmp_path), str(tmp_path / "ann.json"))


def test_a_corrupt_image_is_named_not_a_pil_error(tmp_path):
    path = _coco(tmp_path)
    (tmp_path / "b.png").write_bytes(b"\x89PNG not really")
    ds = CocoDetectionSet(str(tmp_path), str(path))   # the json gives the size: the image is read in training
    with pytest.raises(DatasetFormatError, match="b.png' cannot be read"):
        ds[1]
