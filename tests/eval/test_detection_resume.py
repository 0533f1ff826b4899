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
    return load_config("det-shapes-cpu", ["device=cpu", "model.backbone=resnet_small", f"det.root={root}",
                                          "det.iters=6", "det.warmup_iters=2", "det.log_every=2",
                                          "det.min_sizes=[40,48]", "det.test_size=48", *extra])


def _encoder():
    torch.manual_seed(0)
    return build_backbone("resnet_small", cifar_stem=False, width=8)[0]


def test_moco_schedule_scales_with_the_batch():
    e = load_config(None).det
    assert det_schedule(e) == {"iters": 24000, "lr": 0.02, "steps": [18000, 22000], "warmup": 100, "batch": 16}
    e = load_config(None, ["det.batch_size=8"]).det
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

    with pytest.raises(CheckpointError, match="lr: 0.02 -> 0.05"):   # another setting: refused, folder kept
        run_detection(_cfg(shapes, "det.lr=0.05"), _encoder(), tmp_path / "cut", "random", "test")


def test_cli_errors_are_one_line(shapes, tmp_path, capsys):
    assert main(["eval", "detection", "--checkpoint", "x.pt"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["eval", "detection", "--run", str(tmp_path / "none")]) == 2
    assert main(["eval", "detection", "--run", "r", "det.norm=group"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "frozen, sync" in err


def _two_ranks(rank, world, root, out):
    cfg = _cfg(root, "det.iters=4")
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
    cfg = _cfg(jpeg, "det.data=coco", f"det.ann={tmp_path / 'train.json'}", "det.iters=2",
               f"det.test_ann={tmp_path / 'test.json'}", "det.classes=null")
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
    cfg = _cfg(shapes, "det.lr=1e12", "det.warmup_iters=0")
    with pytest.raises(NonFiniteLossError, match="lower det.lr"):
        run_detection(cfg, _encoder(), tmp_path / "nan", "random", "test")


def test_a_detector_of_another_encoder_is_refused_not_resumed(shapes, tmp_path):
    from selfsup.engine.checkpoint import save_checkpoint
    from selfsup.engine.detection import encoder_digest

    cfg, out = _cfg(shapes, "det.iters=2"), tmp_path / "det"
    run_detection(cfg, _encoder(), out, "ssl", "run A")   # finished: a rerun would only test it again
    other = _encoder()
    with torch.no_grad():
        next(other.parameters()).add_(0.01)   # the run's encoder changed since (or another run's)
    with pytest.raises(CheckpointError, match="trained from run A .*not from run B.*new --out.*--restart"):
        run_detection(cfg, other, out, "ssl", "run B")
    res = run_detection(cfg, other, out, "ssl", "run B", restart=True)
    ck = load_checkpoint(out / "checkpoints/last.pt")
    assert ck["encoder"] == {"sha256": encoder_digest(other), "source": "run B"} and ck["iteration"] == 2
    assert res["encoder_sha256"] == encoder_digest(other) != encoder_digest(_encoder())
    assert run_detection(cfg, other, out, "ssl", "run B moved")["ap50"] == res["ap50"]   # the same weights resume
    old_names = dict(ck, det_config={f"det_{k}": v for k, v in ck["det_config"].items()})
    save_checkpoint(old_names, out / "checkpoints/last.pt")   # as older selfsup wrote it: eval.det_<key> names
    assert run_detection(cfg, other, out, "ssl", "run B")["ap50"] == res["ap50"]
    del ck["encoder"]   # written before the encoder was recorded: nothing says whose it is
    save_checkpoint(ck, out / "checkpoints/last.pt")
    with pytest.raises(CheckpointError, match="does not record"):
        run_detection(cfg, other, out, "ssl", "run B")


def _damage_first_test_box(root):
    import re
    import shutil

    shutil.copytree(root, root + "-damaged")
    base = f"{root}-damaged/VOCdevkit/VOC2007"
    name = open(f"{base}/ImageSets/Main/test.txt").read().split()[0]
    xml = f"{base}/Annotations/{name}.xml"
    text = open(xml).read()
    open(xml, "w").write(re.sub(r"<xmax>\d+</xmax>", "<xmax>0</xmax>", text, count=1))
    return root + "-damaged", name


def test_damaged_test_annotations_stop_before_any_training(shapes, tmp_path, capsys):
    from selfsup.errors import DatasetFormatError

    root, name = _damage_first_test_box(shapes)
    with pytest.raises(DatasetFormatError, match=f"{name}.xml: object 0 .*empty or inverted.*data.on_error=skip"):
        run_detection(_cfg(root), _encoder(), tmp_path / "det", "ssl", "test")
    assert not (tmp_path / "det").exists()   # refused before the first iteration, not after all of them
    res = run_detection(_cfg(root, "data.on_error=skip", "det.iters=1"), _encoder(), tmp_path / "det", "ssl",
                        "test")
    assert res["test_images"] == 6
    assert "VOC 2007 test: skipped 0 damaged image(s) and 1 damaged object(s)" in capsys.readouterr().out


def _cli(shapes, out, *extra):
    """`eval detection` on an encoder state dict of the tiny resnet_small, 2 iterations into `out`."""
    return main(["eval", "detection", "--checkpoint", str(out.parent / "enc.pt"), "--config", "simclr-fmnist-cpu",
                 "--preset", "det-shapes-cpu", "--root", shapes, "--out", str(out), "model.backbone=resnet_small",
                 "model.width=8", "model.cifar_stem=false", "det.iters=2", "det.warmup_iters=1",
                 "det.min_sizes=[48]", "det.test_size=48", "device=cpu", *extra])


def test_cli_refuses_another_encoders_detector_until_restart(shapes, tmp_path, capsys):
    torch.save(_encoder().state_dict(), tmp_path / "enc.pt")
    assert _cli(shapes, tmp_path / "out") == 0
    enc = _encoder()
    with torch.no_grad():
        next(enc.parameters()).mul_(2)
    torch.save(enc.state_dict(), tmp_path / "enc.pt")
    capsys.readouterr()
    assert _cli(shapes, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsup: error: ") and "--restart" in err and "Traceback" not in err
    assert _cli(shapes, tmp_path / "out", "--restart") == 0


def test_a_second_eval_detection_on_the_folder_is_refused(shapes, tmp_path, capsys):
    import subprocess
    import sys

    from selfsup.engine.detection import folder_lock

    torch.save(_encoder().state_dict(), tmp_path / "enc.pt")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(120)", str(out / ".detection.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _cli(shapes, out) == 2
        err = capsys.readouterr().err
        assert err.startswith("selfsup: error: ") and f"{out} is in use by another" in err
        assert not (out / "detection").exists()
    finally:
        holder.kill()   # the kernel releases a killed process's lock
        holder.wait()
    with folder_lock(out):
        pass
    with pytest.raises(RuntimeError), folder_lock(out):   # and the block's own lock on an error
        raise RuntimeError
    with folder_lock(out):
        pass


@pytest.mark.parametrize("text", ["[1, 2]", "{\"runs\": 3}", "{not json", ""])
def test_a_detection_json_that_is_not_an_object_is_named_before_training(text, shapes, tmp_path, capsys):
    torch.save(_encoder().state_dict(), tmp_path / "enc.pt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "detection.json").write_text(text)
    assert _cli(shapes, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsup: error: ") and f"{tmp_path / 'out' / 'detection.json'} is not a detection" in err
    assert not (tmp_path / "out" / "detection").exists()
