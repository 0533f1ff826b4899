"""Benchmarks: each prints a table and writes JSON (``selfsup bench NAME``); `BENCHES` is the
registry the command line reads. They measure the project's own code paths (the trainer's step, the
instance classifier's step, the augmentation, the data readers), not copies of them."""
from . import augment, classifier, data, methods, throughput
from .common import Bench

BENCHES: dict[str, Bench] = {b.name: b for b in (classifier.BENCH, throughput.BENCH, augment.BENCH, data.BENCH,
                                                   methods.BENCH)}

__all__ = ["BENCHES", "Bench"]
