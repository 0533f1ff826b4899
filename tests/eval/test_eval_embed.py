import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format
from PIL import Image
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

from selfsup.cli import main
from selfsup.engine.load import load_run_encoder
from selfsup.data.splits import load_split
from selfsup.eval.embed import sprite_image, subset_indices
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_accuracy, knn_sweep

from conftest import TINY


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("embed") / "run"
    assert main(["train", *TINY, "train.max_steps=3", f"run_dir={run}"]) == 0
    return run


def clustered(n_train, n_test, classes, dim=8, noise=1.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    ytr, yte = torch.randint(0, classes, (n_train,), generator=g), torch.randint(0, classes, (n_test,), generator=g)
    tr = F.normalize(centers[ytr] + noise * torch.randn(n_train, dim, generator=g), dim=1)
    te = F.normalize(centers[yte] + noise * torch.randn(n_test, dim, generator=g), dim=1)
    return tr, ytr, te, yte


@pytest.mark.parametrize("classes", [10, 4])
def test_knn_sweep_equals_knn_accuracy_for_every_pair(classes):
    tr, ytr, te, yte = clustered(300, 97, classes)
    ks, ts = [1, 5, 20, 400], [0.05, 0.1, 0.5]   # 400 > N: clipped as knn_accuracy clips
    table = knn_sweep(tr, ytr, te, yte, ks, ts, classes, chunk=16)
    assert [(r["k"], r["t"]) for r in table] == [(k, t) for k in ks for t in ts]
    for r in table:
        ref = knn_accuracy(tr, ytr, te, yte, r["k"], r["t"], classes)
        assert r["top1"] == ref["knn_top1"]
        assert r["top5"] == ref.get("knn_top5")   # None with <= 5 classes, like knn_accuracy
    assert len({r["top1"] for r in table}) > 1       # the pairs do differ


def test_knn_sweep_rejects_bad_values():
    tr, ytr, te, yte = clustered(20, 5, 3)
    for ks, ts in [([], [0.1]), ([0], [0.1]), ([5], [0.0])]:
        with pytest.raises(ValueError):
            knn_sweep(tr, ytr, te, yte, ks, ts, 3)


def test_subset_indices_is_deterministic_sorted_and_unique():
    a, b = subset_indices(1000, 100), subset_indices(1000, 100)
    assert torch.equal(a, b) and len(a) == 100 and len(a.unique()) == 100
    assert torch.equal(a, a.sort().values) and int(a.max()) < 1000
    assert torch.equal(subset_indices(50, 100), torch.arange(50))
    assert torch.equal(subset_indices(50, None), torch.arange(50))


def test_sprite_tiles_row_major_and_greys_become_rgb():
    images = torch.arange(7, dtype=torch.uint8).mul(30).view(7, 1, 1, 1).expand(7, 1, 4, 4).contiguous()
    sprite, side = sprite_image(images)
    assert side == 4 and sprite.mode == "RGB" and sprite.size == (12, 12)   # 3 x 3 grid, square
    px = np.asarray(sprite)
    for i in range(7):
        r, c = divmod(i, 3)
        assert (px[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] == 30 * i).all()
    small, side = sprite_image(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), max_side=64)
    assert side == 16 and small.size == (64, 64)   # 4 columns x 16 px


def test_embed_round_trip_and_projector(run, capsys):
    assert main(["embed", "--run", str(run), "--max-points", "50"]) == 0
    res = last_json(capsys)
    out = run / "eval" / "embed-test"
    assert res["out"] == str(out) and res["num"] == 500 and res["projector_points"] == 50
    cfg, encoder = load_run_encoder(str(run), None, None, [])
    ds = load_split(cfg, "test")
    want = extract_features(encoder, ds.images, cfg.eval.batch_size, torch.device("cpu"), normalize=False)
    feats = np.load(out / "features.npy")
    assert feats.dtype == np.float32 and feats.shape == tuple(want.shape) == (500, res["dim"])
    np.testing.assert_allclose(feats, want.numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.load(out / "labels.npy"), ds.labels.numpy())
    assert np.array_equal(np.load(out / "indices.npy"), np.arange(500))

    proj = out / "projector"
    cfg_pb = text_format.Parse((proj / "projector_config.pbtxt").read_text(), ProjectorConfig())
    emb = cfg_pb.embeddings[0]
    for f in (emb.tensor_path, emb.metadata_path, emb.sprite.image_path):
        assert (proj / f).is_file()
    tensors = np.loadtxt(proj / emb.tensor_path, delimiter="\t", ndmin=2)
    meta = (proj / emb.metadata_path).read_text().splitlines()
    assert meta[0] == "label\tclass\tindex" and len(meta) - 1 == len(tensors) == 50
    idx = [int(line.split("\t")[2]) for line in meta[1:]]
    assert idx == subset_indices(500, 50).tolist()
    np.testing.assert_allclose(tensors, feats[idx], rtol=1e-4, atol=1e-5)
    for line in meta[1:]:
        y, name, i = line.split("\t")
        assert int(y) == int(ds.labels[int(i)]) and name == ds.classes[int(y)]
    side = list(emb.sprite.single_image_dim)
    assert side == [32, 32]
    sprite = Image.open(proj / emb.sprite.image_path)
    assert sprite.size == (math.ceil(math.sqrt(50)) * 32,) * 2
    first = np.asarray(sprite)[:32, :32].transpose(2, 0, 1)
    assert np.array_equal(first, ds.images[idx[0]].numpy())


def test_embed_safetensors_head_space(run, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "emb"
    assert main(["embed", "--run", str(run), "--head", "--format", "safetensors", "--out", str(out),
                 "--split", "train", "--max-points", "20"]) == 0
    res = last_json(capsys)
    assert res["space"] == "head" and res["dim"] == 16 and res["num"] == 2000   # proj_dim=16 in TINY
    t = load_file(str(out / "embeddings.safetensors"))
    assert t["features"].shape == (2000, 16) and t["features"].dtype == torch.float32
    assert torch.equal(t["indices"], torch.arange(2000))
    assert json.loads((out / "embed.json").read_text())["classes"][0] == "grating0"


def test_eval_knn_sweep_cli(run, capsys):
    assert main(["eval", "knn", "--run", str(run)]) == 0
    plain = last_json(capsys)
    assert "sweep" not in plain
    assert main(["eval", "knn", "--run", str(run), "--k", "5,20", "--t", "0.07,0.1"]) == 0
    res = last_json(capsys)
    assert res["knn_top1"] == plain["knn_top1"] and res["knn_top5"] == plain["knn_top5"]   # eval.knn_k=20, t=0.1
    assert [(r["k"], r["t"]) for r in res["sweep"]] == [(5, 0.07), (5, 0.1), (20, 0.07), (20, 0.1)]
    assert res["sweep"][3]["top1"] == res["knn_top1"]
    assert json.loads((run / "eval/knn.json").read_text())["sweep"] == res["sweep"]


@pytest.mark.parametrize("argv,needle", [
    (["embed", "--run", "/nonexistent/run"], "does not exist"),
    (["eval", "knn", "--run", "/nonexistent/run", "--k", "5,x"], "--k takes"),
    (["embed", "--checkpoint", "CKPT"], "--out"),
    (["embed", "--run", "RUN", "--max-points", "-3"], "max_points"),
])
def test_embed_bad_input_exits_2(run, argv, needle, capsys):
    argv = [a.replace("CKPT", str(run / "checkpoints/last.pt")).replace("RUN", str(run)) for a in argv]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
