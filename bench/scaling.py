"""1 vs 2 processes on CPU: DDP and DeepSpeed ZeRO-2 side by side with the 1-process baseline.

Every run sees the same global batch on the same samples in the same order (1 process at micro-batch 2b, 2
processes at micro-batch b, `data.shuffle: false`), so the three loss trajectories must agree step by step; the
throughput ratio is what the second process buys. Every process runs with ``--threads`` torch threads
(OMP_NUM_THREADS), the same on every side. A fourth run, 1 process at micro-batch b (one rank's share of the
work, alone), gives the cost of being two: ``overhead = step time (2 processes) - step time (1 process at b)``,
i.e. the gradient collectives, the wait for the slower rank and the contention of two processes on shared cores.
A fifth, ``ddp_plain``, is DDP with `data.balance_ranks: false` (each rank takes its micro-batch of the global
batch in order, whatever its tokens): its overhead beside DDP's is the wait on the other rank's longer batch
that balancing removes.

Runs alternate within each round (the order rotates); samples/s of a run = its samples / its seconds over the
steps after ``--skip`` (start-up excluded); min / median / max over the rounds are printed, with the ratios
``ddp/1`` and ``zero2/1`` (medians).

    python bench/scaling.py                                              # micro-batch 8, 3 rounds
    python bench/scaling.py --samples 16 --steps 2 --micro 1 --rounds 1 --skip 0 --runs one ddp zero2   # toy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without arctic_vl installed

BIN = Path(sys.executable).parent
RUNS = ("one", "ddp", "zero2", "one_half", "ddp_plain")


def _env(threads: int) -> dict[str, str]:
    n = str(threads)
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}


def _config(root: Path, name: str, model: Path, data: Path, micro: int, distributed: dict[str, Any],
            args: argparse.Namespace) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model)},
        "data": {"sources": [{"path": str(data), "sample": f"first:{args.samples}"}], "micro_batch_size": micro,
                 "max_length": args.max_length, "shuffle": False, "balance_ranks": name != "ddp_plain"},
        "trainer": {"output_dir": str(root / name), "max_steps": args.steps, "gradient_accumulation_steps": args.gas,
                    "progress_bar": False, "seed": 7, "log_every_n_steps": 10_000},
        "optimizer": {"lr": 1e-3},
        "scheduler": {"type": "constant"},
        "checkpoint": {"export_final": False},
        "distributed": distributed,
    }))
    return path


def _command(name: str, config: Path) -> list[str]:
    from arctic_vl.distributed.deepspeed_backend import free_port

    train = [str(BIN / "arctic_vl"), "train", str(config)]
    if name in ("ddp", "ddp_plain"):
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *train]
    if name == "zero2":
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *train]
    return train


def _run(cmd: list[str], threads: int) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _rate(ms: list[dict[str, Any]], skip: int) -> tuple[float, float]:
    """(samples/s, seconds per step) over the steps after `skip`."""
    tail = ms[skip:] or ms
    seconds = sum(m["step_time_s"] + m["data_time_s"] for m in tail)
    return sum(m["samples"] for m in tail) / seconds, seconds / len(tail)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=256, help="training samples (synthetic shapes data)")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--micro", type=int, default=8, help="micro-batch per process of the 2-process runs (b)")
    p.add_argument("--gas", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process, every run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip", type=int, default=2, help="steps not timed at the start of each run")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                   help="which runs (one: 1 process at 2b; one_half: 1 process at b, for the overhead; ddp_plain: DDP "
                        "without data.balance_ranks)")
    p.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    args = p.parse_args(argv)
    if "one" not in args.runs:
        p.error("--runs needs `one` (the baseline)")

    from arctic_vl.data.synthetic import make_synthetic_data
    from arctic_vl.models.tiny import make_tiny_model
    from bench.common import recipe_shape

    root = args.out or Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model("llava_next", root / "model", seed=0, **recipe_shape())
    make_synthetic_data(root / "data", n=max(args.samples, 16), seed=0, heldout=0, questions_per_image=3)
    data = root / "data" / "train.llava.json"
    single, ds = {"type": "single"}, {"type": "deepspeed", "zero_stage": 2}
    plans = {"one": (2 * args.micro, single), "ddp": (args.micro, {"type": "ddp"}), "zero2": (args.micro, ds),
             "one_half": (args.micro, single), "ddp_plain": (args.micro, {"type": "ddp"})}
    runs = [k for k in RUNS if k in args.runs]
    rates: dict[str, list[float]] = {k: [] for k in runs}
    step_s: dict[str, list[float]] = {k: [] for k in runs}
    losses: dict[str, list[float]] = {}
    for r in range(args.rounds):
        order = runs[r % len(runs):] + runs[:r % len(runs)]
        for name in order:
            micro, distributed = plans[name]
            run_root = root / f"round{r}"
            run_root.mkdir(exist_ok=True)
            config = _config(run_root, name, model, data, micro, distributed, args)
            _run(_command(name, config), args.threads)
            ms = _metrics(run_root / name)
            rate, per_step = _rate(ms, args.skip)
            rates[name].append(rate)
            step_s[name].append(per_step)
            losses[name] = [m["loss"] for m in ms]
            print(f"round {r} {name:>8}: {rate:.2f} samples/s, {per_step * 1e3:.1f} ms/step")

    print(f"tiny llava_next (the shapes recipe's shape), {args.samples} samples, {args.steps} steps, global batch "
          f"{2 * args.micro * args.gas} (1 proc x micro {2 * args.micro} | 2 procs x micro {args.micro}), "
          f"gas {args.gas}, "
          f"{args.threads} thread(s) per process")
    two = [k for k in ("ddp", "zero2", "ddp_plain") if k in runs]
    print(f"{'step':>4} {'loss 1 proc':>14}" + "".join(f" {'loss ' + k:>14}" for k in two) + f" {'max |diff|':>11}")
    worst = 0.0
    for i, a in enumerate(losses["one"]):
        others = [losses[k][i] for k in two]
        diff = max((abs(a - b) for b in others), default=0.0)
        worst = max(worst, diff)
        print(f"{i + 1:>4} {a:>14.6f}" + "".join(f" {b:>14.6f}" for b in others) + f" {diff:>11.2e}")
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k in runs:
        print(f"{k:>8}: samples/s median {med[k]:.2f} (min {min(rates[k]):.2f}, max {max(rates[k]):.2f}), "
              f"{statistics.median(step_s[k]) * 1e3:.1f} ms/step")
    if "one_half" in runs:
        half = statistics.median(step_s["one_half"])
        for k in two:
            over = statistics.median(step_s[k]) - half
            print(f"{k}: overhead of being two {over * 1e3:.1f} ms/step ({over / statistics.median(step_s[k]):.0%} of "
                  f"its step; its step time minus 1 process at micro {args.micro})")
    print("samples/s: 1 proc " + f"{med['one']:.2f}" + "".join(f" | {k} {med[k]:.2f}" for k in two)
          + "".join(f" | ratio {k}/1 {med[k] / med['one']:.2f}x" for k in two))
    print(f"max loss difference {worst:.2e}")
    return {"samples_per_s": med, **{f"ratio_{k}": med[k] / med["one"] for k in two}, "max_loss_diff": worst,
            "losses": losses}


if __name__ == "__main__":
    main()
