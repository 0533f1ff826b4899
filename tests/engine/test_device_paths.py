"""The accelerator's code paths, run where CI can run them (issue 17).

- Training and every evaluation protocol run under a recorder of the devices of each op's tensors: no
  op may mix devices. On a GPU machine this runs on cuda for real; on CPU the accelerator's placement
  branch (data.on_device: datasets, labels and indices moved to the device) is switched on for "cpu"
  (`engine.setup.DATA_DEVICE_TYPES`), so a regression in that branch fails CI too.
- Every module an evaluation protocol gets is on the resolved device: with the device resolved to
  `meta` (which refuses to mix with CPU tensors), the encoder and projection head handed to the
  protocols, and the network fine-tuning builds from them, are all on it.
"""
import json

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import selfsup.engine.setup as setup
from conftest import TINY
from selfsup.cli import main

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}   # a CPU index into a GPU tensor is legal


class DeviceMix(TorchFunctionMode):
    """Records every op whose tensor arguments (0-d scalars aside) live on more than one device."""

    def __init__(self):
        super().__init__()
        self.mixed = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1 and func not in INDEXING:
            self.mixed.append(f"{getattr(func, '__qualname__', func)}: {sorted(map(str, devices))}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_training_and_every_protocol_keep_each_op_on_one_device(device, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(setup, "DATA_DEVICE_TYPES", ("cuda", "cpu"))
    run = tmp_path / "run"
    over = [o for o in TINY if not o.startswith("device=")] + [f"device={device}", "data.on_device=true"]
    with DeviceMix() as mix:
        assert main(["train", *over, "train.max_steps=2", "eval.every=1", f"run_dir={run}"]) == 0
        assert main(["eval", "knn", "--run", str(run)]) == 0
        assert main(["eval", "linear", "--run", str(run), "eval.linear_epochs=1"]) == 0
        assert main(["eval", "linear", "--run", str(run), "eval.linear_mode=augment", "eval.linear_epochs=1"]) == 0
        assert main(["eval", "finetune", "--run", str(run), "eval.finetune_epochs=1", "eval.finetune_batch_size=16",
                     "eval.finetune_fractions=[0.01]", "eval.finetune_from_head_layer=1"]) == 0
    assert mix.mixed == []
    assert json.loads((run / "eval/finetune.json").read_text())["finetune_1pct_labels"] == 20


def test_the_placement_branch_moves_the_datasets(tmp_path, monkeypatch):
    """The switch is real: with "cpu" among DATA_DEVICE_TYPES the trainer's in-memory dataset goes
    through `.to(device)`."""
    from selfsup.data.images import ImageDataset

    moved = []
    real = ImageDataset.to
    monkeypatch.setattr(ImageDataset, "to", lambda self, d: moved.append(str(d)) or real(self, d))
    monkeypatch.setattr(setup, "DATA_DEVICE_TYPES", ("cuda", "cpu"))
    assert main(["train", *TINY, "train.max_steps=1", "eval.every=0", f"run_dir={tmp_path / 'r'}"]) == 0
    assert moved == ["cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("placement") / "run"
    assert main(["train", *TINY, "train.max_steps=1", "eval.every=0", f"run_dir={run}"]) == 0
    return run


@pytest.mark.parametrize("protocol", ["linear", "logreg", "finetune"])
def test_every_module_a_protocol_gets_is_on_the_resolved_device(protocol, run, monkeypatch):
    import selfsup.eval.finetune as finetune
    import selfsup.eval.linear as linear
    import selfsup.eval.logreg as logreg
    from selfsup.data.augment import eval_transform

    meta = torch.device("meta")
    monkeypatch.setattr(setup, "resolve_device", lambda name, local_rank=0: meta)
    got = {}

    def protocol_fn(encoder, cfg, train_ds, test_ds, device, amp, head=None, out_dir=None):
        got["device"], got["modules"] = device, [encoder] + ([head] if head is not None else [])
        if head is not None:   # what fine-tuning builds first: encoder + head layers + classifier
            probe = eval_transform(train_ds.images[:2].cpu(), cfg.data.image_size)
            got["modules"].append(finetune.classifier_net(encoder, train_ds.num_classes, probe, head, 1))
        return {}

    for mod, name in ((linear, "linear_eval"), (logreg, "logreg_eval"), (finetune, "finetune_eval")):
        monkeypatch.setattr(mod, name, protocol_fn)
    extra = ["eval.finetune_from_head_layer=1"] if protocol == "finetune" else []
    assert main(["eval", protocol, "--run", str(run), *extra]) == 0
    assert got["device"] == meta and len(got["modules"]) == (3 if protocol == "finetune" else 1)
    tensors = [t for m in got["modules"] for t in [*m.parameters(), *m.buffers()]]
    assert tensors and {t.device for t in tensors} == {meta}
