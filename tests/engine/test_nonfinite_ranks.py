"""A NaN loss on one rank only stops every rank with the same message (issue 13): the non-finite decision
is collective, so no rank is left waiting in the next step's collective."""
from dist_utils import run_distributed

from conftest import TINY


def _train_nan_on_rank_1(rank, world_size, run_dir):
    from selfsup.config import load_config
    from selfsup.engine.trainer import train
    from selfsup.errors import NonFiniteLossError
    from selfsup.methods.simclr import SimCLR

    if rank == 1:   # the 3rd forward of rank 1 returns a NaN loss; rank 0 never sees one itself
        forward, count = SimCLR.forward, [0]

        def patched(self, views, index):
            out = forward(self, views, index)
            count[0] += 1
            if count[0] == 3:
                out["loss"] = out["loss"] * float("nan")
            return out
        SimCLR.forward = patched
    try:
        train(load_config(None, TINY + ["train.max_steps=20", "eval.every=0", f"run_dir={run_dir}"]))
    except NonFiniteLossError as e:
        return str(e)
    return "finished"


def test_nan_on_one_rank_stops_every_rank_with_one_message(tmp_path):
    messages = run_distributed(_train_nan_on_rank_1, 2, str(tmp_path / "run"), timeout=90)
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("non-finite loss (rank 1 of 2: nan) at step 2, epoch 0"), messages[0]
