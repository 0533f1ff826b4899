"""Benchmarks: each prints a table and writes JSON (``selfsup bench NAME``); `BENCHES` is the
registry the command line reads. They measure the project's own code paths (the trainer's step, the
instance classifier's step, the augmentation, the data readers), not copies of them."""
import os

from ..errors import ConfigError
from . import augment, classifier, data, methods, throughput
from .common import Bench

BENCHES: dict[str, Bench] = {b.name: b for b in (classifier.BENCH, throughput.BENCH, augment.BENCH, data.BENCH,
                                                   methods.BENCH)}



def run_bench(name: str, argv: list[str]) -> dict:
    """`selfsup bench NAME ARGS`: its rows and notes, and the JSON file it wrote (--out, else
    runs/bench/NAME.json, or the file a bench names inside its --out folder)."""
    if name not in BENCHES:
        raise ConfigError(f"unknown benchmark '{name}'. Valid: {', '.join(BENCHES)} (see `selfsup bench --list`)")
    argv, bench = list(argv), BENCHES[name]
    if "--out" not in argv and not bench.out_file:
        argv += ["--out", f"runs/bench/{name}.json"]
    res = bench.main(argv)
    out = os.path.join(res["config"]["out"], bench.out_file) if bench.out_file else argv[argv.index("--out") + 1]
    return {"rows": res["rows"], "notes": res["notes"], "out": out}


__all__ = ["BENCHES", "Bench", "run_bench"]
