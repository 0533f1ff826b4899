"""Training on streamed ImageNet-like data (zip with map files, image folders): the pic-imagenet
preset end to end, cache modes agree, exact resume, bad images skipped and counted, two
processes with torchrun and a resume on one."""
import json
import os
import subprocess
import sys

import pytest

from conftest import assert_same_model
from selfsup.config import ConfigError, load_config
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import train

# pic-imagenet, shrunk to seconds on one core: same method, data path, sampler and multi-crop
SMALL = ["device=cpu", "data.image_size=48", "model.backbone=resnet_small", "model.width=8",
         "model.head_hidden=32", "model.proj_dim=16", "pic.large_size=32", "pic.small_size=16",
         "pic.small_crops=2", "train.batch_size=12", "train.epochs=2", "train.warmup_epochs=0",
         "data.window=24", "data.stride=12", "train.threads=1", "train.log_every=1", "eval.every=1",
         "eval.knn_k=10", "eval.batch_size=16", "data.num_workers=0"]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    from selfsup.data.fake import make_fake_imagenet

    root = str(tmp_path_factory.mktemp("imagenet"))
    make_fake_imagenet(root, classes=3, train_per_class=12, val_per_class=4, min_size=40, max_size=90)
    return root


def _cfg(fake, run, *extra):
    return load_config("pic-imagenet", ["data.name=imagenet-zip", f"data.root={fake}", *SMALL,
                                        f"run_dir={run}", *extra])


def test_pic_imagenet_on_a_zip_runs_and_cache_modes_agree(fake, tmp_path):
    res = train(_cfg(fake, tmp_path / "none"))
    assert res["step"] == 2 * (36 // 12) and 0 <= res["knn_top1"] <= 1
    assert (tmp_path / "none/encoder.safetensors").exists()
    for mode in ("full", "part"):
        train(_cfg(fake, tmp_path / mode, f"data.cache_mode={mode}"))
        assert_same_model(tmp_path / "none", tmp_path / mode)
    # the image folder gives the same run as the zip
    train(load_config("pic-imagenet", ["data.name=imagefolder", f"data.root={fake}", *SMALL,
                                       f"data.index_cache={tmp_path / 'idx'}", f"run_dir={tmp_path / 'folder'}"]))
    assert_same_model(tmp_path / "none", tmp_path / "folder")


def test_streamed_run_resumes_exactly_with_workers(fake, tmp_path):
    full = train(_cfg(fake, tmp_path / "a", "data.num_workers=2", "eval.every=0"))
    train(_cfg(fake, tmp_path / "b", "train.max_steps=4", "eval.every=0"))    # mid epoch 2, no workers
    assert load_checkpoint(tmp_path / "b/checkpoints/last.pt")["step"] == 4
    resumed = train(load_config(str(tmp_path / "b/config.yaml"), ["train.max_steps=null", "data.num_workers=2"]),
                    resume=str(tmp_path / "b"))
    assert resumed["loss"] == full["loss"]
    assert_same_model(tmp_path / "a", tmp_path / "b")
    # the feature-only protocols stream the run's data too
    from selfsup.cli import main

    for protocol in ("knn", "logreg"):
        assert main(["eval", protocol, "--run", str(tmp_path / "a"), "eval.logreg_l2_count=2"]) == 0
        res = json.loads((tmp_path / "a" / "eval" / f"{protocol}.json").read_text())
        assert 0 <= res[f"{protocol}_top1"] <= 1


def test_bad_images_are_skipped_and_counted_in_the_log(fake, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(fake, root)
    first = sorted(os.listdir(root / "train" / "n01440764"))[0]
    (root / "train" / "n01440764" / first).write_bytes(b"not a jpeg")
    run = tmp_path / "run"
    args = ["data.name=imagefolder", f"data.root={root}", *SMALL, "eval.every=0", f"data.index_cache={tmp_path / 'i'}"]
    with pytest.raises(Exception, match=first):
        train(load_config("pic-imagenet", args + [f"run_dir={run}"]))
    res = train(load_config("pic-imagenet", args + ["data.on_error=skip", f"run_dir={tmp_path / 'skip'}"]))
    assert res["step"] == 6
    events = [json.loads(x) for x in (tmp_path / "skip/metrics.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e["event"] == "skipped_images"]
    assert sum(e["count"] for e in skipped) == 2 and first in skipped[0]["examples"][0]   # 2 epochs, 1 bad image
    assert [e for e in events if e["event"] == "train"][-1]["skipped_images"] == 2


def test_stream_needs_a_file_backed_set_and_an_image_size(fake, tmp_path):
    with pytest.raises(ConfigError, match="data.stream=true works for"):
        train(load_config("simclr-fmnist-cpu", ["data.stream=true", f"run_dir={tmp_path / 'x'}"]))
    with pytest.raises(ConfigError, match="data.image_size"):
        train(load_config("pic-imagenet", ["data.name=imagenet-zip", f"data.root={fake}", "data.image_size=null",
                                           f"run_dir={tmp_path / 'y'}"]))
    with pytest.raises(ConfigError, match="cache_mode"):
        train(load_config("simclr-fmnist-cpu", ["data.cache_mode=full", f"run_dir={tmp_path / 'z'}"]))


def test_torchrun_two_processes_then_resume_on_one(fake, tmp_path):
    run = tmp_path / "run"
    args = ["pic-imagenet", "data.name=imagenet-zip", f"data.root={fake}", *SMALL, "data.cache_mode=part",
            "data.num_workers=1", "train.max_steps=3", f"run_dir={run}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "selfsup", "train", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ck = load_checkpoint(run / "checkpoints/last.pt")
    assert ck["world_size"] == 2 and ck["step"] == 3 and ck["model"]["clf.weight"].shape[0] == 36
    assert "rank 0: cached" in out.stdout and "rank 1: cached" in out.stdout
    out = subprocess.run([sys.executable, "-m", "selfsup", "train", "--resume", str(run), "train.max_steps=null"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert final["step"] == 6 and 0 <= final["knn_top1"] <= 1
    assert load_checkpoint(run / "checkpoints/last.pt")["world_size"] == 1
