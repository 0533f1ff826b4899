"""`selfsup eval knn --baselines`: raw pixels and the encoder at random init, against plain references."""
import json

import numpy as np
import pytest
import torch

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.data.images import ImageDataset
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.eval.baselines import gains, gains_line, pixel_baseline, random_init_baseline
from selfsup.methods import build_method

from conftest import TINY


def _reference_knn(train, ytrain, test, ytest, k, t, classes):
    """Weighted kNN written plainly in numpy (float64): top-k cosine neighbours vote exp(s / t)."""
    correct = 0
    for q, y in zip(test, ytest):
        sim = train @ q
        nb = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(classes)
        for i in nb:
            votes[ytrain[i]] += np.exp(sim[i] / t)
        correct += int(np.argmax(votes) == y)
    return correct / len(test)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _tiny_sets(seed=0):
    g = torch.Generator().manual_seed(seed)
    # 3 classes of 12x12 grey images: a bright square at a class-dependent place, plus noise
    def make(n):
        labels = torch.arange(n) % 3
        img = torch.randint(0, 60, (n, 1, 12, 12), generator=g)
        for i, c in enumerate(labels.tolist()):
            img[i, 0, 2 + 3 * c:6 + 3 * c, 3:9] += 150
        return ImageDataset(img.clamp(0, 255).to(torch.uint8), labels, ["a", "b", "c"], "tiny")
    return make(60), make(30)


def test_pixel_baseline_matches_a_hand_computation():
    cfg = load_config("simclr-fmnist-cpu", ["eval.knn_k=7", "eval.knn_temperature=0.1"])
    train, test = _tiny_sets()
    res = pixel_baseline(cfg, train, test, torch.device("cpu"))
    # by hand: (x / 255 - 0.5) / 0.5 on 3 replicated channels, flattened, minus the train mean image, unit length
    def flat(ds):
        x = (ds.images.numpy().astype(np.float64) / 255 - 0.5) / 0.5
        return np.repeat(x, 3, axis=1).reshape(len(ds), -1)
    a, b = flat(train), flat(test)
    mean = a.mean(0)
    want = _reference_knn(_unit(a - mean), train.labels.numpy(), _unit(b - mean), test.labels.numpy(), 7, 0.1, 3)
    assert res["baseline_pixels_top1"] == pytest.approx(want, abs=1e-6)
    assert 0.5 < want <= 1.0   # the classes are separable in pixel space: a meaningful check
    assert "mean image" in res["protocol_baseline_pixels"] and "432-d" in res["protocol_baseline_pixels"]


def test_random_init_baseline_is_the_runs_own_start(tmp_path):
    """The encoder it scores is the one a run of the same config and seed starts from (train.max_steps=0
    exports the untrained encoder), scored with the plain kNN."""
    run = tmp_path / "run"
    overrides = TINY + ["seed=3", "train.max_steps=0", "eval.every=0", f"run_dir={run}"]
    assert main(["train", *overrides]) == 0
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.seed)
    enc = build_method(cfg).encoder
    from safetensors.torch import load_file

    saved = load_file(str(run / "encoder.safetensors"))
    for k, v in enc.state_dict().items():
        assert torch.equal(saved[k], v), k
    train, test = _tiny_sets(1)
    train = ImageDataset(train.images.expand(-1, 3, -1, -1).contiguous(), train.labels, train.classes, "t")
    test = ImageDataset(test.images.expand(-1, 3, -1, -1).contiguous(), test.labels, test.classes, "t")
    cfg.eval.knn_k = 5
    torch.manual_seed(123)
    before = torch.rand(1)
    res = random_init_baseline(cfg, train, test, torch.device("cpu"), None)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)   # it leaves the caller's random stream alone
    enc.eval()
    with torch.no_grad():
        f = lambda ds: _unit(enc((ds.images.float() / 255 - 0.5) / 0.5).double().numpy())   # noqa: E731
        want = _reference_knn(f(train), train.labels.numpy(), f(test), test.labels.numpy(), 5, cfg.eval.knn_temperature, 3)
    assert res["baseline_random_init_top1"] == pytest.approx(want, abs=1e-6)
    assert "seed 3" in res["protocol_baseline_random_init"]


def test_cli_baselines_stored_in_knn_json_and_shown_by_the_report(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "train.max_steps=4", "eval.every=0", f"run_dir={run}"]) == 0
    capsys.readouterr()
    assert main(["eval", "knn", "--run", str(run), "--baselines"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert out[-2].startswith("kNN top-1") and "raw pixels" in out[-2] and "random init" in out[-2]
    stored = json.loads((run / "eval/knn.json").read_text())
    for key in ("baseline_pixels_top1", "baseline_random_init_top1", "protocol_baseline_pixels",
                "protocol_baseline_random_init"):
        assert stored[key] == res[key]
    assert main(["report", "--run", str(run)]) == 0
    md = (run / "report.md").read_text()
    g = gains(stored)
    assert f"gain over raw pixels | {g['pixels'][1]:+.4f}" in md
    assert f"gain over random init | {g['random_init'][1]:+.4f}" in md
    # each baseline row of the evaluations table carries its own protocol
    assert "| knn.json | baseline_pixels_top1 |" in md and "centred by the train split's mean image" in md


def test_gains_line():
    res = {"knn_top1": 0.87, "baseline_pixels_top1": 0.82, "baseline_random_init_top1": 0.775}
    assert gains_line(res) == "kNN top-1 0.8700 (raw pixels 0.8200: +0.0500; random init 0.7750: +0.0950)"
    assert gains_line({"knn_top1": 0.5}) == "kNN top-1 0.5000"
