"""Smoke test of bench/scaling.py at toy size: both runs train, losses agree, the ratio is printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.e2e_utils import REPO, subprocess_env


def test_scaling_bench_toy(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scaling.py"), "--samples", "16", "--steps", "2", "--micro", "1",
         "--max-length", "1024", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = re.search(r"samples/s: 1 proc ([\d.]+) \| 2 procs ([\d.]+) \| ratio 2/1 ([\d.]+)x", proc.stdout)
    assert ratio, proc.stdout
    assert float(ratio.group(1)) > 0 and float(ratio.group(2)) > 0
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+", proc.stdout, re.M)
    assert [int(r[0]) for r in rows] == [1, 2]
    assert all(abs(float(a) - float(b)) < 1e-4 for _, a, b in rows), proc.stdout
