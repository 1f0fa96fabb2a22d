"""Learning bench: train + evaluate a recipe and its variants side by side, print accuracy per question type.

Each variant is the same config with `--set` overrides; by default the recipe runs next to its blind
baseline (`data.blank_images=true`: every image replaced by a grey one of the same size), and the line
`delta_vs_blind=...` gives the overall exact-match gain in points. Variants run as parallel processes
(one thread each), so on a machine with more cores a sweep costs the time of one run.

    # the recipe vs blind (docs/learning.md), on 2 cores:
    /tmp/venv/bin/python bench/learning.py configs/shapes-llava-cpu.yaml --parallel 2
    # a sweep: name=override;override
    /tmp/venv/bin/python bench/learning.py configs/shapes-llava-cpu.yaml --no-blind \\
        --variant "lr3e-3=optimizer.lr=3e-3" --variant "h128=model.tiny.hidden=128;model.tiny.intermediate=256"
    # smoke (toy size, seconds): see tests/test_bench_learning_smoke.py

Exit code 0 when every variant trained and evaluated; otherwise 1 (the failing variant's log tail is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "arctic_vl.cli"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`name=key=value;key=value` -> (name, ["key=value", ...]); a bare `name` has no overrides."""
    name, _, rest = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: give NAME or NAME=KEY=VALUE;KEY=VALUE")
    return name, [s.strip() for s in rest.split(";") if s.strip()]


def _last_json(stdout: str) -> dict[str, Any]:
    """The JSON object a CLI verb prints last (log lines may precede it on stdout)."""
    start = stdout.rfind("\n{")
    start = 0 if stdout.startswith("{") and start < 0 else start + 1
    return json.loads(stdout[start:])


def run_variant(config: Path, name: str, overrides: list[str], out_root: Path, common: list[str],
                env: dict[str, str]) -> dict[str, Any]:
    """Train then evaluate one variant in subprocesses; returns its figures (or the error)."""
    out_dir = out_root / name
    sets = [f"trainer.output_dir={out_dir.resolve()}", *common, *overrides]
    args = [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    train = subprocess.run([*CLI, "train", str(config), *args], capture_output=True, text=True, env=env)
    train_s = time.perf_counter() - t0
    if train.returncode != 0:
        return {"name": name, "error": f"train exit {train.returncode}: {train.stderr[-2000:]}"}
    t1 = time.perf_counter()
    ev = subprocess.run([*CLI, "evaluate", str(config), *args], capture_output=True, text=True, env=env)
    eval_s = time.perf_counter() - t1
    if ev.returncode != 0:
        return {"name": name, "error": f"evaluate exit {ev.returncode}: {ev.stderr[-2000:]}"}
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    results = _last_json(ev.stdout)
    return {
        "name": name, "overrides": overrides, "steps": len(metrics), "train_min": train_s / 60, "eval_min": eval_s / 60,
        # per-step time without start-up: what projects a run's length from a shorter one
        "step_ms": 1000 * statistics.median(m["step_time_s"] + m["data_time_s"] for m in metrics),
        "final_train_loss": statistics.fmean(m["loss"] for m in metrics[-20:]),
        "eval_loss": results["eval_loss"], "exact_match": results.get("exact_match"),
        "by_type": results.get("exact_match_by_type", {}), "questions": results.get("eval_questions"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    types = sorted({t for r in rows if "by_type" in r for t in r["by_type"]})
    head = f"{'variant':<18}{'steps':>6}{'min':>6}{'ms/st':>7}{'trloss':>8}{'evloss':>8}{'EM':>6}" + \
        "".join(f"{t[:8]:>9}" for t in types) + f"{'n':>5}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<18} FAILED")
            continue
        em = "".join(f"{100 * r['by_type'].get(t, float('nan')):>9.1f}" for t in types)
        lines.append(f"{r['name']:<18}{r['steps']:>6}{r['train_min']:>6.1f}{r['step_ms']:>7.0f}"
                     f"{r['final_train_loss']:>8.3f}{r['eval_loss']:>8.3f}{100 * (r['exact_match'] or 0):>6.1f}{em}"
                     f"{r['questions'] or 0:>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path)
    p.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE;KEY=VALUE (repeatable)")
    p.add_argument("--no-blind", action="store_true", help="do not add the blind baseline of the first variant")
    p.add_argument("--set", dest="common", action="append", default=[], help="override for every variant")
    p.add_argument("--parallel", type=int, default=1, help="variants at a time (one thread each)")
    p.add_argument("--out", type=Path, default=Path("runs/learning-bench"))
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant] or [("recipe", [])]
    if not args.no_blind:
        first_name, first_sets = variants[0]
        variants.append((f"{first_name}-blind", [*first_sets, "data.blank_images=true"]))
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"variant names must differ: {names}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        rows = list(pool.map(lambda v: run_variant(args.config, v[0], v[1], args.out, args.common, env), variants))
    print(format_table(rows))
    for r in rows:
        if "error" in r:
            print(f"--- {r['name']}: {r['error']}", file=sys.stderr)
    if not args.no_blind and all("error" not in r for r in rows[-2:]):
        recipe, blind = rows[0], rows[-1]
        print(f"delta_vs_blind={100 * (recipe['exact_match'] - blind['exact_match']):.1f} points "
              f"(recipe {100 * recipe['exact_match']:.1f}%, blind {100 * blind['exact_match']:.1f}%)")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
