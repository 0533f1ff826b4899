"""The numbers of every method preset, and a checkpoint, as the code before the engine redesign made
them (tests/golden/, written by `python tests/golden_runs.py --record` on that code): the code of
today must reproduce them to 1e-6 relative, and resume the old checkpoint to the same model."""
import json
import shutil

import pytest

import golden_runs as G

WANT = json.loads(G.GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(G.RUNS))
def test_six_steps_of_each_preset_give_the_recorded_numbers(name, tmp_path):
    assert G.compare(G.run_one(name, tmp_path / name), WANT[name]) == []


def test_two_process_runs_give_the_recorded_numbers(tmp_path):
    got = G.run_dist(G.DIST_RUNS, tmp_path)
    assert {n: G.compare(got[n], WANT[n]) for n in G.DIST_RUNS} == {n: [] for n in G.DIST_RUNS}


def test_a_checkpoint_written_before_the_redesign_resumes_to_the_recorded_run(tmp_path):
    """The fixture is millionway-sampled stopped after 3 of its 6 steps by the old code; resuming it must
    give the uninterrupted run's losses and final state (recorded then, under OLD_KEY)."""
    from selfsup.cli import main

    run = tmp_path / "old-run"
    shutil.copytree(G.OLD_RUN_DIR, run)
    assert main(["train", "--resume", str(run), "train.max_steps=6"]) == 0
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert G.compare(G.record_of(run, final), WANT[G.OLD_KEY]) == []
    # the old run directory still evaluates (config.yaml, encoder.safetensors)
    shutil.copytree(G.OLD_RUN_DIR, tmp_path / "old-eval")
    assert main(["eval", "knn", "--run", str(tmp_path / "old-eval")]) == 0
    assert json.loads((tmp_path / "old-eval/eval/knn.json").read_text())["knn_top1"] > 0
