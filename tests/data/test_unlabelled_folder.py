"""A folder of the user's own unlabelled images (data.labels=none): trains, embeds, visualises and
exports; no fake classes; the label protocols refuse with one line."""
import json

import numpy as np
import pytest
from PIL import Image

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.data.files import open_imagefolder
from selfsup.errors import ConfigError

from conftest import TINY


@pytest.fixture
def photos(tmp_path):
    """photos/2023/*.png, photos/2024/trip/*.png and photos/*.png: folders that are not classes."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(36):
        sub = root / ["", "2023", "2024/trip"][i % 3]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(sub / f"img{i:02d}.png")
    return root


def test_labels_none_lists_every_image_unlabelled(photos, tmp_path):
    auto = open_imagefolder(str(photos), "train", index_cache=str(tmp_path / "idx"))
    assert auto.classes == ["2023", "2024"] and len(auto) == 24   # the default reads the sub-folders as classes
    none = open_imagefolder(str(photos), "train", index_cache=str(tmp_path / "idx"), labels_mode="none")
    assert len(none) == 36 and none.classes == [] and set(none.labels.tolist()) == {-1}
    assert sorted(none.keys) == sorted(str(p.relative_to(photos)) for p in photos.rglob("*.png"))
    again = open_imagefolder(str(photos), "train", index_cache=str(tmp_path / "idx"), labels_mode="none")
    assert again.keys == none.keys   # its own cache entry, not the labelled index


def test_labels_none_is_for_image_folders():
    with pytest.raises(ConfigError, match="data.labels=none is for a folder"):
        load_config("simclr-fmnist-cpu", ["data.name=synthetic", "data.labels=none"])


def test_unlabelled_folder_trains_embeds_visualises_and_exports(photos, tmp_path, capsys):
    run = tmp_path / "run"
    data = ["data.name=imagefolder", f"data.root={photos}", "data.labels=none", "data.image_size=16",
            f"data.index_cache={tmp_path / 'idx'}"]
    over = [o for o in TINY if not o.startswith(("data.name", "train.batch_size"))] + data
    assert main(["train", *over, "train.batch_size=12", "train.epochs=1", "eval.every=1", f"run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "data.labels=none: kNN monitor off" in out
    final = json.loads(out.strip().splitlines()[-1])
    assert final["step"] == 3 and "knn_top1" not in final

    assert main(["embed", "--run", str(run)]) == 0   # the training split by default: there is no test split
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["split"] == "train" and res["num"] == 36
    assert set(np.load(run / "eval/embed-train/labels.npy").tolist()) == {-1}

    assert main(["visualize", "--run", str(run), "--method", "pca", "--queries", "3", "--neighbours", "4"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["neighbour_precision"] is None and res["points"] == 36
    assert (run / "eval/map-pca-train.png").stat().st_size > 0 and (run / "eval/neighbours-train.png").is_file()

    assert main(["eval", "knn", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "unlabelled (data.labels=none)" in err and "data.labels=auto data.root=DIR" in err
    assert main(["eval", "linear", "--run", str(run)]) == 2
    assert "data.labels=none" in capsys.readouterr().err

    assert main(["report", "--run", str(run)]) == 0
    assert (run / "report.html").is_file()
    assert (run / "encoder.safetensors").is_file()   # what export and --init-from read
