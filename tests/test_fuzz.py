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


# Random export folders (issue 23): manifest, config.json and weight files each absent, right, foreign or
# damaged. The loader returns the weights the folder's export.json names (without one: its only weights
# file), checked against config.json, or raises a SelfsupError; never a traceback, never other weights.
EXPORT_WEIGHTS = ("model.safetensors", "backbone_body.safetensors", "encoder.safetensors")
WEIGHTS = {"torchvision": "encoder.safetensors", "timm": "model.safetensors", "hf": "model.safetensors",
           "torchvision-detection": "backbone_body.safetensors"}
JSON_TEXT = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                         lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                         max_leaves=6).map(lambda v: __import__("json").dumps(v))
EXPORT_CONFIGS = {"right": {"architecture": "resnet_small", "num_classes": 0},
                  "arch": {"architecture": "resnet18"},
                  "args": {"architecture": "resnet_small", "model_args": {"num_heads": 6}},
                  "args-list": {"architecture": "resnet_small", "model_args": [6]}}


@pytest.fixture(scope="module")
def export_states():
    """TINY's config, three distinct encoders of it (one per weights file name) and one of another width."""
    import torch

    from selfsup.methods import build_method

    cfg = load_config(None, TINY)
    states = {}
    for seed, name in enumerate(EXPORT_WEIGHTS):
        torch.manual_seed(seed)
        states[name] = build_method(cfg).encoder.state_dict()
    return cfg, states, build_method(load_config(None, TINY + ["model.width=16"])).encoder.state_dict()


@settings(FAST, max_examples=80)
@given(manifest=st.sampled_from([None, "torchvision", "timm", "hf", "torchvision-detection", "json", "bytes"]),
       config=st.sampled_from([None, *EXPORT_CONFIGS, "right", "json", "bytes"]),
       files=st.fixed_dictionaries({n: st.sampled_from(["none", "none", "real", "real", "other", "truncated", "bytes"])
                                    for n in EXPORT_WEIGHTS}),
       text=JSON_TEXT, noise=st.binary(max_size=200))
def test_random_export_folders_load_the_named_weights_or_are_refused(manifest, config, files, text, noise,
                                                                     export_states, tmp_path_factory):
    import json

    import torch
    from safetensors.torch import save as to_bytes

    from selfsup.engine.export import read_export
    from selfsup.methods import build_method, load_encoder_state

    cfg, states, other = export_states
    d = tmp_path_factory.mktemp("export")
    for name, kind in files.items():
        if kind != "none":
            real = to_bytes({k: v.contiguous() for k, v in (other if kind == "other" else states[name]).items()})
            (d / name).write_bytes(noise if kind == "bytes" else real[:len(real) // 2] if kind == "truncated" else real)
    for name, value in (("export.json", manifest), ("config.json", config)):
        if value in WEIGHTS and name == "export.json":
            value = json.dumps({"format": value, "weights": WEIGHTS[value], "run": "elsewhere"})
        elif value in EXPORT_CONFIGS and name == "config.json":
            value = json.dumps(EXPORT_CONFIGS[value])
        elif value in ("json", "bytes"):
            value = text if value == "json" else noise[:40]
        if value is not None:
            (d / name).write_bytes(value if isinstance(value, bytes) else value.encode())
    encoder = build_method(cfg).encoder
    try:
        load_encoder_state(encoder, read_export(str(d), cfg), str(d), cfg.model.backbone)
    except SelfsupError:
        return
    got = encoder.state_dict()
    read = [n for n in EXPORT_WEIGHTS if files[n] == "real" and all(torch.equal(got[k], states[n][k]) for k in got)]
    assert len(read) == 1, (manifest, config, files)
    if manifest in WEIGHTS:   # an export.json names the weights
        assert read == [WEIGHTS[manifest]]
    else:                     # none (an unreadable or foreign one is refused): the folder's only weights file
        assert manifest is None and [n for n in EXPORT_WEIGHTS[:2] if files[n] != "none"] == read
    if read == ["model.safetensors"]:   # timm's weights: config.json describes this model
        assert config == "right"


# ---------------------------------------------------------------------------------------- detection annotations
# Random VOC XML and COCO json fed to the detection readers (issue 23): a set is made, or refused with a
# DatasetFormatError (data.on_error=raise, or damage no skip can mend); every box it keeps is a box.
def _boxes_are_valid(ds, w, h) -> None:
    for i in range(len(ds)):
        _, t = ds[i]
        b = t["boxes"]
        assert b.shape == (len(t["labels"]), 4) and len(t["difficult"]) == len(t["labels"])
        assert ((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])).all(), b
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all(), b


@pytest.fixture(scope="module")
def det_images(tmp_path_factory):
    """A VOC2007 test split of one 50x40 image (its annotation written by each example), and two 30x20
    images for COCO jsons."""
    from PIL import Image

    root = tmp_path_factory.mktemp("det")
    base = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    Image.new("RGB", (50, 40)).save(base / "JPEGImages" / "000001.jpg")
    (base / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    for n in "ab":
        Image.new("RGB", (30, 20)).save(root / f"{n}.png")
    return root


COORD = st.one_of(st.integers(-3, 55), st.floats(-3, 55), st.sampled_from(["nan", "inf", "-1e400", "1e39", "", "x"]))


def _often(draw, rnd, good, bad, odds=4):
    """A draw of `good`, or one time in `odds` of `bad` (by `rnd`: hypothesis's own choices favour edge
    values): mostly plausible values, so that sets are made and their boxes checked."""
    return draw(bad if rnd.random() < 1 / odds else good)


def _plausible_box(rnd, start: int, hi: int, side: int) -> list:
    """(x1, y1, x2, y2) near the image: often a box, sometimes empty, inverted or out of it."""
    x, y = start + rnd.randint(-1, hi), start + rnd.randint(-1, hi)
    return [x, y, x + 1 + rnd.randint(-3, side), y + 1 + rnd.randint(-3, side)]


@st.composite
def voc_xml(draw) -> str:
    import random
    from xml.sax.saxutils import escape

    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))

    def tag(name, value):   # an element, or (sometimes) none
        return _often(draw, rnd, st.just(f"<{name}>{escape(str(value))}</{name}>"), st.just(""), 10)

    objects = ""
    for _ in range(rnd.randint(0, 4)):
        box = _often(draw, rnd, st.just(_plausible_box(rnd, 1, 25, 15)), st.lists(COORD, min_size=4, max_size=4))
        objects += ("<object>" + tag("name", _often(draw, rnd, st.sampled_from(["dog", "cat", " cat "]),
                                                    st.sampled_from(["", "unicorn"]), 8))
                    + tag("difficult", _often(draw, rnd, st.sampled_from([0, 1]), st.sampled_from([2, "", "yes"])))
                    + "<bndbox>" + "".join(tag(c, v) for c, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
                    + "</bndbox></object>")
    size = _often(draw, rnd, st.sampled_from(["<size><width>50</width><height>40</height></size>",
                                              ""]),   # none: the image's own size
                  st.sampled_from(["<size><width>0</width><height>x</height></size>",
                                   "<size><width>30</width><height>20</height></size>"]))
    xml = f"<{_often(draw, rnd, st.just('annotation'), st.just('html'), 8)}>{size}{objects}</annotation>"
    if _often(draw, rnd, st.just(False), st.just(True), 8):   # a file cut short
        xml = xml[:draw(st.integers(0, len(xml)))]
    return _often(draw, rnd, st.just(xml), st.text(max_size=40), 10)


@settings(FAST, max_examples=100)
@given(xml=voc_xml(), on_error=st.sampled_from(["raise", "skip"]))
def test_random_voc_xml_is_read_or_refused_and_every_box_kept_is_valid(xml, on_error, det_images):
    from selfsup.data.detection import VOCDetectionSet
    from selfsup.errors import DatasetFormatError

    (det_images / "VOCdevkit/VOC2007/Annotations/000001.xml").write_text(xml)
    try:
        ds = VOCDetectionSet(str(det_images), [2007], "test", ("dog", "cat"), on_error)
    except DatasetFormatError as e:
        assert on_error == "raise" or "is not one of dog, cat" in str(e)   # skip mends all but an unknown class
        return
    _boxes_are_valid(ds, 50, 40)


IDS = st.sampled_from(["1", None, 1.5, True, [1]])   # not ids
NUM = st.one_of(st.floats(), st.sampled_from(["3", None, True, [2]]))   # not (finite) numbers


@st.composite
def coco_doc(draw):
    """A COCO json of two 30x20 images (a.png, b.png) with plausible ids, names and boxes, and now and then
    a wrong value anywhere; or (one time in eight) any small json document."""
    import random

    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    if _often(draw, rnd, st.just(False), st.just(True), 8):
        return draw(st.recursive(st.none() | st.booleans() | NUM | st.text(max_size=4), lambda c: st.lists(
            c, max_size=3) | st.dictionaries(st.sampled_from(["images", "annotations", "categories"]), c, max_size=3),
            max_leaves=6))
    ids = st.integers(0, 3)

    def maybe(d: dict) -> dict:   # a key dropped now and then
        return {k: v for k, v in d.items() if _often(draw, rnd, st.just(True), st.just(False), 20)}

    images = [maybe({"id": _often(draw, rnd, st.just(k + 1), st.one_of(ids, IDS), 8),   # sometimes twice, or none
                     "file_name": _often(draw, rnd, st.sampled_from(["a.png", "b.png"]), st.sampled_from(
                         ["", "none.png", 3, None]), 8),
                     "width": _often(draw, rnd, st.just(30), st.sampled_from([0, -1, "x", None])),
                     "height": _often(draw, rnd, st.just(20), st.sampled_from([0, None, "y"]))})
              for k in range(draw(st.integers(1, 3)))]
    cats = [maybe({"id": _often(draw, rnd, st.just(k + 1), st.one_of(ids, IDS), 40),
                   "name": _often(draw, rnd, st.just(name), st.just(3), 40)}) for k, name in enumerate(["cat", "dog"])]
    anns = []
    for _ in range(draw(st.integers(1, 6))):
        x1, y1, x2, y2 = _plausible_box(rnd, 0, 18, 12)
        anns.append(maybe({"id": draw(ids), "image_id": _often(draw, rnd, st.integers(1, 3), st.one_of(ids, IDS), 8),
                           "category_id": _often(draw, rnd, st.integers(1, 2), st.one_of(ids, IDS), 8),
                           "iscrowd": _often(draw, rnd, st.sampled_from([0, 1]), st.sampled_from([2, "1", None]), 8),
                           "bbox": _often(draw, rnd, st.just([x1, y1, x2 - x1, y2 - y1]), st.one_of(
                               st.lists(st.one_of(st.integers(-5, 40), NUM), max_size=5), st.text(max_size=5),
                               NUM))}))
    return {"images": images + draw(st.lists(IDS, max_size=1)), "categories": cats,
            "annotations": anns + draw(st.lists(NUM, max_size=1))}


@settings(FAST, max_examples=120)
@given(doc=coco_doc(), on_error=st.sampled_from(["raise", "skip"]))
def test_random_coco_json_is_read_or_refused_and_every_box_kept_is_valid(doc, on_error, tmp_path_factory,
                                                                          det_images):
    import json

    from selfsup.data.detection import CocoDetectionSet
    from selfsup.errors import DatasetFormatError

    path = tmp_path_factory.mktemp("coco") / "ann.json"
    path.write_text(json.dumps(doc))
    try:
        ds = CocoDetectionSet(str(det_images), str(path), None, on_error)
    except DatasetFormatError as e:   # skip mends all but a file of another shape
        assert on_error == "raise" or any(w in str(e) for w in ("categories", "not a json", "needs the lists")), e
        return
    _boxes_are_valid(ds, 30, 20)


TIMM_KEYS = ["img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_chans", "drop_rate",
             "drop_path_rate", "class_token", "global_pool", "qkv_bias", "reg_tokens", "no_embed_class", "bogus"]
# small sizes (a real model is built when the config is accepted) or absurd ones (refused before any memory)
TIMM_VALUES = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 3, 4, 7, 28, 10**9]), st.floats(-2, 3), st.sampled_from(["nan", "inf", "1e9"]),
    st.booleans(), st.none(), st.text(max_size=6), st.lists(st.integers(-1, 8), max_size=3))


@settings(FAST, max_examples=40)
@given(args=st.dictionaries(st.sampled_from(TIMM_KEYS), TIMM_VALUES, min_size=1, max_size=3))
def test_random_timm_backbone_args_are_built_or_refused_with_a_config_error(args):
    from selfsup.models.backbones import build_backbone

    try:
        cfg = load_config("mocov3-vit-fmnist-cpu", [f"model.backbone_args.{k}={_text(v)}" for k, v in args.items()])
        build_backbone(cfg.model.backbone, backbone_args=OmegaConf.to_container(cfg.model.backbone_args))
    except SelfsupError:
        pass
