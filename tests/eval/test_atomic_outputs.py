"""A command stopped while it writes (SIGTERM, a full disk) leaves the old file or the new one, never a
fragment, and the json that says an output is complete is removed first and written last (issue 23):
`selfsup embed`, the eval jsons, the report and the plots."""
import errno
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from selfsup.atomic import write_text

EMBED = """
import io, os, signal, sys
from pathlib import Path
import numpy as np, torch
from selfsup.eval.embed import export_embeddings

class Split:
    name, classes = "test", ["a", "b"]
    labels = torch.arange(40) % 2
    images = torch.zeros(40, 3, 8, 8, dtype=torch.uint8)
    def __len__(self):
        return 40

real = np.save
def save(file, arr, *a, **k):   # SIGTERM half-way through features.npy
    buf = io.BytesIO()
    real(buf, arr)
    data = buf.getvalue()[:len(buf.getvalue()) // 2]
    if hasattr(file, "write"):
        file.write(data)
        file.flush()
    else:
        Path(str(file)).write_bytes(data)
    os.kill(os.getpid(), signal.SIGTERM)
def embed(out, seed):
    export_embeddings(Path(out), torch.randn(40, 8, generator=torch.Generator().manual_seed(seed)), Split(), "npy",
                      None)

if __name__ == "__main__":
    np.save = save
    embed(sys.argv[1], 1)
"""
ns = {"__name__": "embed_script"}   # the same script in this process, without the SIGTERM
exec(compile(EMBED, "embed_script", "exec"), ns)


def test_sigterm_during_embed_never_leaves_a_fragment_beside_embed_json(tmp_path):
    out = tmp_path / "embed"
    ns["embed"](out, 0)
    want = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)).numpy()
    assert np.array_equal(np.load(out / "features.npy"), want) and (out / "embed.json").is_file()
    # re-embedding into the complete folder, SIGTERM while features.npy is written
    p = subprocess.run([sys.executable, "-c", EMBED, str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == -15, p.stderr
    assert np.array_equal(np.load(out / "features.npy"), want)   # the good file, not a fragment
    assert not (out / "embed.json").exists()   # the folder no longer says it is complete
    ns["embed"](out, 1)
    assert json.loads((out / "embed.json").read_text())["num"] == 40
    assert not np.array_equal(np.load(out / "features.npy"), want)
    assert not list(out.rglob("*.tmp"))


@pytest.fixture
def full_disk(monkeypatch):
    """Path.write_text writes half of its text, then fails as a full disk does."""
    def write_text(self, text, *a, **k):
        with open(self, "w") as f:
            f.write(text[:len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def test_a_write_cut_short_keeps_the_old_eval_json_and_report(tmp_path, full_disk, monkeypatch):
    from selfsup.eval.results import save_eval as _save_eval
    from selfsup.eval import report

    monkeypatch.setattr(report, "environment", lambda: {"python": "3"})   # no git, no torchvision: fast

    (tmp_path / "eval").mkdir()
    old = '{"knn_top1": 0.5}\n'
    with open(tmp_path / "eval/knn.json", "w") as f:
        f.write(old)
    with pytest.raises(OSError):
        _save_eval(tmp_path / "eval", "knn", {"knn_top1": 0.75, "protocol": "x" * 500})
    assert (tmp_path / "eval/knn.json").read_text() == old
    for name in ("config.yaml", "metrics.jsonl", "report.html"):
        with open(tmp_path / name, "w") as f:
            f.write("seed: 0\n" if name == "config.yaml" else "old report" if name == "report.html" else "")
    with pytest.raises(OSError):
        report.write_report(tmp_path)
    assert (tmp_path / "report.html").read_text() == "old report"
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_plot_cut_short_keeps_the_old_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from selfsup.eval.visualize import plot_map

    path = tmp_path / "map-pca-test.png"
    plot_map(np.zeros((4, 2)), np.array([0, 1, 0, 1]), ["a", "b"], path, "map")
    good = path.read_bytes()

    def savefig(self, fname, *a, **k):
        pathlib.Path(fname).write_bytes(good[:100])
        raise OSError(errno.ENOSPC, "No space left on device", str(fname))
    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(OSError):
        plot_map(np.ones((4, 2)), np.array([1, 1, 0, 1]), ["a", "b"], path, "map")
    assert path.read_bytes() == good and not list(tmp_path.glob("*.tmp"))


def test_write_text_replaces_whole_or_not_at_all(tmp_path):
    f = tmp_path / "a.json"
    write_text(f, "old")
    with pytest.raises(ZeroDivisionError):
        from selfsup.atomic import replacing
        with replacing(f) as tmp:
            tmp.write_text("half")
            1 / 0
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    write_text(f, "new")
    assert f.read_text() == "new"
