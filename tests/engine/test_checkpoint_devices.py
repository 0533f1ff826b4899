"""Checkpoints cross devices (issue 17): a GPU run's checkpoint resumes on a CPU. Its RNG streams of
another device type cannot be loaded there; they are re-seeded (said once) and everything else is
restored exactly. No GPU is needed: the test writes a CPU checkpoint, then makes its RNG look like a
CUDA run's."""
import pytest
import torch

from selfsup.config import load_config
from selfsup.engine.checkpoint import load_checkpoint, save_checkpoint
from selfsup.engine.trainer import Trainer, train

from conftest import TINY, assert_same_model

FAST = TINY + ["eval.every=0"]


def _as_if_written_on_cuda(path, with_device_field: bool) -> dict:
    """Rewrite checkpoint `path` the way a one-GPU run writes it: the augmentation stream a CUDA
    generator's 16-byte (seed, offset) state, and the CUDA RNG states of its one device. Without
    `with_device_field`, a checkpoint of the code before the "aug_device" field."""
    ck = load_checkpoint(path)
    philox = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    ck["rng"]["aug"] = philox
    ck["rng"]["cuda"] = [philox.clone()]
    if with_device_field:
        ck["rng"]["aug_device"] = "cuda"
    else:
        ck["rng"].pop("aug_device", None)
    save_checkpoint(ck, path)
    return ck


@pytest.mark.parametrize("with_device_field", [True, False], ids=["aug_device", "older-format"])
def test_a_gpu_checkpoint_resumes_on_cpu(tmp_path, capsys, with_device_field):
    run = tmp_path / "run"
    train(load_config(None, FAST + [f"run_dir={run}", "train.max_steps=2"]))
    ck = _as_if_written_on_cuda(run / "checkpoints/last.pt", with_device_field)
    capsys.readouterr()

    cfg = load_config(str(run / "config.yaml"), ["train.max_steps=4"])
    t = Trainer(cfg, resume=str(run))   # before issue 17: "Expected a CPUGeneratorImplState of size 5056 but found 16"
    out = capsys.readouterr().out
    assert ("checkpoint written on cuda, resuming on cpu: the augmentation stream is re-seeded; "
            "the run continues but is not bit-identical to an uninterrupted one") in out
    assert out.count("re-seeded") == 1
    # all that is not an RNG stream of another device is restored exactly
    assert t.state.step == 2
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, ck["model"][k]), k
    opt = t.state.opt.state_dict()
    assert opt["param_groups"] == ck["optimizer"]["param_groups"]
    for i, st in ck["optimizer"]["state"].items():
        assert all(torch.equal(opt["state"][i][k], v) for k, v in st.items())
    assert t.state.sched.state_dict() == ck["scheduler"]
    assert t.state.sampler.state_dict() == ck["sampler"]
    assert torch.equal(torch.get_rng_state(), ck["rng"]["torch"])
    # the augmentation stream: re-seeded deterministically (the same checkpoint resumes the same way),
    # not left at the run's start
    aug = t.state.aug_gen.get_state()
    assert not torch.equal(aug, torch.Generator().manual_seed(cfg.seed * 1000).get_state())
    assert torch.equal(aug, Trainer(cfg, resume=str(run)).state.aug_gen.get_state())

    final = t.fit()
    assert final["step"] == 4 and final["loss"] == final["loss"]   # finished, finite
    ck4 = load_checkpoint(run / "checkpoints/last.pt")
    assert ck4["step"] == 4 and ck4["rng"]["aug_device"] == "cpu" and "cuda" not in ck4["rng"]


@pytest.mark.parametrize("with_device_field", [True, False], ids=["aug_device", "older-format"])
def test_a_cpu_checkpoint_still_resumes_bit_exact_on_cpu(tmp_path, capsys, with_device_field):
    full = train(load_config(None, FAST + [f"run_dir={tmp_path / 'a'}", "train.max_steps=4"]))
    train(load_config(None, FAST + [f"run_dir={tmp_path / 'b'}", "train.max_steps=2"]))
    path = tmp_path / "b/checkpoints/last.pt"
    ck = load_checkpoint(path)
    assert ck["rng"]["aug_device"] == "cpu"
    if not with_device_field:   # a checkpoint of the code before the field loads as before
        del ck["rng"]["aug_device"]
        save_checkpoint(ck, path)
    capsys.readouterr()
    resumed = train(load_config(str(tmp_path / "b/config.yaml"), ["train.max_steps=4"]), resume=str(tmp_path / "b"))
    assert "re-seeded" not in capsys.readouterr().out
    assert_same_model(tmp_path / "a", tmp_path / "b")
    assert resumed["loss"] == full["loss"]
