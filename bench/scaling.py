"""1 vs 2 processes with DeepSpeed ZeRO-2 on CPU: samples per second and the two loss trajectories, side by side.

Both runs see the same global batch (1 process at micro-batch 2b, 2 processes at micro-batch b) on the same
samples, so their losses must agree step by step; the throughput ratio is what the second process buys.
Samples/s is the mean of metrics.jsonl's `samples_per_s` over the steps after the first (start-up excluded).

    python bench/scaling.py --samples 96 --steps 12 --micro 2            # a meaningful CPU size
    python bench/scaling.py --samples 16 --steps 2 --micro 1 --max-length 256   # toy (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _config(root: Path, name: str, model: Path, data: Path, micro: int, args: argparse.Namespace) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model)},
        "data": {"sources": [{"path": str(data), "sample": f"first:{args.samples}"}], "micro_batch_size": micro,
                 "max_length": args.max_length, "shuffle": False},
        "trainer": {"output_dir": str(root / name), "max_steps": args.steps, "gradient_accumulation_steps": args.gas,
                    "progress_bar": False, "seed": 7},
        "optimizer": {"lr": 1e-3},
        "scheduler": {"type": "constant"},
        "checkpoint": {"export_final": False},
        "distributed": {"type": "deepspeed", "zero_stage": 2},
    }))
    return path


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=96, help="training samples (synthetic shapes data)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--micro", type=int, default=2, help="micro-batch per process of the 2-process run (b)")
    p.add_argument("--gas", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--family", default="llava_next")
    p.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    args = p.parse_args(argv)

    from arctic_vl.data.synthetic import make_synthetic_data
    from arctic_vl.distributed.deepspeed_backend import free_port
    from arctic_vl.models.tiny import make_tiny_model

    root = args.out or Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(args.family, root / "model", seed=0)
    make_synthetic_data(root / "data", n=max(args.samples, 16), seed=0)
    data = root / "data" / "train.llava.json"

    one = _config(root, "one", model, data, 2 * args.micro, args)
    two = _config(root, "two", model, data, args.micro, args)
    _run([str(BIN / "arctic_vl"), "train", str(one)])
    _run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(BIN / "arctic_vl"),
          "train", str(two)])
    m1, m2 = _metrics(root / "one"), _metrics(root / "two")

    def rate(ms: list[dict[str, Any]]) -> float:
        tail = ms[1:] or ms
        return statistics.mean(m["samples_per_s"] for m in tail)

    r1, r2 = rate(m1), rate(m2)
    print(f"ZeRO-2 on CPU, {args.family}, {args.samples} samples, {args.steps} steps, global batch "
          f"{2 * args.micro * args.gas} (1 proc x micro {2 * args.micro} | 2 procs x micro {args.micro}), gas {args.gas}")
    print(f"{'step':>4} {'loss 1 proc':>14} {'loss 2 procs':>14} {'|diff|':>10}")
    worst = 0.0
    for a, b in zip(m1, m2):
        diff = abs(a["loss"] - b["loss"])
        worst = max(worst, diff)
        print(f"{a['step']:>4} {a['loss']:>14.6f} {b['loss']:>14.6f} {diff:>10.2e}")
    print(f"samples/s: 1 proc {r1:.2f} | 2 procs {r2:.2f} | ratio 2/1 {r2 / r1:.2f}x")
    print(f"max loss difference {worst:.2e}")
    return {"samples_per_s_1": r1, "samples_per_s_2": r2, "ratio": r2 / r1, "max_loss_diff": worst,
            "losses_1": [m["loss"] for m in m1], "losses_2": [m["loss"] for m in m2]}


if __name__ == "__main__":
    main()
