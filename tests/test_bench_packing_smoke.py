"""Smoke test of bench/packing.py at toy size: both mixes run both sides on the same samples and print a ratio."""

from __future__ import annotations

import re
from pathlib import Path

from tests.e2e_utils import run_python

BENCH = Path(__file__).resolve().parents[1] / "bench" / "packing.py"
TOY = ["--samples", "20", "--hidden", "32", "--layers", "1", "--heads", "2", "--rounds", "1", "--short", "8", "16",
       "--long", "40", "48", "--max-length", "64", "--micro-batch-size", "2", "--real-samples", "12",
       "--real-max-length", "256"]


def test_bench_packing_toy_size_prints_ratio():
    proc = run_python(f"import runpy, sys; sys.argv = [{str(BENCH)!r}] + sys.argv[1:]; "
                      f"runpy.run_path({str(BENCH)!r}, run_name='__main__')", *TOY, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for mix in ("realistic", "skewed"):
        assert float(re.search(rf"^{mix}: ratio=([0-9.]+)", out, re.M).group(1)) > 0, out
    # the realistic mix: the shapes data through the engine's data factory, one packed row of 256 a micro-batch
    real = re.search(r"samples 12 \((\d+) tokens, (\d+)-(\d+) each\): padding 6 micro-batches of 2, efficiency "
                     r"([0-9.]+)%; packing (\d+) rows of <= 256 in (\d+) micro-batches of 1", out)
    assert real, out
    assert int(real.group(5)) == int(real.group(6)) and int(real.group(1)) <= int(real.group(5)) * 256
    # both sides saw the same samples: the same real-token count, and packing needs fewer slots
    stats = re.search(r"samples 20 \((\d+) tokens\): padding 10 micro-batches of 2, efficiency ([0-9.]+)%; "
                      r"packing (\d+) rows of <= 64 in (\d+) micro-batches, efficiency ([0-9.]+)%", out)
    assert stats, out
    tokens, pad_eff, rows, _, pack_eff = stats.groups()
    assert int(rows) < 10 and float(pack_eff) > float(pad_eff)
    assert int(tokens) <= int(rows) * 64


def test_bench_packing_refuses_rows_shorter_than_samples():
    proc = run_python(f"import runpy, sys; sys.argv = [{str(BENCH)!r}] + sys.argv[1:]; "
                      f"runpy.run_path({str(BENCH)!r}, run_name='__main__')",
                      *TOY[:-8], "--max-length", "32", "--micro-batch-size", "2", timeout=120)
    assert proc.returncode == 2
    assert "--max-length 32 must be >= the longest sample (48)" in proc.stderr
