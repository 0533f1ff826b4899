"""`selfsup export` (torchvision, timm, hf, torchvision-detection), each loaded by the other library, and
exports read back by `selfsup eval --checkpoint` and `selfsup train --init-from`."""
import json
import shutil

import pytest
import torch
import torchvision
from conftest import TINY
from safetensors.torch import load_file

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.engine.export import export_run
from selfsup.models.backbones import build_backbone

RESNET18 = ["model.backbone=resnet18", "model.cifar_stem=false", "data.image_size=32", "train.max_steps=1",
            "eval.every=0"]


@pytest.fixture(scope="module")
def r18_run(tmp_path_factory):
    """A resnet18 (no CIFAR stem) run of one step, with a kNN result in RUN_DIR/eval."""
    run = tmp_path_factory.mktemp("r18") / "run"
    assert main(["train", *TINY, *RESNET18, f"run_dir={run}"]) == 0
    assert main(["eval", "knn", "--run", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", *TINY, "train.max_steps=1", "eval.every=0", f"run_dir={run}"]) == 0
    return run


def _features(net, x):
    return net.eval()(x)


def test_export_torchvision_loads_into_torchvision_resnet18(r18_run, tmp_path):
    assert main(["export", "--run", str(r18_run), "--format", "torchvision", "--out", str(tmp_path / "tv")]) == 0
    sd = load_file(str(tmp_path / "tv/encoder.safetensors"))
    net = torchvision.models.resnet18()
    res = net.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    net.fc = torch.nn.Identity()
    enc = build_backbone("resnet18", cifar_stem=False)[0]
    enc.load_state_dict(load_file(str(r18_run / "encoder.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(_features(net, x), _features(enc, x), atol=1e-5)


def test_export_timm_loads_with_timm_and_gives_the_same_features(r18_run, tmp_path):
    timm = pytest.importorskip("timm")
    out = tmp_path / "timm"
    assert main(["export", "--run", str(r18_run), "--format", "timm", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["num_classes"] == 0 and cfg["num_features"] == 512
    assert cfg["pretrained_cfg"]["mean"] == [0.5] * 3 and cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0)
    enc = build_backbone("resnet18", cifar_stem=False)[0]
    enc.load_state_dict(load_file(str(r18_run / "encoder.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    f = _features(model, x)
    assert f.shape == (2, 512) and torch.allclose(f, _features(enc, x), atol=1e-5)
    # timm's ResNet uses torchvision's key names: the same keys, the same shapes
    tm = timm.create_model("resnet50", pretrained=False, num_classes=0).state_dict()
    tv = build_backbone("resnet50", cifar_stem=False)[0].state_dict()
    assert {k: v.shape for k, v in tm.items()} == {k: v.shape for k, v in tv.items()}


def test_export_hf_has_the_timm_folder_and_a_model_card(r18_run, tmp_path):
    timm = pytest.importorskip("timm")
    out = tmp_path / "hf"
    assert main(["export", "--run", str(r18_run), "--format", "hf", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    knn = json.loads((r18_run / "eval/knn.json").read_text())
    assert knn["protocol"] in card and f"knn_top1 {knn['knn_top1']:.4f}" in card
    assert "data: synthetic" in card and "epochs: 2" in card and "local-dir:" in card and "simclr" in card
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0)
    assert _features(model, torch.randn(1, 3, 32, 32)).shape == (1, 512)


VIT = ["model.backbone=timm/vit_tiny_patch16_224", "model.backbone_args.img_size=32", "model.backbone_args.patch_size=8",
       "train.max_steps=1", "eval.every=0"]


def test_export_timm_backbone_round_trip(tmp_path, capsys):
    """A timm backbone (a tiny ViT with model_args) exports as timm/hf, loads in timm with the same
    features, starts a new run (--init-from), and refuses the ResNet formats."""
    timm = pytest.importorskip("timm")
    run = tmp_path / "vit"
    assert main(["train", *TINY, *VIT, f"run_dir={run}"]) == 0
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["model_args"] == {"img_size": 32, "patch_size": 8}
    model = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True, num_classes=0)
    ref = load_file(str(run / "encoder.safetensors"))
    enc = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8)
    enc.load_state_dict(ref)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(_features(model, x), _features(enc, x), atol=1e-5)
    init = tmp_path / "init"
    assert main(["train", *TINY, *VIT, "train.max_steps=0", f"run_dir={init}", "--init-from", str(tmp_path / "hf")]) == 0
    got = load_file(str(init / "encoder.safetensors"))
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    err = _error(capsys, ["export", "--run", str(run), "--format", "torchvision-detection", "--out", str(tmp_path / "x")])
    assert "timm/vit_tiny_patch16_224" in err and "use --format timm or hf" in err


def _detection_set(n=4, size=128, seed=0):
    """Coloured rectangles on noise: images in [0, 1], one or two boxes each, labels 1 (red) or 2 (green)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g) * 0.3
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            x0, y0 = (int(v) for v in torch.randint(0, size - 48, (2,), generator=g))
            w, h = (int(v) for v in torch.randint(24, 48, (2,), generator=g))
            label = int(torch.randint(1, 3, (1,), generator=g))
            img[:, y0:y0 + h, x0:x0 + w] = 0.0
            img[label - 1, y0:y0 + h, x0:x0 + w] = 1.0
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def test_export_detection_loads_into_fasterrcnn_body_and_trains(tmp_path):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    cfg = load_config(None, TINY + ["model.backbone=resnet50", "model.cifar_stem=false", "data.image_size=128"])
    torch.manual_seed(0)
    enc = build_backbone("resnet50", cifar_stem=False)[0]
    res = export_run(cfg, enc, "torchvision-detection", tmp_path / "det", tmp_path)
    assert res["files"] == ["backbone_body.safetensors", "README.md"]
    sd = load_file(str(tmp_path / "det/backbone_body.safetensors"))
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    frozen = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d)
    frozen.body.load_state_dict(sd)   # strict: FrozenBatchNorm2d, as with pretrained detection weights
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128,
                                    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                                    box_batch_size_per_image=32)
    model.backbone.body.load_state_dict(sd)   # strict: no missing body keys
    assert torch.equal(model.backbone.body.conv1.weight, enc.conv1.weight.detach())
    for p in model.backbone.body.parameters():   # a pre-trained body, frozen (and a fast test)
        p.requires_grad_(False)
    images, targets = _detection_set()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(10):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses


def test_eval_and_init_from_read_every_export(r18_run, tmp_path, capsys):
    pytest.importorskip("timm")
    for fmt in ("torchvision", "timm", "torchvision-detection"):
        assert main(["export", "--run", str(r18_run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    capsys.readouterr()
    assert main(["eval", "knn", "--run", str(r18_run)]) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"]
    sources = [["--checkpoint", str(tmp_path / "torchvision/encoder.safetensors"), "--config",
                str(r18_run / "config.yaml")],
               ["--checkpoint", str(tmp_path / "timm")],                    # the folder keeps the run's config
               ["--checkpoint", str(tmp_path / "torchvision-detection")]]   # no num_batches_tracked: still loads
    for src in sources:
        assert main(["eval", "knn", *src]) == 0, src
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"] == want, src
    ref = load_file(str(r18_run / "encoder.safetensors"))
    for i, export in enumerate([tmp_path / "torchvision/encoder.safetensors", tmp_path / "timm",
                                tmp_path / "torchvision-detection"]):
        # max_steps=0: the run's encoder is its starting point; moco: the key encoder starts there too
        run = tmp_path / f"init{i}"
        assert main(["train", *TINY, *RESNET18, "method=moco", "moco.queue_size=64", "train.max_steps=0",
                     f"run_dir={run}", "--init-from", str(export)]) == 0
        got = load_file(str(run / "encoder.safetensors"))
        assert all(torch.equal(got[k], ref[k]) for k in ref if not k.endswith("num_batches_tracked")), export
        model = torch.load(run / "checkpoints/last.pt", weights_only=False)["model"]
        assert torch.equal(model["key_encoder.backbone.conv1.weight"], ref["conv1.weight"])


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup: error: ") and "\n" not in err.split("\n\n")[0].split("\n")[0]
    return err


def test_bad_exports_fail_with_one_line_naming_what_fits(tiny_run, r18_run, tmp_path, capsys):
    err = _error(capsys, ["export", "--run", str(tiny_run), "--format", "timm", "--out", str(tmp_path / "x")])
    assert "resnet_small" in err and "no export format fits" in err and "--init-from" in err
    assert not (tmp_path / "x").exists()
    err = _error(capsys, ["export", "--run", str(tiny_run), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert "onnx" in err and "torchvision-detection" in err
    # a CIFAR-stem torchvision ResNet: torchvision only
    cifar = tmp_path / "cifar"
    shutil.copytree(r18_run, cifar)
    text = (cifar / "config.yaml").read_text()
    assert "cifar_stem: false" in text
    (cifar / "config.yaml").write_text(text.replace("cifar_stem: false", "cifar_stem: true"))
    err = _error(capsys, ["export", "--run", str(cifar), "--format", "timm", "--out", str(tmp_path / "x")])
    assert "CIFAR stem" in err and "use --format torchvision" in err
    # an export folder missing a file
    assert main(["export", "--run", str(r18_run), "--format", "timm", "--out", str(tmp_path / "t")]) == 0
    (tmp_path / "t/config.json").unlink()
    err = _error(capsys, ["eval", "knn", "--checkpoint", str(tmp_path / "t")])
    assert "config.json" in err and "model.safetensors" in err
    err = _error(capsys, ["train", *TINY, *RESNET18, f"run_dir={tmp_path / 'r'}", "--init-from", str(tmp_path / "t")])
    assert "has no config.json" in err and not (tmp_path / "r").exists()
    # weights of another backbone
    err = _error(capsys, ["train", *TINY, "train.max_steps=0", "eval.every=0", f"run_dir={tmp_path / 'r'}",
                          "--init-from", str(r18_run / "encoder.safetensors")])
    assert "does not match this config's model, model.backbone=resnet_small" in err
