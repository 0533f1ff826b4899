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
