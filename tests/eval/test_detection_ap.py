"""Detection scores on hand-made boxes, against values worked out by hand here."""
import numpy as np
import pytest
import torch

from selfsup.eval.detection import coco_ap, voc07_ap, voc_ap50, voc_class_ap

A, B, D = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]   # D: a difficult object
GTS = {0: (np.array([A], float), np.array([False])), 1: (np.array([B, D], float), np.array([False, True]))}


def test_voc07_11_point_rule():
    # precision 1 up to recall 0.5: the thresholds 0, 0.1, ..., 0.5 (6 of 11) see 1, the rest see nothing
    assert voc07_ap(np.array([0.25, 0.5]), np.array([1.0, 1.0])) == pytest.approx(6 / 11)
    assert voc07_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx((6 * 1 + 5 * 0.5) / 11)


def test_perfect_detector_scores_one():
    dets = [(0, 0.9, A), (1, 0.8, B)]
    assert voc_class_ap(dets, GTS) == pytest.approx(1.0)


def test_shifted_duplicate_miss_and_difficult():
    # by falling score: A exact (TP), D (difficult: ignored), A shifted by 5 px (IoU 50/150 = 1/3 < 0.5: FP),
    # A again (duplicate: FP); B is missed. 2 positives (D is not one): recall 1/2 with precision 1, 1/2, 1/3
    dets = [(0, 0.9, A), (1, 0.85, D), (0, 0.8, [5, 0, 15, 10]), (0, 0.7, A)]
    assert voc_class_ap(dets, GTS) == pytest.approx(6 / 11)
    # ... then B found last: recall 1 at precision 2/4 -> thresholds 0.6..1.0 (5 of 11) see 1/2
    assert voc_class_ap(dets + [(1, 0.6, B)], GTS) == pytest.approx((6 + 5 * 0.5) / 11)
    # a class with difficult ground truth only has no AP
    assert voc_class_ap([(0, 1.0, D)], {0: (np.array([D], float), np.array([True]))}) is None


def test_voc_ap50_means_over_classes_with_ground_truth():
    t = [{"boxes": torch.tensor([A, B], dtype=torch.float32), "labels": torch.tensor([1, 2]),
          "difficult": torch.tensor([False, False])}]
    p = [{"boxes": torch.tensor([A], dtype=torch.float32), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}]
    # class 1: AP 1; class 2: missed, AP 0; class 3: no ground truth, left out
    assert voc_ap50(p, t, num_classes=3) == pytest.approx(0.5)


def _t(boxes, labels, difficult):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "difficult": torch.tensor(difficult)}


def _p(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_coco_style_ap_on_hand_made_boxes():
    gt = [_t([A], [1], [False]), _t([B, D], [1, 1], [False, True])]
    perfect = coco_ap([_p([A], [0.9], [1]), _p([B], [0.8], [1])], gt)
    assert perfect == pytest.approx({"ap": 1.0, "ap50": 1.0, "ap75": 1.0})
    # one hit, one miss, a detection on the difficult box (iscrowd: ignored): precision 1 up to recall 0.5,
    # i.e. 51 of COCO's 101 recall points
    half = coco_ap([_p([A], [0.9], [1]), _p([D], [0.95], [1])], gt)
    assert half == pytest.approx({"ap": 51 / 101, "ap50": 51 / 101, "ap75": 51 / 101}, abs=1e-6)
    # IoU 0.625 (10x6.25 inside 10x10): a hit at IoU 0.50, 0.55, 0.60, a miss at 0.65..0.95 -> AP 3/10
    loose = coco_ap([_p([[0, 0, 10, 6.25]], [0.9], [1])], [_t([A], [1], [False])])
    assert loose == pytest.approx({"ap": 0.3, "ap50": 1.0, "ap75": 0.0}, abs=1e-6)


def test_detection_scores_report_voc_ap_over_iou_thresholds_beside_coco():
    from selfsup.eval.detection import detection_scores

    # IoU 0.625: an 11-point AP of 1 at IoU 0.50, 0.55, 0.60 and 0 at 0.65..0.95 -> VOC "AP" 3/10, AP75 0
    r = detection_scores([_p([[0, 0, 10, 6.25]], [0.9], [1])], [_t([A], [1], [False])], num_classes=1)
    assert r["voc07_ap50"] == pytest.approx(1.0) and r["voc07_ap75"] == 0.0
    assert r["voc07_ap"] == pytest.approx(0.3) and r["ap"] == pytest.approx(0.3, abs=1e-6)
