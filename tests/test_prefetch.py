"""Prefetching the next step's micro-batches in a thread changes when batches are made, never which or in what order."""

from __future__ import annotations

import threading
import time

import pytest

from arctic_vl.trainers.prefetch import Prefetcher
from tests.e2e_utils import read_metrics, write_yaml


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_items_in_the_same_order(depth):
    with Prefetcher(iter(range(50)), depth) as items:
        assert list(items) == list(range(50))
        assert next(items, "end") == "end"


def test_an_error_of_the_source_is_raised_where_it_happened():
    def source():
        yield from range(3)
        raise ValueError("record 3 is broken")

    items = Prefetcher(source(), 2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="record 3 is broken"):
        next(items)


def test_leaving_early_stops_the_thread_and_releases_the_source():
    released = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            released.set()

    with Prefetcher(endless(), 2) as items:
        assert next(items) == 0
        thread = items._thread
    assert not thread.is_alive()
    deadline = time.monotonic() + 5
    while not released.is_set() and time.monotonic() < deadline:  # the generator is closed when it is collected
        import gc

        gc.collect()
        time.sleep(0.01)
    assert released.is_set()


def test_a_run_with_prefetch_equals_one_without(tmp_path, tiny_llava, synthetic_data):
    from arctic_vl.engine import Engine

    runs = {}
    for prefetch in (False, True):
        root = tmp_path / f"prefetch-{prefetch}"
        root.mkdir()
        config = write_yaml(root / "run.yaml", {
            "model": {"name_or_path": str(tiny_llava)},
            "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:24"}],
                     "micro_batch_size": 4, "max_length": 256},
            "trainer": {"output_dir": "out", "max_steps": 3, "gradient_accumulation_steps": 2, "progress_bar": False,
                        "seed": 3, "prefetch": prefetch},
            "checkpoint": {"export_final": False},
        })
        Engine(config).train()
        runs[prefetch] = read_metrics(root / "out")
    keys = ("loss", "grad_norm", "tokens", "samples", "label_tokens")
    assert [[m[k] for k in keys] for m in runs[True]] == [[m[k] for k in keys] for m in runs[False]]
