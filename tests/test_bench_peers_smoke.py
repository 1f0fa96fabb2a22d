"""Smoke test of bench/peers.py at toy size: HF Trainer and arctic-vl (padded, packed) train the same model on the
same data; the padded side's final loss equals the HF Trainer's on the same batches."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.e2e_utils import REPO, subprocess_env


def test_bench_peers_toy_same_batches_same_final_loss():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "peers.py"), "--samples", "24", "--micro-batch-size",
                           "4", "--rounds", "1", "--warmup", "1", "--pack-length", "256", "--sides", "hf", "padded",
                           "packed"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    steps = dict(re.findall(r"^round 0\s+(\w+): (\d+) steps", out, re.M))
    assert steps.keys() == {"hf", "padded", "packed"} and steps["hf"] == steps["padded"] == "6", out
    assert int(steps["packed"]) < 24  # several samples a packed row
    for side in ("padded", "packed"):
        assert float(re.search(rf"^{side}/hf: samples/s ratio=([0-9.]+)", out, re.M).group(1)) > 0, out
        cpu = re.search(rf"^{side}/hf: .*CPU-time ratio .*median ([0-9.]+) \(min", out, re.M)
        assert cpu and float(cpu.group(1)) > 0, out
    hf, ours = (float(x) for x in re.search(r"final loss padded ([0-9.]+) vs hf ([0-9.]+)", out).groups()[::-1])
    assert abs(hf - ours) < 5e-5 and "(equal to 4 decimals)" in out, out
    assert hf > 1.0  # a real loss of a random model, not an empty sum
