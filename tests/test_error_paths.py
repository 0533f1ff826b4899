"""One error path (issue 13): every failure a user can cause is one `selfsup: error: ...` line naming the
thing and the fix, exit code 2, no traceback; a bug is one `selfsup: internal error` line (exit 1);
`--debug` / SELFSUP_DEBUG=1 shows the traceback."""
import errno
import json
import shutil

import pytest
import torch

import selfsup.cli as cli
from conftest import TINY
from selfsup.cli import main


def fails(argv, capsys, needle, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err, err
    assert err.startswith("selfsup: error:" if code == 2 else "selfsup: internal error:"), err
    return err


@pytest.mark.parametrize("text,needle", [
    ("a: [1\n", "is not valid YAML at line 2"),
    ("- 1\n- 2\n", "must be a mapping of config keys"),
    ("seed: !!python/object/apply:os.system ['echo pwned']\n", "python/object/apply:os.system"),
    ("train: {epochs: [1, 2]}\n", "train.epochs"),
])
def test_bad_yaml_is_one_line(tmp_path, capsys, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    fails(["train", str(f)], capsys, needle)


def test_binary_yaml_and_broken_run_config(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"\x00\xff\xfe")
    fails(["train", str(f)], capsys, "cannot read config file")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: [\n")
    fails(["eval", "knn", "--run", str(run)], capsys, "config.yaml' is not valid YAML")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("errs") / "run"
    assert main(["train", *TINY, "train.max_steps=1", "eval.every=0", f"run_dir={run}"]) == 0
    return run


def test_checkpoints_that_are_not_selfsup_checkpoints(run, tmp_path, capsys):
    import torchvision

    tv = tmp_path / "tv.pt"
    torch.save(torchvision.models.resnet18().state_dict(), tv)
    fails(["eval", "knn", "--checkpoint", str(tv)], capsys, "add --config YAML")
    fails(["eval", "knn", "--checkpoint", str(tv), "--config", str(run / "config.yaml")], capsys,
          "does not match this config's model")
    trunc = tmp_path / "enc.safetensors"
    trunc.write_bytes((run / "encoder.safetensors").read_bytes()[:1000])
    fails(["eval", "knn", "--checkpoint", str(trunc), "--config", str(run / "config.yaml")], capsys,
          "could not read")
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    (broken / "encoder.safetensors").write_bytes(trunc.read_bytes())
    fails(["eval", "knn", "--run", str(broken)], capsys, "--checkpoint it")
    # the route the help offers: an encoder state dict plus the config that describes it
    assert main(["eval", "knn", "--checkpoint", str(run / "encoder.safetensors"), "--config",
                 str(run / "config.yaml")]) == 0


def test_an_empty_or_truncated_checkpoint_says_so_and_what_to_do(run, tmp_path, capsys):
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    ck = broken / "checkpoints/last.pt"
    ck.write_bytes(b"")
    err = fails(["train", "--resume", str(broken)], capsys, "is empty (0 bytes)")
    assert "truncated" in err and "restore it" in err, err
    fails(["eval", "knn", "--checkpoint", str(ck)], capsys, "is empty (0 bytes)")
    ck.write_bytes((run / "checkpoints/last.pt").read_bytes()[:100])
    err = fails(["train", "--resume", str(broken)], capsys, f"could not read checkpoint '{ck}': ")
    assert "restore it" in err and ": ;" not in err, err


def test_embed_out_onto_a_file(run, tmp_path, capsys):
    f = tmp_path / "x.npy"
    f.write_text("")
    fails(["embed", "--run", str(run), "--out", str(f)], capsys, "--out takes a folder")


def test_knn_k_larger_than_the_bank_is_clipped_and_said(run, capsys):
    assert main(["eval", "knn", "--run", str(run), "eval.knn_k=100000"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "k=2000 (eval.knn_k=100000 clipped to the 2000 training items)" in res["protocol"]


def test_a_one_class_split_is_refused_by_the_protocols(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        d = tmp_path / "set" / split / "only"
        d.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
    run = tmp_path / "run"
    over = [o for o in TINY if not o.startswith(("data.name", "train.batch_size"))]
    assert main(["train", *over, "data.name=imagefolder", f"data.root={tmp_path / 'set'}", "train.batch_size=4",
                 "data.index_cache=null", "train.max_steps=1", "eval.every=1", f"run_dir={run}"]) == 0
    assert "one class only: kNN monitor off" in capsys.readouterr().out
    fails(["eval", "knn", "--run", str(run)], capsys, "has one class only")


def test_an_unwritable_index_cache_costs_only_the_cache(tmp_path, capsys):
    from selfsup.data.files import index_folder

    (tmp_path / "set" / "a").mkdir(parents=True)
    (tmp_path / "set" / "a" / "x.png").write_bytes(b"")
    blocker = tmp_path / "file"
    blocker.write_text("")   # a file where the cache folder should be: fails even as root
    idx = index_folder(str(tmp_path / "set"), str(blocker / "cache"))
    assert idx["keys"] and not idx["cached"]
    assert "folder index not cached" in capsys.readouterr().err


@pytest.mark.parametrize("code,needle", [(errno.ENOSPC, "free some space"), (errno.EACCES, "you may write"),
                                         (errno.EROFS, "read-only")])
def test_os_errors_name_the_file_and_the_fix(monkeypatch, capsys, code, needle):
    def boom(args):
        raise OSError(code, "simulated", "/runs/x/checkpoints/last.pt")

    monkeypatch.setattr(cli, "_cmd_train", boom)
    err = fails(["train", "simclr-fmnist-cpu"], capsys, needle)
    assert "/runs/x/checkpoints/last.pt" in err


def test_a_bug_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def bug(args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "_cmd_train", bug)
    fails(["train", "simclr-fmnist-cpu"], capsys, "KeyError", code=1)
    with pytest.raises(KeyError):
        main(["--debug", "train", "simclr-fmnist-cpu"])
    monkeypatch.setenv("SELFSUP_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["train", "simclr-fmnist-cpu"])
