"""Semi-supervised fine-tuning (selfsup.eval.finetune): label subsets, head layers, training."""
import json

import pytest
import torch

from selfsup.config import ConfigError, load_config
from selfsup.data.datasets import ImageDataset
from selfsup.eval.finetune import balanced_subset, classifier_net, default_epochs, finetune_eval, fraction_tag
from selfsup.models.backbones import SmallResNet
from selfsup.models.heads import projection_head

from conftest import TINY


@pytest.mark.parametrize("fraction,per_class", [(0.01, 6), (0.1, 60)])
def test_balanced_subsets(fraction, per_class):
    labels = (torch.arange(6000) * 7 % 10)[torch.randperm(6000, generator=torch.Generator().manual_seed(0))]
    labels[:300] = 3   # a larger class does not get more items
    idx = balanced_subset(labels, fraction, seed=0, num_classes=10)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [per_class] * 10
    assert len(set(idx.tolist())) == len(idx) and torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, balanced_subset(labels, fraction, seed=0, num_classes=10))
    assert not torch.equal(idx, balanced_subset(labels, fraction, seed=1, num_classes=10))


def test_subset_errors_and_defaults():
    labels = torch.arange(100) % 10
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            balanced_subset(labels, bad)
    with pytest.raises(ConfigError, match="class 1 has 10 items"):
        balanced_subset(torch.cat([labels, torch.zeros(100, dtype=torch.long)]), 0.8, num_classes=10)
    assert balanced_subset(labels[:95], 1.0).tolist() == list(range(95))   # 100%: every item
    assert (fraction_tag(0.01), fraction_tag(0.1), fraction_tag(0.005)) == ("1pct", "10pct", "0.5pct")
    assert (default_epochs(0.01), default_epochs(0.1)) == (60, 30)


def test_classifier_from_head_layer():
    enc = SmallResNet(width=4, cifar_stem=False)
    probe = torch.randn(2, 3, 16, 16)
    assert classifier_net(enc, 7, probe)[-1].in_features == 32
    head = projection_head(32, 24, 16, layers=3)   # SimCLR v2: two hidden layers
    net = classifier_net(enc, 7, probe, head, from_head_layer=1)
    assert net[-1].in_features == 24 and len(net) == 5   # encoder, Linear, BN, ReLU, classifier
    assert net[1] is not head[0] and torch.equal(net[1].weight, head[0].weight)   # a copy, same weights
    assert len(classifier_net(enc, 7, probe, head, from_head_layer=2)) == 8
    for bad_head, layer in ((head, 3), (projection_head(32, 24, 16, layers=1), 1), (None, 1)):
        with pytest.raises(ConfigError, match="hidden layer"):
            classifier_net(enc, 7, probe, bad_head, from_head_layer=layer)


def easy(n, seed):
    """Two classes that survive crop + flip: dark and bright images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (60 + 130 * y.view(n, 1, 1, 1) + 40 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 255)
    return ImageDataset(x.to(torch.uint8), y, ["dark", "bright"], f"easy/{seed}")


def test_finetune_learns_an_easy_task_and_saves_subsets(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, TINY + ["data.image_size=16", "eval.finetune_fractions=[0.2,0.5]", "eval.finetune_lr=0.1",
                                    "eval.finetune_epochs=4", "eval.finetune_batch_size=20",
                                    "eval.aug_crop_scale=[0.5,1.0]"])
    train, test = easy(200, 0), easy(100, 1)
    enc = SmallResNet(width=4, cifar_stem=False)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    res = finetune_eval(enc, cfg, train, test, torch.device("cpu"), None, out_dir=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())   # works on a copy
    for tag, n in (("20pct", 40), ("50pct", 100)):
        assert res[f"finetune_{tag}_labels"] == n and f"finetune_{tag}_top5" not in res   # 2 classes: no top-5
        assert res[f"finetune_{tag}_top1"] > 0.8, res   # chance is 0.5
        saved = json.loads((tmp_path / f"finetune_subset_{tag}.json").read_text())
        assert saved["split"] == "train" and saved["seed"] == 0 and saved["per_class"] == n // 2
        assert saved["indices"] == balanced_subset(train.labels, saved["fraction"], 0).tolist()
    for needle in ("Nesterov", "no weight decay", "lr 0.1", "batch 20", "BN in training mode",
                   "20pct: 40 labels, 4 epochs"):
        assert needle in res["protocol"]


def test_finetune_refuses_test_split_and_bad_fractions():
    with pytest.raises(ConfigError, match="disjoint"):   # checked with the config, before any data
        load_config(None, TINY + ["eval.train_split=test"])
    with pytest.raises(ConfigError, match="finetune_fractions"):
        load_config(None, TINY + ["eval.finetune_fractions=[0.1,1.5]"])
