import json

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.config import ConfigError
from selfsup.eval.visualize import nearest_neighbours, pick_queries, plot_map, plot_neighbours, reduce_2d

from conftest import TINY


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def assert_real_picture(path, min_colours=5):
    """A valid PNG that is not blank: varied pixels and several distinct colours."""
    img = Image.open(path)
    img.verify()
    px = np.asarray(Image.open(path).convert("RGB"))
    assert px.shape[0] > 100 and px.shape[1] > 100
    assert px.std() > 10
    assert len(np.unique(px.reshape(-1, 3)[::7], axis=0)) >= min_colours
    return px


def colour_pixels(px, rgb, tol=40):
    return int((np.abs(px.astype(int) - np.array(rgb)).max(axis=2) < tol).sum())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vis") / "run"
    assert main(["train", *TINY, "train.max_steps=3", f"run_dir={run}"]) == 0
    return run


def clusters(n=120, classes=4, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 4 * torch.randn(classes, dim, generator=g)[y] + torch.randn(n, dim, generator=g)
    return x.numpy(), y.numpy()


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_reduce_2d_separates_clusters(method):
    x, y = clusters()
    xy = reduce_2d(x, method)
    assert xy.shape == (120, 2) and np.isfinite(xy).all()
    centres = np.stack([xy[y == c].mean(0) for c in range(4)])
    spread = max(np.linalg.norm(xy[y == c] - centres[c], axis=1).mean() for c in range(4))
    gaps = [np.linalg.norm(centres[a] - centres[b]) for a in range(4) for b in range(a + 1, 4)]
    assert min(gaps) > spread


def test_reduce_2d_errors():
    x, _ = clusters()
    with pytest.raises(ConfigError, match="nope"):
        reduce_2d(x, "nope")
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install umap-learn"):
            reduce_2d(x, "umap")


def test_plot_map_png(tmp_path):
    x, y = clusters()
    path = plot_map(reduce_2d(x, "pca"), y, ["a", "b", "c", "d"], tmp_path / "map.png", "title")
    assert_real_picture(path)


def test_pick_queries_one_per_class_first():
    labels = torch.tensor([3, 1, 1, 0, 3, 2, 0, 1])
    q = pick_queries(labels, 6)
    assert labels[q].tolist() == [0, 1, 2, 3, 0, 1]
    assert q.tolist()[:4] == [3, 1, 5, 0]           # first occurrence of each class
    assert len(pick_queries(labels, 100)) == 8


def test_nearest_neighbours_cosine():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = torch.tensor([[10.0, 1.0], [-1.0, -3.0]])   # scale does not matter, direction does
    assert nearest_neighbours(q, bank, 2).tolist() == [[0, 1], [2, 0]]


@pytest.mark.parametrize("channels", [1, 3])
def test_plot_neighbours_frames_right_and_wrong(tmp_path, channels):
    g = torch.Generator().manual_seed(0)
    q, k = 3, 4
    qi = torch.randint(0, 256, (q, channels, 28, 28), generator=g, dtype=torch.uint8)
    ni = torch.randint(0, 256, (q, k, channels, 28, 28), generator=g, dtype=torch.uint8)
    ql, nl = torch.tensor([0, 1, 2]), torch.tensor([[0, 0, 1, 2], [1, 3, 1, 1], [0, 0, 0, 0]])
    px = assert_real_picture(plot_neighbours(qi, ql, ni, nl, ["t-shirt", "trouser", "pullover", "dress"],
                                             tmp_path / "nn.png"))
    assert colour_pixels(px, (255, 0, 0)) > 100          # red frames: wrong class
    assert colour_pixels(px, (50, 205, 50)) > 100        # green frames: right class
    if channels == 1:   # grey images are drawn grey, not in a false-colour map
        mid = px[(px.max(axis=2) > 40) & (px.max(axis=2) < 215)]
        grey = (mid.max(axis=1) - mid.min(axis=1)) < 8
        assert grey.mean() > 0.8


def test_visualize_cli(run, capsys):
    argv = ["visualize", "--run", str(run), "--max-points", "150", "--queries", "3", "--neighbours", "4"]
    assert main(argv) == 0
    res = last_json(capsys)
    assert res["map"] == str(run / "eval" / "map-tsne-test.png") and res["points"] == 150
    assert res["neighbours"] == str(run / "eval" / "neighbours-test.png")
    assert_real_picture(res["map"])
    px = assert_real_picture(res["neighbours"])
    assert colour_pixels(px, (255, 0, 0)) + colour_pixels(px, (50, 205, 50)) > 100
    assert main(["visualize", "--run", str(run), "--method", "pca", "--max-points", "0", "--queries", "2"]) == 0
    res = last_json(capsys)
    assert res["points"] == 500 and res["map"].endswith("map-pca-test.png")
    assert main(["visualize", "--run", str(run), "--split", "train", "--method", "pca", "--max-points", "100",
                 "--queries", "2", "--neighbours", "3"]) == 0   # train queries: themselves left out
    assert last_json(capsys)["neighbours"] == str(run / "eval" / "neighbours-train.png")


def test_visualize_bad_input_exits_2(run, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(flat / f"{i}.png")
    # unlabelled images are drawn plain (no classes, no precision), not refused
    assert main(["visualize", "--run", str(run), "--split", "train", "data.name=imagefolder", f"data.root={flat}",
                 "--method", "pca"]) == 0
    assert last_json(capsys)["neighbour_precision"] is None
    cases = [
        (["visualize", "--checkpoint", str(run / "checkpoints/last.pt")], "--out"),
        (["visualize", "--run", str(tmp_path / "nope")], "does not exist"),
        (["visualize", "--run", str(run), "--queries", "0"], "at least 1"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        assert needle in capsys.readouterr().err
