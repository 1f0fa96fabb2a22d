"""Smoke test of bench/startup.py at toy size: every side starts, the warm one hits the cache, ratios print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.e2e_utils import REPO, subprocess_env


def test_startup_bench_toy(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "startup.py"), "--records", "40", "--rounds", "1", "--workers", "2",
         "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"round 1 warm: .*\(cache \['hit'\]\)", proc.stdout), proc.stdout
    assert re.search(r"round 1 cold-1: .*\(cache \['off'\]\)", proc.stdout), proc.stdout
    assert re.search(r"parallel_speedup=[\d.]+ warm_speedup=[\d.]+", proc.stdout), proc.stdout
