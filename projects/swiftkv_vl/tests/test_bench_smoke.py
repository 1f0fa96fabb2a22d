"""bench/swiftkv_prefill.py runs at toy size and prints its ratio."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

if importlib.util.find_spec("swiftkv_vl") is None:  # running from a checkout without the plugin installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

BENCH = Path(__file__).resolve().parents[3] / "bench" / "swiftkv_prefill.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("swiftkv_prefill_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_smoke(capsys):
    bench = _load_bench()
    ratio = bench.main(
        [
            "--layers",
            "4",
            "--hidden",
            "64",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--vocab",
            "256",
            "--prompt-len",
            "96",
            "--rounds",
            "2",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    match = re.search(r"^ratio=([0-9.]+) ", out, re.MULTILINE)
    assert match, out
    assert float(match.group(1)) == round(ratio, 3)
    assert 0.05 < ratio < 20  # a real timing, not a placeholder
    assert "prompt: 96 tokens" in out and "L=4 M=2 G=1" in out
    torch.set_num_threads(1)
