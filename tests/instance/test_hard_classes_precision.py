"""PIC's hard classes are ranked in float32 even under the trainer's bf16 autocast (issue 17, defect 3):
bf16 cosines (8 mantissa bits) tie and reorder near neighbours, so the top-K table would change with
the precision setting."""
import torch

from selfsup.instance import InstanceClassifier


def test_hard_classes_are_the_same_under_bf16_autocast():
    clf = InstanceClassifier(2000, 64, smooth_k=10, seed=0)
    clf.refresh_hard_classes_()
    want = clf.hard_classes.clone()
    clf.hard_classes.fill_(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clf.refresh_hard_classes_()
    assert torch.equal(clf.hard_classes, want)
