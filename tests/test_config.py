import pytest

from selfsup.config import ConfigError, list_presets, load_config


def test_presets_ship_and_load():
    names = list_presets()
    for required in ("simclr-fmnist-cpu", "simclr-fmnist", "simclr-cifar10"):
        assert required in names
    for name in names:
        cfg = load_config(name)
        assert cfg.preset == name


def test_overrides_are_typed():
    cfg = load_config("simclr-fmnist-cpu", ["train.epochs=3", "eval.knn_temperature=0.07", "data.root=/x"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.eval.knn_temperature == 0.07 and cfg.data.root == "/x"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("simclr-fmnist-cpu", ["train.epoch=3"])
    msg = str(e.value)
    assert "train.epoch" in msg and "train.epochs" in msg and "Valid keys" in msg


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as e:
        load_config("simclr-fmnist-gpu")
    assert "simclr-fmnist-cpu" in str(e.value)


def test_unknown_method_and_bad_choice():
    with pytest.raises(ConfigError, match="Valid methods: .*simclr"):
        load_config(None, ["method=byol"])
    with pytest.raises(ConfigError, match="lars"):
        load_config(None, ["train.optimizer=adam"])
    with pytest.raises(ConfigError, match="bad value"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 7\n")
    assert load_config(str(p)).train.epochs == 7
    p.write_text("train:\n  epochz: 7\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_the_configs_names_are_the_registries():
    """config.validate checks names without importing the layers above it: its lists must be theirs."""
    from selfsup import config
    from selfsup.data import files
    from selfsup.data.datasets import DATASETS
    from selfsup.methods import METHODS
    from selfsup.models.backbones import BACKBONES

    assert sorted(config.METHODS) == sorted(METHODS)
    assert sorted(config.DATASETS) == sorted(DATASETS)
    assert sorted(config.BACKBONES) == sorted(BACKBONES)
    assert config.STREAMABLE == files.STREAMABLE and config.DEFAULT_INDEX_CACHE == files.DEFAULT_INDEX_CACHE


@pytest.mark.parametrize("override,needle", [
    ("model.backbone=resnet9", "resnet_small"),           # names of the registries
    ("data.name=imagenet", "fashion-mnist"),
    ("aug.preset=byol", "mocov2"),
    ("model.head_layers=4", "model.head_layers"),
    ("train.threads=-1", "train.threads"),                 # ranges
    ("eval.batch_size=0", "eval.batch_size"),
    ("moco.queue_size=0", "moco.queue_size"),
    ("pic.smooth_alpha=1.5", "pic.smooth_alpha"),
    ("pic.smooth_alpha=0.2", "pic.smooth_k > 0"),          # combinations
    ("data.sampler=sliding_window", "data.window"),
    ("eval.linear_mode=online", "features"),
])
def test_every_check_that_needs_no_data_runs_with_the_config(override, needle):
    extra = ["data.window=64", "data.stride=128"] if override.startswith("data.sampler") else []
    with pytest.raises(ConfigError, match=needle):
        load_config("simclr-fmnist-cpu", [override, *extra])


def test_the_batch_is_checked_against_the_number_of_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")   # as torchrun sets it
    with pytest.raises(ConfigError, match="divisible by the number of processes 3"):
        load_config("simclr-fmnist-cpu")
    monkeypatch.delenv("WORLD_SIZE")
    from selfsup.config import validate

    with pytest.raises(ConfigError, match="divisible"):
        validate(load_config("simclr-fmnist-cpu"), world=5)


def test_every_fmnist_preset_validates_and_builds(tmp_path):
    """The recipe presets of issue 22 (a CPU and a GPU one per method) load, validate, and build their
    method (no data needed); the GPU ones carry the augmentation the CPU study chose."""
    import torch

    from selfsup.config import validate
    from selfsup.methods import build_method

    cpu = [n for n in list_presets() if n.endswith("-fmnist-cpu")]
    gpu = [n for n in list_presets() if n.endswith("-fmnist")]
    assert len(cpu) == 8 and set(gpu) == {"simclr-fmnist", "mocov2-fmnist", "instdisc-fmnist", "pic-fmnist",
                                          "millionway-fmnist", "mocov3-vit-fmnist"}
    studied = load_config("simclr-fmnist-cpu").aug
    for name in cpu + gpu:
        cfg = load_config(name)
        validate(cfg, world=1)
        # bf16 where the CPU has AMX, else fp32; the GPU presets: auto (bf16 on cuda)
        assert cfg.train.precision == ("fast" if name in cpu else "auto"), name
        if name != "mocov1-fmnist-cpu":   # MoCo v1 keeps its paper's augmentation
            assert cfg.aug == studied, name
        torch.manual_seed(0)
        model = build_method(cfg)
        assert sum(p.numel() for p in model.parameters()) > 0
