"""The detection loop: a stop by SIGTERM checkpoints and exits resumable, and the resumed run equals an
uninterrupted one bit for bit (weights and scores); a changed setting is refused on resume; CLI errors."""
import json
import os
import signal

import pytest
import torch

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.data.detection import make_fake_detection
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.detection import det_schedule, run_detection
from selfsup.errors import CheckpointError, NonFiniteLossError, TrainingStopped
from selfsup.models.backbones import build_backbone


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_fake_detection(str(root), trainval=16, test=6, size=48, seed=3)
    return str(root)


def _cfg(root, *extra):
    return load_config("det-shapes-cpu", ["device=cpu", "model.backbone=resnet_small", f"eval.det_root={root}",
                                          "eval.det_iters=6", "eval.det_warmup_iters=2", "eval.det_log_every=2",
                                          "eval.det_min_sizes=[40,48]", "eval.det_test_size=48", *extra])


def _encoder():
    torch.manual_seed(0)
    return build_backbone("resnet_small", cifar_stem=False, width=8)[0]


def test_moco_schedule_scales_with_the_batch():
    e = load_config(None).eval
    assert det_schedule(e) == {"iters": 24000, "lr": 0.02, "steps": [18000, 22000], "warmup": 100, "batch": 16}
    e = load_config(None, ["eval.det_batch_size=8"]).eval
    assert det_schedule(e) == {"iters": 48000, "lr": 0.01, "steps": [36000, 44000], "warmup": 200, "batch": 8}


def test_sigterm_stops_and_the_resume_is_exact(shapes, tmp_path):
    cfg = _cfg(shapes)
    full = run_detection(cfg, _encoder(), tmp_path / "full", "random", "test")

    def preempt(it):
        if it == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped) as stop:
        run_detection(cfg, _encoder(), tmp_path / "cut", "random", "test", on_iteration=preempt)
    assert stop.value.exit_code == 75
    assert load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["iteration"] == 3
    resumed = run_detection(cfg, _encoder(), tmp_path / "cut", "random", "test")
    a = load_checkpoint(tmp_path / "full/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")
    assert a["iteration"] == b["iteration"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("ap50", "ap", "ap75", "voc07_ap50"):
        assert full[k] == resumed[k]
    # the resumed log holds each iteration's line once
    lines = [json.loads(x) for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["event"] == "det_train"] == [2, 4, 6]

    with pytest.raises(CheckpointError, match="det_lr"):   # another setting: refused, folder kept
        run_detection(_cfg(shapes, "eval.det_lr=0.05"), _encoder(), tmp_path / "cut", "random", "test")


def test_cli_errors_are_one_line(shapes, tmp_path, capsys):
    assert main(["eval", "detection", "--checkpoint", "x.pt"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["eval", "detection", "--run", str(tmp_path / "none")]) == 2
    assert main(["eval", "detection", "--run", "r", "eval.det_norm=group"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "frozen, sync" in err


def _two_ranks(rank, world, root, out):
    cfg = _cfg(root, "eval.det_iters=4")
    res = run_detection(cfg, _encoder(), out, "random", "test")
    ck = load_checkpoint(f"{out}/checkpoints/last.pt") if rank == 0 else None
    return res, ck["iteration"] if ck else None


def test_two_processes_split_the_batch_and_gather_the_test_set(shapes, tmp_path):
    from dist_utils import run_distributed

    (r0, it0), (r1, _) = run_distributed(_two_ranks, 2, shapes, str(tmp_path / "ddp"))
    assert r1 is None and it0 == 4
    assert r0["processes"] == 2 and r0["test_images"] == 6 and 0 <= r0["ap50"] <= 1


def test_coco_format_data_trains_and_scores(shapes, tmp_path):
    from selfsup.data.detection import SHAPE_CLASSES, VOCDetectionSet

    jpeg = f"{shapes}/VOCdevkit/VOC2007/JPEGImages"
    for split, image_set in (("train", "trainval"), ("test", "test")):
        voc = VOCDetectionSet(shapes, [2007], image_set, SHAPE_CLASSES)
        images, anns = [], []
        for i in range(len(voc)):
            _, t = voc[i]
            images.append({"id": i, "file_name": t["image_id"][5:] + ".jpg", "width": 48, "height": 48})
            for b, c, d in zip(t["boxes"].tolist(), t["labels"].tolist(), t["difficult"].tolist()):
                anns.append({"id": len(anns), "image_id": i, "category_id": c + 10, "iscrowd": int(d),
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        cats = [{"id": k + 11, "name": n} for k, n in enumerate(SHAPE_CLASSES)]
        (tmp_path / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                            "categories": cats}))
    cfg = _cfg(jpeg, "eval.det_data=coco", f"eval.det_ann={tmp_path / 'train.json'}", "eval.det_iters=2",
               f"eval.det_test_ann={tmp_path / 'test.json'}", "eval.det_classes=null")
    res = run_detection(cfg, _encoder(), tmp_path / "coco", "random", "test")
    assert res["classes"] == 3 and res["test_images"] == 6 and "COCO-format train.json -> test.json" in res["protocol"]


@pytest.mark.parametrize("name,kwargs", [("resnet18", {"cifar_stem": False}), ("resnet18", {"cifar_stem": True}),
                                         ("timm/resnet18", {}), ("resnet_small", {"width": 8})])
def test_resnet_encoders_map_to_the_fpn_body(name, kwargs):
    from selfsup.eval.detection import build_detector

    torch.manual_seed(0)
    enc = build_backbone(name, **kwargs)[0]
    model = build_detector(enc, 3, trainable_layers=2, min_sizes=(64,), max_size=64, test_size=64, rois=8,
                           proposals=20)
    body = model.backbone.body
    trained = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trained == {"layer3", "layer4"}
    stage4 = enc.layers[3] if name == "resnet_small" else enc.layer4   # the body holds the encoder's weights
    mine = body.layer4.state_dict()
    for k, v in stage4.state_dict().items():
        if "num_batches_tracked" not in k:   # FrozenBatchNorm2d has no counter
            assert torch.equal(v, mine[k]), k
    out = model.eval()([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores"}


def test_a_vit_encoder_is_refused():
    from selfsup.errors import ConfigError
    from selfsup.eval.detection import build_detector

    enc = build_backbone("timm/vit_tiny_patch16_224", backbone_args={"img_size": 32, "patch_size": 4})[0]
    with pytest.raises(ConfigError, match="ResNet encoder"):
        build_detector(enc, 3)


def test_bf16_runs_the_backbone_only_and_the_heads_in_fp32():
    from selfsup.eval.detection import build_detector

    model = build_detector(_encoder(), 3, min_sizes=(48,), max_size=48, test_size=48, rois=8, proposals=20,
                           amp=torch.bfloat16).eval()
    seen = {}
    model.rpn.head.register_forward_hook(lambda m, i, o: seen.update(rpn_in=i[0][0].dtype))
    model.roi_heads.box_head.register_forward_hook(lambda m, i, o: seen.update(head_out=o.dtype))
    out = model([torch.rand(3, 48, 48)])
    assert seen == {"rpn_in": torch.float32, "head_out": torch.float32} and out[0]["boxes"].dtype == torch.float32


def test_a_non_finite_loss_stops_with_the_fix_named(shapes, tmp_path):
    cfg = _cfg(shapes, "eval.det_lr=1e12", "eval.det_warmup_iters=0")
    with pytest.raises(NonFiniteLossError, match="lower eval.det_lr"):
        run_detection(cfg, _encoder(), tmp_path / "nan", "random", "test")
