"""The overhead bench runs end to end at toy size (so it cannot rot); the real figure is in the README."""

from __future__ import annotations

import math
import runpy
from pathlib import Path


def test_overhead_bench_smoke(capsys):
    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "overhead.py"))
    ratio = bench["main"](["--steps", "3", "--warmup", "2", "--rounds", "1", "--hidden", "32", "--layers", "1"])
    out = capsys.readouterr().out
    assert math.isfinite(ratio) and ratio > 0
    assert "median ratio engine/bare:" in out and "round 1: engine" in out
