"""timm backbones (`model.backbone=timm/<name>`): every method trains a tiny ViT; wrong names and
non-encoders fail early; ViT-aware weight-decay groups; layer-wise lr decay of fine-tuning."""
import json
import math

import pytest
import torch

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.errors import ConfigError
from selfsup.eval.finetune import classifier_net, layer_decay_groups
from selfsup.methods import build_method
from selfsup.models.backbones import build_backbone
from selfsup.optim import build_optimizer, param_groups

VIT = "timm/vit_tiny_patch16_224"
VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_VIT = [
    "device=cpu", "data.name=synthetic", "data.image_size=32", f"model.backbone={VIT}",
    *[f"model.backbone_args.{k}={v}" for k, v in VIT_ARGS.items()],
    "model.head_hidden=32", "model.proj_dim=16", "train.batch_size=16", "train.max_steps=3", "eval.every=0",
    "train.threads=1", "train.log_every=1", "aug.blur=false",
]
PRESETS = ["simclr-fmnist-cpu", "mocov1-fmnist-cpu", "mocov2-fmnist-cpu", "instdisc-fmnist-cpu",
           "pic-fmnist-cpu", "millionway-fmnist-cpu", "mocov3-vit-fmnist-cpu"]


def _vit():
    return build_backbone(VIT, backbone_args=dict(VIT_ARGS))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_method_trains_a_tiny_vit(preset, tmp_path, capsys):
    run = tmp_path / "run"
    over = ["train.optimizer=adamw", "train.base_lr=0.001", "train.weight_decay=0.05", "train.warmup_epochs=1"]
    assert main(["train", preset, *TINY_VIT, *over, f"run_dir={run}"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses), rows
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3


def test_a_wrong_timm_name_fails_with_close_matches_before_any_data(tmp_path, capsys):
    with pytest.raises(ConfigError, match="vit_tiny_patch16_224"):
        load_config("simclr-fmnist-cpu", ["model.backbone=timm/vit_tiny_patch16_244"])
    run = tmp_path / "run"
    # data.name=fashion-mnist is not installed here: the name check must come first
    assert main(["train", "simclr-fmnist-cpu", "model.backbone=timm/vit_tiny_patch16_244", f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "no model 'vit_tiny_patch16_244'" in err and "timm/vit_tiny_patch16_224" in err, err
    assert not run.exists()


def test_backbone_args_only_for_timm_and_must_be_names():
    with pytest.raises(ConfigError, match="timm/<name> backbones"):
        load_config("simclr-fmnist-cpu", ["model.backbone_args.img_size=32"])
    with pytest.raises(ConfigError, match="space after each colon"):
        load_config("simclr-fmnist-cpu", [f"model.backbone={VIT}", "model.backbone_args={img_size:32}"])


@pytest.mark.parametrize("arg,needle", [
    ("depth=-1", "model.backbone_args.depth=-1 is not valid"),
    ("patch_size=0", "model.backbone_args.patch_size=0 is not valid"),
    ("num_heads=0", "model.backbone_args.num_heads=0 is not valid"),
    ("embed_dim=97", "model.backbone_args.embed_dim=97 is not divisible by num_heads=3"),
    ("mlp_ratio=-1", "model.backbone_args.mlp_ratio=-1 is not valid"),
    ("drop_path_rate=2", "model.backbone_args.drop_path_rate=2 is not valid"),
    ("embed_dim=1000000000", "model.backbone_args.embed_dim=1000000000"),
    ("embed_dim=300000", "too large"),
    ("in_chans=1", "model.backbone_args.in_chans=1 is not valid: it must be 3"),
    ("patch_size=64", "model.backbone_args.patch_size=64 is larger than img_size=28"),
    ("class_token=false", "model.backbone_args.class_token=False (AssertionError"),
    ("bogus=1", "model.backbone_args.bogus=1 (TypeError"),
])
def test_backbone_args_timm_rejects_are_config_errors_naming_the_key_before_any_data(arg, needle, tmp_path, capsys):
    from selfsup.cli import main

    run = tmp_path / "run"   # data.name=fashion-mnist is not installed here: the check comes before the data
    assert main(["train", "mocov3-vit-fmnist-cpu", f"model.backbone_args.{arg}", f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsup: error: ") and needle in err, err
    assert not run.exists()


def test_backbone_args_timm_rejects_are_config_errors_when_building_too():
    for bad in ({"num_heads": 0}, {"embed_dim": 33}, {"depth": -1}):   # past validation (the Python API)
        with pytest.raises(ConfigError, match="timm cannot build"):
            build_backbone(VIT, backbone_args={**VIT_ARGS, **bad})
    with pytest.raises(ConfigError, match=r"Check model.backbone_args .*in_chans 3"):
        build_backbone(VIT, backbone_args={**VIT_ARGS, "in_chans": 1})


def test_a_timm_model_without_pooled_features_is_refused():
    with pytest.raises(ConfigError, match="not an image encoder with pooled features"):
        build_backbone(VIT, backbone_args={**VIT_ARGS, "global_pool": ""})


def test_feat_dim_is_num_features_and_drop_path_is_off():
    net, dim = _vit()
    assert dim == net.num_features == 32
    assert net.training
    assert all(getattr(b.drop_path1, "drop_prob", 0.0) == 0.0 for b in net.blocks)
    assert net(torch.zeros(3, 3, 32, 32)).shape == (3, 32)
    net2, _ = build_backbone(VIT, backbone_args={**VIT_ARGS, "drop_path_rate": 0.1})
    assert net2.blocks[-1].drop_path1.drop_prob > 0


def test_vit_param_groups_keep_embeddings_tokens_norms_and_biases_out_of_weight_decay():
    cfg = load_config("simclr-fmnist-cpu", TINY_VIT)
    model = build_method(cfg)
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    excluded = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    for n in ("backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight", "backbone.norm.bias",
              "backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias"):
        assert n in excluded
    for n in ("backbone.patch_embed.proj.weight", "backbone.blocks.1.attn.qkv.weight", "backbone.blocks.0.mlp.fc1.weight"):
        assert n in decayed
    opt = build_optimizer(groups, "adamw", 1e-3, 0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_moco_shuffle_bn_is_a_no_op_without_batchnorm():
    vit_v1 = build_method(load_config("mocov1-fmnist-cpu", TINY_VIT + ["model.head_layers=1"]))
    assert not vit_v1.shuffle_bn   # no BN anywhere in the key encoder: nothing to shuffle
    vit_v2 = build_method(load_config("mocov2-fmnist-cpu", TINY_VIT))
    assert vit_v2.shuffle_bn       # the MLP head has BN: shuffled as before


def test_layer_decay_lrs_of_a_vit_and_a_resnet():
    probe = torch.zeros(2, 3, 32, 32)
    net = classifier_net(_vit()[0], 10, probe)
    lr, d = 0.1, 0.5
    by_name = {}
    for g in layer_decay_groups(net, lr, d):
        for p in g["params"]:
            by_name[id(p)] = g["lr"]
    lrs = {n: by_name[id(p)] for n, p in net.named_parameters()}
    # depth 2: L = 3; patch_embed/cls/pos 0, blocks.i i + 1, norm and classifier L
    assert lrs["0.cls_token"] == pytest.approx(lr * d ** 3)
    assert lrs["0.pos_embed"] == pytest.approx(lr * d ** 3)
    assert lrs["0.patch_embed.proj.weight"] == pytest.approx(lr * d ** 3)
    assert lrs["0.blocks.0.attn.qkv.weight"] == pytest.approx(lr * d ** 2)
    assert lrs["0.blocks.1.mlp.fc2.bias"] == pytest.approx(lr * d)
    assert lrs["0.norm.weight"] == pytest.approx(lr)
    assert lrs["1.weight"] == pytest.approx(lr)

    res = classifier_net(build_backbone("resnet18")[0], 10, probe)
    lrs = {n: g["lr"] for g in layer_decay_groups(res, lr, d) for n, p in res.named_parameters()
           if any(p is q for q in g["params"])}
    assert lrs["0.conv1.weight"] == pytest.approx(lr * d ** 5)
    assert lrs["0.layer1.0.conv1.weight"] == pytest.approx(lr * d ** 4)
    assert lrs["0.layer4.1.bn2.bias"] == pytest.approx(lr * d)
    assert lrs["1.weight"] == pytest.approx(lr)


def test_layer_decay_config_range():
    with pytest.raises(ConfigError, match="eval.layer_decay"):
        load_config("simclr-fmnist-cpu", ["eval.layer_decay=0"])
    assert load_config("simclr-fmnist-cpu", ["eval.layer_decay=0.65"]).eval.layer_decay == 0.65


def test_eval_finetune_with_layer_decay_on_a_vit_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "simclr-fmnist-cpu", *TINY_VIT, f"run_dir={run}"]) == 0
    argv = ["eval", "finetune", "--run", str(run), "eval.layer_decay=0.65", "eval.finetune_epochs=1",
            "eval.finetune_fractions=[0.1]", "eval.finetune_batch_size=16"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "layer-wise lr decay 0.65" in res["protocol"] and 0 <= res["finetune_10pct_top1"] <= 1


def test_a_vit_fed_another_image_size_is_a_config_error(tmp_path, capsys):
    from selfsup.cli import main

    run = tmp_path / "run"
    assert main(["train", "mocov3-vit-fmnist-cpu", "data.name=synthetic", "data.image_size=32", "train.max_steps=1",
                 "eval.every=0", f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "the ViT reads 28x28 images but the training images are 32x32" in err and "Traceback" not in err
    assert not run.exists()
