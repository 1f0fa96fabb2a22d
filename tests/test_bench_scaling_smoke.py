"""Smoke test of bench/scaling.py at toy size: 1 process, DDP and ZeRO-2 train, losses agree, ratios are printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.e2e_utils import REPO, subprocess_env


def test_scaling_bench_toy(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scaling.py"), "--samples", "16", "--steps", "2", "--micro", "1",
         "--max-length", "1024", "--rounds", "1", "--skip", "0", "--runs", "one", "ddp", "zero2",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = re.search(r"samples/s: 1 proc ([\d.]+) \| ddp ([\d.]+) \| zero2 ([\d.]+) \| ratio ddp/1 ([\d.]+)x \| "
                      r"ratio zero2/1 ([\d.]+)x", proc.stdout)
    assert ratio, proc.stdout
    assert all(float(g) > 0 for g in ratio.groups())
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+", proc.stdout, re.M)
    assert [int(r[0]) for r in rows] == [1, 2]
    assert all(abs(float(a) - float(b)) < 1e-4 and abs(float(a) - float(c)) < 1e-4 for _, a, b, c in rows), proc.stdout
