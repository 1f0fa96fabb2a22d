"""Smoke test of bench/gpu.py at toy size on CPU: both families, both sides, the same FLOPs per step on each side
(padding is no model work), a packed/padded ratio, and what a CPU cannot run named as skipped."""

from __future__ import annotations

import re
from pathlib import Path

from tests.e2e_utils import run_python

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_bench_gpu_toy_size_on_cpu():
    proc = run_python(f"import runpy, sys; sys.argv = [{str(BENCH)!r}] + sys.argv[1:]; "
                      f"runpy.run_path({str(BENCH)!r}, run_name='__main__')", "--toy", "--device", "cpu",
                      timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^device cpu: peak [0-9.e+-]+ TFLOPS bf16 \(matmul probe\)", out, re.M), out
    for family in ("qwen2_vl", "llava"):
        sides = {}
        for side in ("padded", "packed"):
            m = re.search(rf"^{family} {side} \(sdpa\): .* (\d+) tokens in (\d+) slots .* ([0-9.e+-]+) TFLOPs/step "
                          rf"\(vision ([0-9.]+)%\), mfu ([0-9.]+)$", out, re.M)
            assert m, out
            sides[side] = m.groups()
            assert float(m.group(5)) > 0 and 0 < float(m.group(4)) < 100
        # the same samples on both sides: the same real tokens and the same model FLOPs; packing needs fewer slots
        assert sides["padded"][0] == sides["packed"][0] and sides["padded"][2] == sides["packed"][2]
        assert int(sides["packed"][1]) < int(sides["padded"][1])
        assert re.search(rf"^{family}: packed/padded time=[0-9.]+ speed=[0-9.]+ mfu=[0-9.]+$", out, re.M), out
        assert f"{family} zero3 (1 GPU, packed): skipped (needs a GPU)" in out
        assert f"{family} peak memory at 256 tokens: skipped (CUDA only" in out
