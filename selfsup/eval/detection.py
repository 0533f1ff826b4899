"""Transfer to object detection: a torchvision Faster R-CNN whose ResNet-FPN backbone starts from a
selfsup encoder, and the scores of its detections (AP50, AP, AP75 and VOC07's 11-point AP50).

The backbone body is the run's encoder itself (a copy): torchvision ResNet-18/34/50 (with or without
the CIFAR stem), a timm ResNet (``timm/resnet*``: the same conv1/bn1/layer1..4 names) or
``resnet_small`` (its 4 stages); its four stages feed torchvision's FeaturePyramidNetwork (256
channels, P2-P6). Normalisation (``det.norm``): ``frozen`` replaces every BatchNorm with
torchvision's FrozenBatchNorm2d holding the encoder's statistics (torchvision's default); ``sync``
keeps BatchNorm in training mode (the engine makes it SyncBatchNorm under several GPU processes, as
MoCo does; on CPU it is plain per-process BN). ``det.trainable_layers`` (0-5) trains the last k
of layer4, layer3, layer2, layer1, conv1 (+ bn1), as torchvision counts them.

Scores: COCO-style AP (mean over IoU 0.50:0.05:0.95, 101-point interpolation), AP50 and AP75 from
torchmetrics' MeanAveragePrecision with the pycocotools backend; difficult objects are passed as
``iscrowd=1``, which COCOeval ignores (a detection matched to one is neither a true nor a false
positive; pycocotools measures the overlap with a crowd box as intersection / detection area). VOC07
AP50 (:func:`voc_ap50`, 11-point, computed here): the VOC devkit's rule, difficult ground truth
neither counts as a positive nor turns a detection into a false positive.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import torch
from torch import Tensor, nn

from ..data.augment import IMAGE_MEAN, IMAGE_STD
from ..errors import ConfigError

__all__ = [
    "STAGE_NAMES",
    "build_detector",
    "coco_ap",
    "detection_scores",
    "voc07_ap",
    "voc_ap50",
    "voc_class_ap",
]

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


class _Body(nn.Module):
    """The encoder as a 4-stage body: {"0".."3": the outputs of layer1..layer4} (ResNet stride 4..32)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        if all(hasattr(encoder, n) for n in ("conv1", "bn1", *STAGE_NAMES)):   # torchvision / timm ResNets
            self.stem = nn.Sequential(encoder.conv1, encoder.bn1, nn.ReLU(inplace=True),
                                      getattr(encoder, "maxpool", nn.Identity()))
            stages = [getattr(encoder, n) for n in STAGE_NAMES]
        elif hasattr(encoder, "layers") and hasattr(encoder, "conv1") and len(encoder.layers) == 4:   # resnet_small
            self.stem = nn.Sequential(encoder.conv1, encoder.bn1, nn.ReLU(inplace=True))
            stages = list(encoder.layers)
        else:
            raise ConfigError(f"detection needs a ResNet encoder (resnet18/34/50, resnet_small, timm/resnet*); "
                              f"this run's is a {type(encoder).__name__}")
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out, x = OrderedDict(), self.stem(x)
        for i, name in enumerate(STAGE_NAMES):
            x = getattr(self, name)(x)
            out[str(i)] = x
        return out


class _BodyFPN(nn.Module):
    """Body + torchvision's FPN (+ max-pooled P6), `out_channels` as the detector expects. `amp`: an
    autocast dtype (bf16 on a GPU) for these two only, their outputs back in fp32, so that the RPN and
    the box head decode coordinates in fp32 (bf16 has 8 bits of mantissa: pixels off at 800 px)."""

    def __init__(self, body: _Body, in_channels: list[int], out_channels: int = 256):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.amp: torch.dtype | None = None

    def forward(self, x: Tensor):
        if self.amp is None:
            return self.fpn(self.body(x))
        with torch.autocast(x.device.type, dtype=self.amp):
            out = self.fpn(self.body(x))
        return OrderedDict((k, v.float()) for k, v in out.items())


def _freeze_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d of `module` replaced (in place) by a FrozenBatchNorm2d with its statistics."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                for k in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, k).copy_(getattr(child, k).detach())
            setattr(module, name, frozen)
        else:
            _freeze_bn(child)
    return module


def build_detector(encoder: nn.Module, num_classes: int, *, norm: str = "frozen", trainable_layers: int = 3,
                   min_sizes=(800,), max_size: int = 1333, test_size: int = 800, fpn_channels: int = 256,
                   head_dim: int = 1024, rois: int = 512, proposals: int = 2000,
                   anchor_sizes=(32, 64, 128, 256, 512), amp: torch.dtype | None = None) -> nn.Module:
    """A torchvision FasterRCNN for `num_classes` object classes (+ background) on a copy of `encoder`.

    min_sizes: shorter sides drawn from in training (multi-scale); test_size: the shorter side at test
    time (the model's transform is set for testing by :func:`set_test_size`); images are normalised
    with selfsup's mean and std. fpn_channels, head_dim (box-head MLP width), rois (sampled per image
    for the box head in training), proposals (RPN post-NMS per image in training; half at test): the
    defaults are torchvision's, as are anchor_sizes (one per FPN level P2-P6, aspect ratios 0.5, 1, 2).
    amp: autocast dtype of the backbone and FPN (the heads stay fp32). Returns the model in training mode."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    if norm not in ("frozen", "sync"):
        raise ConfigError(f"det.norm={norm!r} is not valid. Choose one of: frozen, sync")
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"det.trainable_layers={trainable_layers} must be in 0..5")
    body = _Body(copy.deepcopy(encoder).cpu().float())
    train = ["layer4", "layer3", "layer2", "layer1", "stem"][:trainable_layers]
    for name, p in body.named_parameters():
        p.requires_grad_(name.split(".")[0] in train)
    if norm == "frozen":
        _freeze_bn(body)
    with torch.no_grad():
        was = body.training
        channels = [f.shape[1] for f in body.eval()(torch.zeros(1, 3, 64, 64)).values()]
        body.train(was)
    model = FasterRCNN(_BodyFPN(body, channels, fpn_channels), num_classes=None, min_size=tuple(min_sizes),
                       max_size=max_size, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
                       box_head=TwoMLPHead(fpn_channels * 7 * 7, head_dim),
                       box_predictor=FastRCNNPredictor(head_dim, num_classes + 1),
                       rpn_anchor_generator=AnchorGenerator(tuple((int(a),) for a in anchor_sizes),
                                                            ((0.5, 1.0, 2.0),) * len(anchor_sizes)),
                       box_batch_size_per_image=rois, rpn_pre_nms_top_n_train=proposals,
                       rpn_post_nms_top_n_train=proposals, rpn_pre_nms_top_n_test=max(1, proposals // 2),
                       rpn_post_nms_top_n_test=max(1, proposals // 2))
    model.backbone.amp = amp
    model.test_size = test_size
    return model.train()


def set_test_size(model: nn.Module, test: bool, min_sizes=None) -> None:
    """Point the detector's resize at the test size (`test`) or back at the training sizes."""
    t = model.transform
    if test:
        t._train_sizes = getattr(t, "_train_sizes", t.min_size)
        t.min_size = (model.test_size,)
    elif hasattr(t, "_train_sizes"):
        t.min_size = t._train_sizes


# ---------------------------------------------------------------------------------------- scores
def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007's 11-point AP: the mean over t = 0, 0.1, ..., 1 of the highest precision at recall >= t
    (0 where no recall reaches t)."""
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.arange(0.0, 1.1, 0.1)]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box with (M, 4) boxes (torchvision's box_iou: continuous coordinates, no +1 pixel)."""
    from torchvision.ops import box_iou

    return box_iou(torch.from_numpy(box[None]), torch.from_numpy(boxes))[0].numpy()


def voc_class_ap(dets: list, gts: dict, iou: float = 0.5) -> float | None:
    """VOC07 11-point AP of one class. dets: [(image_key, score, (4,) box)]; gts: {image_key: (boxes
    (M, 4), difficult (M,) bool)}. Detections are taken by falling score; one matches the ground-truth
    box of highest IoU in its image: above `iou` it is a true positive if that box is not yet taken, a
    false positive if it is (a duplicate), and ignored if the box is difficult; below, a false
    positive. None when the class has no non-difficult ground truth."""
    npos = sum(int((~np.asarray(d, bool)).sum()) for _, d in gts.values())
    if npos == 0:
        return None
    taken = {k: np.zeros(len(b), bool) for k, (b, _) in gts.items()}
    tp, fp = [], []
    for key, _, box in sorted(dets, key=lambda d: -d[1]):
        boxes, difficult = gts.get(key, (np.zeros((0, 4)), np.zeros(0, bool)))
        boxes, difficult = np.asarray(boxes, float).reshape(-1, 4), np.asarray(difficult, bool)
        ov = _iou(np.asarray(box, float), boxes) if len(boxes) else np.zeros(0)
        j = int(ov.argmax()) if len(ov) else -1
        if j >= 0 and ov[j] >= iou:
            if difficult[j]:
                continue
            hit = not taken[key][j]
            taken[key][j] = True
            tp.append(float(hit))
            fp.append(float(not hit))
        else:
            tp.append(0.0)
            fp.append(1.0)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
    return voc07_ap(recall, precision)


def voc_ap50(preds: list[dict], targets: list[dict], num_classes: int, iou: float = 0.5) -> float:
    """Mean over classes 1..num_classes with non-difficult ground truth of :func:`voc_class_ap` at IoU
    `iou` (0.5: VOC07's AP50). preds / targets: one dict per image (torchvision's boxes, scores, labels /
    boxes, labels, difficult)."""
    aps = []
    for c in range(1, num_classes + 1):
        gts, dets = {}, []
        for i, (p, t) in enumerate(zip(preds, targets)):
            m = t["labels"] == c
            gts[i] = (t["boxes"][m].numpy(), t["difficult"][m].numpy())
            mp = p["labels"] == c
            dets += [(i, float(s), b) for s, b in zip(p["scores"][mp], p["boxes"][mp].numpy())]
        ap = voc_class_ap(dets, gts, iou)
        if ap is not None:
            aps.append(ap)
    return float(np.mean(aps)) if aps else 0.0


def coco_ap(preds: list[dict], targets: list[dict]) -> dict:
    """{ap, ap50, ap75}: COCO-style box AP by torchmetrics' MeanAveragePrecision (pycocotools backend),
    difficult ground truth passed as iscrowd (ignored)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools",
                                  sync_on_compute=False)   # the caller gathers every rank's detections
    metric.update([{k: p[k].float() if k != "labels" else p[k] for k in ("boxes", "scores", "labels")}
                   for p in preds],
                  [{"boxes": t["boxes"].float(), "labels": t["labels"], "iscrowd": t["difficult"].long()}
                   for t in targets])
    r = metric.compute()
    return {"ap": float(r["map"]), "ap50": float(r["map_50"]), "ap75": float(r["map_75"])}


def detection_scores(preds: list[dict], targets: list[dict], num_classes: int) -> dict:
    """{ap50, ap, ap75 (COCO-style), voc07_ap50, voc07_ap75, voc07_ap} of per-image predictions against
    targets (CPU tensors). voc07_ap: the 11-point AP averaged over IoU 0.50:0.05:0.95, the "AP" of
    detectron2's VOC evaluator that MoCo's tables report (their AP50 / AP75 are voc07_ap50 / voc07_ap75).
    A COCO-style score is -1 where there is nothing to score (no ground truth)."""
    voc = {t: voc_ap50(preds, targets, num_classes, t) for t in np.linspace(0.5, 0.95, 10).round(2)}
    return {**coco_ap(preds, targets), "voc07_ap50": voc[0.5], "voc07_ap75": voc[0.75],
            "voc07_ap": float(np.mean(list(voc.values())))}
