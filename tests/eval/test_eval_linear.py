"""Linear evaluation (selfsup.eval.linear): features and augment modes, schedules, errors."""
import pytest
import torch

from selfsup.config import ConfigError, load_config
from selfsup.data.datasets import ImageDataset, build_dataset
from selfsup.eval.linear import linear_eval, linear_probe_augment, linear_probe_features, linear_settings, lr_factor
from selfsup.models.backbones import SmallResNet

from conftest import TINY


def blobs(n, num_classes, dim=32, spread=0.3, seed=0):
    """Linearly separable data: well-separated gaussian blobs around random centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.arange(n) % num_classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


@pytest.mark.parametrize("num_classes", [3, 10])
def test_features_mode_separates_separable_data(num_classes):
    xtr, ytr = blobs(600, num_classes, seed=0)
    xte, yte = blobs(300, num_classes, seed=1)
    res = linear_probe_features(xtr, ytr, xte, yte, num_classes, epochs=10, lr=0.1, batch_size=64)
    assert res["linear_top1"] == 1.0 and res["linear_train_top1"] == 1.0
    assert res["feature_dim"] == 32
    assert ("linear_top5" in res) == (num_classes > 5)


def test_features_mode_is_deterministic_and_standardises():
    xtr, ytr = blobs(300, 4, seed=0)
    xte, yte = blobs(100, 4, seed=1)
    a = linear_probe_features(xtr, ytr, xte, yte, 4, epochs=2, seed=3)
    # an affine rescaling of the features changes nothing after standardising
    b = linear_probe_features(xtr * 1000 + 5, ytr, xte * 1000 + 5, yte, 4, epochs=2, seed=3)
    assert a["linear_top1"] == pytest.approx(b["linear_top1"], abs=0.02)
    assert linear_probe_features(xtr, ytr, xte, yte, 4, epochs=2, seed=3) == a


def test_schedules():
    step = lr_factor("step", 100)
    assert [step(s) for s in (0, 59, 60, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = lr_factor("cosine", 100)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="cosine"):
        lr_factor("linear", 10)


def test_settings_defaults_and_errors():
    s = linear_settings(load_config(None, ["eval.linear_mode=augment"]))
    assert (s["lr"], s["schedule"], s["weight_decay"]) == (30.0, "step", 0.0)   # MoCo
    s = linear_settings(load_config(None, []))
    assert (s["lr"], s["schedule"]) == (0.1, "cosine")
    for bad, needle in [("eval.linear_mode=frozen", "features, augment"), ("eval.linear_schedule=poly", "cosine, step"),
                        ("eval.linear_lr=0", "linear_lr")]:
        with pytest.raises(ConfigError, match=needle):
            linear_settings(load_config(None, [bad]))


def test_augment_mode_runs_and_leaves_the_encoder_untouched():
    torch.manual_seed(0)
    ds = build_dataset("synthetic", "train", image_size=16, num_samples=64, num_classes=4)
    test = build_dataset("synthetic", "test", image_size=16, num_samples=32, num_classes=4)
    enc = SmallResNet(width=4, cifar_stem=False).train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    res = linear_probe_augment(enc, ds, test, epochs=2, lr=1.0, batch_size=16, device="cpu")
    assert set(res) == {"linear_top1", "linear_train_top1", "feature_dim"}   # 4 classes: no top-5
    assert res["feature_dim"] == 32 and 0 <= res["linear_top1"] <= 1
    assert enc.training   # mode restored
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())   # frozen, BN stats too
    assert all(p.grad is None for p in enc.parameters())


def test_linear_eval_protocol_and_unlabelled_split():
    cfg = load_config(None, TINY + ["eval.linear_epochs=2", "data.image_size=16"])
    ds = build_dataset("synthetic", "train", image_size=16, num_samples=64)
    test = build_dataset("synthetic", "test", image_size=16, num_samples=32)
    enc = SmallResNet(width=4, cifar_stem=False)
    res = linear_eval(enc, cfg, ds, test, torch.device("cpu"), None)
    assert {"linear_top1", "linear_top5", "linear_train_top1"} <= set(res)
    for needle in ("linear (features)", "32-d", "lr 0.1", "2 epochs", "cosine", "train -> test", "standardised"):
        assert needle in res["protocol"]
    unlabelled = ImageDataset(ds.images, torch.full((64,), -1), [], "x/unlabeled")
    with pytest.raises(ConfigError, match="unlabelled"):
        linear_eval(enc, cfg, unlabelled, test, torch.device("cpu"), None)
