"""`say`: the one rank-0 printer of the engine's notes."""
from selfsup.parallel.distributed import say


def test_say_prints_on_rank_0_only(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    say("one process")
    monkeypatch.setenv("RANK", "0")
    say("rank 0")
    monkeypatch.setenv("RANK", "1")   # torchrun's other ranks, before the process group exists
    say("rank 1")
    assert capsys.readouterr().out == "[selfsup] one process\n[selfsup] rank 0\n"
