"""Configs of older runs: the detection keys moved from eval.det_<key> to the det: section (det.<key>).

tests/fixtures/old-run-eval-det/config.yaml is the config.yaml of a run written before the move; it
must load silently, and to the same config as the det.* spelling of its values.
"""
from pathlib import Path

from omegaconf import OmegaConf

from selfsup.config import DET_RENAMED, DetConfig, config_from_text, load_config

OLD = Path(__file__).parent / "fixtures" / "old-run-eval-det" / "config.yaml"
NEW_SPELLING = ["det.root=/data/shapes", "det.years=[2007]", "det.classes=[square,disc]", "det.iters=123",
                "det.lr=0.01", "eval.knn_k=20", "train.epochs=3"]


def test_an_old_run_config_loads_silently_with_its_values_in_det(capsys):
    assert "det_lr:" in OLD.read_text()   # the fixture is the old spelling
    cfg = load_config(str(OLD))
    assert capsys.readouterr().err == ""
    assert (cfg.det.root, list(cfg.det.years), list(cfg.det.classes), cfg.det.iters, cfg.det.lr) == \
        ("/data/shapes", [2007], ["square", "disc"], 123, 0.01)
    assert cfg.det.norm == DetConfig.norm and cfg.det.batch_size == DetConfig.batch_size
    assert not any(str(k).startswith("det_") for k in cfg.eval) and cfg.eval.knn_k == 20
    same = OmegaConf.to_container(load_config(None, NEW_SPELLING))
    assert OmegaConf.to_container(cfg) == same
    # the copy inside a checkpoint reads the same way
    assert OmegaConf.to_container(config_from_text(OLD.read_text(), source="checkpoint")) == same


def test_an_old_run_resumes_under_the_new_names(tmp_path):
    from selfsup.engine.runs import check_run_resume

    check_run_resume(load_config(None, NEW_SPELLING), OLD.read_text(), tmp_path)   # no difference: no error


def test_an_old_override_is_read_as_the_det_key_with_a_one_line_note(capsys):
    cfg = load_config(None, ["eval.det_lr=0.05", "eval.det_min_sizes=[40,48]"])
    assert cfg.det.lr == 0.05 and list(cfg.det.min_sizes) == [40, 48]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "eval.det_lr is now det.lr" in err[0] and "det.min_sizes=[40,48]" in err[1]


def test_every_det_key_has_its_old_name():
    assert sorted(DET_RENAMED.values()) == sorted(OmegaConf.structured(DetConfig).keys())
    assert all(old == f"det_{new}" for old, new in DET_RENAMED.items())
