"""Fuzzing the inputs a user controls (issue 13), with hypothesis, bounded to keep the suite short.

Property: the command exits 0, or exits 2 with one `selfsup: error:` line; never a traceback, never an
internal error, within a time bound. Inputs: overrides of every config key with values of wrong types
and ranges (checked by the config loader; a sample of the accepted ones also trains a step), random
YAML documents, random bytes as images, checkpoints, safetensors and map files."""
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from conftest import TINY
from selfsup.cli import main
from selfsup.config import Config, _valid_keys, load_config
from selfsup.errors import SelfsupError

KEYS = _valid_keys(OmegaConf.structured(Config))
VALUES = st.one_of(
    st.integers(-10**12, 10**12), st.sampled_from([0, 1, -1, 2, 3, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["nan", "inf", "-inf", "1e400", "0.0"]),
    st.booleans(), st.none(), st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3))
FAST = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


def _text(v) -> str:
    """A value as it would be typed after key= (YAML flow syntax)."""
    return "null" if v is None else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...")


def exits_cleanly(argv, capsys, bound_s=60.0) -> int:
    t0 = time.monotonic()
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err
    if code == 2:
        assert err.startswith("selfsup: error: "), err
    assert time.monotonic() - t0 < bound_s
    return code


@settings(FAST, max_examples=400)
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_override_is_loaded_or_refused_with_a_config_error(key, value):
    try:
        load_config("simclr-fmnist-cpu", [f"{key}={_text(value)}"])
    except SelfsupError:
        pass


@settings(FAST, max_examples=12)
@given(key=st.sampled_from([k for k in KEYS if k.startswith(("train.", "eval.", "simclr.", "aug.", "model."))
                            and k not in ("train.epochs", "model.backbone", "train.batch_size")]),
       value=st.sampled_from([0, 1, -1, 2, 0.5, 1e-9, 1e9, True, "nan", "x"]))
def test_an_accepted_override_trains_and_evaluates(key, value, tmp_path_factory, capsys):
    run = tmp_path_factory.mktemp("fuzzrun") / "run"
    exits_cleanly(["train", *TINY, "train.max_steps=1", "eval.every=1", f"{key}={_text(value)}", f"run_dir={run}"],
                  capsys)


@settings(FAST, max_examples=150)
@given(doc=st.one_of(st.text(max_size=80),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                  lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                    max_size=3), max_leaves=6)
                     .map(yaml.safe_dump)))
def test_any_yaml_document_is_loaded_or_refused(doc, tmp_path_factory):
    f = tmp_path_factory.mktemp("yaml") / "c.yaml"
    f.write_text(doc)
    try:
        load_config(str(f))
    except SelfsupError:
        pass


@settings(FAST, max_examples=25)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".png", ".jpg", ".JPEG", ".bmp"]))
def test_random_bytes_as_an_image_are_named(data, suffix, tmp_path_factory):
    from PIL import Image

    from selfsup.config import load_config as load
    from selfsup.data.splits import load_split

    root = tmp_path_factory.mktemp("imgs")
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / c / "ok.png")
    (root / "train" / "a" / f"bad{suffix}").write_bytes(data)
    cfg = load(None, ["data.name=imagefolder", f"data.root={root}", "data.index_cache=null", "data.image_size=8"])
    try:
        ds = load_split(cfg, "train")
        assert len(ds) == 3   # the bytes happened to be an image
    except SelfsupError as e:
        assert "bad" in str(e)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fuzzck") / "run"
    assert main(["train", *TINY, "train.max_steps=1", "eval.every=0", f"run_dir={run}"]) == 0
    return run


@settings(FAST, max_examples=20)
@given(data=st.binary(max_size=400), kind=st.sampled_from(["pt", "safetensors", "truncated-pt", "map"]))
def test_random_bytes_as_checkpoints_and_map_files_exit_2(data, kind, run, tmp_path_factory, capsys):
    d = tmp_path_factory.mktemp("ck")
    if kind == "map":
        (d / "train.zip").write_bytes(b"PK\x05\x06" + b"\x00" * 18)   # an empty zip
        (d / "train_map.txt").write_bytes(data)
        exits_cleanly(["train", *TINY, "data.name=imagenet-zip", f"data.root={d}", "train.max_steps=1",
                       f"run_dir={d / 'run'}"], capsys)
        return
    f = d / ("x.safetensors" if kind == "safetensors" else "x.pt")
    full = (run / "checkpoints" / "last.pt").read_bytes()
    f.write_bytes(full[:len(data) * 50] if kind == "truncated-pt" else data)
    assert exits_cleanly(["eval", "knn", "--checkpoint", str(f), "--config", str(run / "config.yaml")], capsys) == 2
