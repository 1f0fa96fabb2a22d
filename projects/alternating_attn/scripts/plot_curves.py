"""Loss curves of several runs side by side, their held-out exact match per question type, and chance levels.

    python projects/alternating_attn/scripts/plot_curves.py \
        --run base=projects/alternating_attn/outputs/base \
        --run alternating=projects/alternating_attn/outputs/alternating \
        --run alternating_cross=projects/alternating_attn/outputs/alternating_cross \
        --data projects/alternating_attn/outputs/data \
        --out projects/alternating_attn/docs/loss_curves.png

With no `--run`, the three runs of configs/{base,alternating,alternating_cross}.yaml are used (OUTPUT_DIR
`projects/alternating_attn/outputs/<variant>`). Reads each run's OUTPUT_DIR/metrics.jsonl (training loss per step)
and OUTPUT_DIR/eval.jsonl (training-time evaluations; the one at the latest step is the final evaluation). With
`--data`, chance levels per question type are computed from the synthetic data (see `chance_levels`). Prints a
Markdown table of the final exact match next to the chance levels, and writes the PNG.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ("base", "alternating", "alternating_cross")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of `path` ([] if the file does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far): noisy per-step losses made readable."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def chance_levels(data_dir: Path) -> dict[str, dict[str, float]]:
    """Chance per question type from the synthetic LLaVA files in `data_dir` (train.llava.json, heldout.llava.json).

    * `uniform`: 1 / number of distinct answers of the type in the training data (guessing among its classes);
    * `blind`: held-out accuracy of the best model that reads the question but not the image: for each question
      text, answer the most frequent training answer of that text. This is the bar an image question must clear
      to show the image was used (e.g. a position question names its two options, so `blind` is 0.5 there).
      Text questions need no image, so their `blind` level is high by design.
    """
    train = json.loads((data_dir / "train.llava.json").read_text())
    heldout = json.loads((data_dir / "heldout.llava.json").read_text())

    def qa(record: dict[str, Any]) -> tuple[str, str]:
        turns = record["conversations"]
        return turns[0]["value"].replace("<image>", "").strip(), turns[-1]["value"].strip().lower()

    answers: dict[str, set[str]] = defaultdict(set)
    by_question: dict[str, Counter[str]] = defaultdict(Counter)
    for record in train:
        question, answer = qa(record)
        answers[record["qtype"]].add(answer)
        by_question[question][answer] += 1
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for record in heldout:
        question, answer = qa(record)
        seen = by_question.get(question)
        guess = seen.most_common(1)[0][0] if seen else None
        hits[record["qtype"]] += guess == answer
        totals[record["qtype"]] += 1
    return {qtype: {"uniform": 1 / len(answers[qtype]), "blind": hits[qtype] / totals[qtype]}
            for qtype in sorted(totals)}


def final_eval(run_dir: Path) -> dict[str, Any] | None:
    """The run's final training-time evaluation (eval.jsonl), or None.

    Standalone evaluations (`arctic_vl evaluate`, marked `"standalone": true`) are not training-time ones;
    nor is a line whose step is below an earlier line's (what `evaluate` appended, unmarked, before it wrote
    eval_standalone.jsonl): the latest step wins, the last line of that step among equals.
    """
    lines = [e for e in read_jsonl(run_dir / "eval.jsonl") if not e.get("standalone")]
    if not lines:
        return None
    top = max(e.get("step", 0) for e in lines)
    return [e for e in lines if e.get("step", 0) == top][-1]


def table(runs: dict[str, Path], chance: dict[str, dict[str, float]] | None) -> str:
    """Markdown: final exact match per question type for each run, then the chance rows."""
    evals = {name: final_eval(path) for name, path in runs.items()}
    qtypes = sorted({q for e in evals.values() if e for q in e.get("exact_match_by_type", {})} | set(chance or {}))
    lines = ["| | step | eval loss | " + " | ".join(qtypes) + " | all |",
             "|---|---|---|" + "---|" * (len(qtypes) + 1)]
    for name, e in evals.items():
        if not e or "exact_match_by_type" not in e:
            lines.append(f"| {name} | (no evaluation with generate) |")
            continue
        by_type = e["exact_match_by_type"]
        cells = " | ".join(f"{by_type[q]:.2f}" if q in by_type else "-" for q in qtypes)
        lines.append(f"| {name} | {e['step']} | {e['eval_loss']:.3f} | {cells} | {e['exact_match']:.2f} |")
    for kind in ("uniform", "blind"):
        if chance:
            cells = " | ".join(f"{chance[q][kind]:.2f}" if q in chance else "-" for q in qtypes)
            lines.append(f"| chance ({kind}) | | | {cells} | |")
    return "\n".join(lines)


def plot(runs: dict[str, Path], out: Path, chance: dict[str, dict[str, float]] | None, window: int = 20) -> Path:
    """Left: training loss per step (faint) and its moving average; right: final held-out exact match per type."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the training machines
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, run_dir) in enumerate(runs.items()):
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        if not metrics:
            raise SystemExit(f"{run_dir / 'metrics.jsonl'}: no metrics; train the run first")
        steps = [m["step"] for m in metrics]
        losses = [m["loss"] for m in metrics]
        color = colors[i % len(colors)]
        ax_loss.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
        smoothed = smooth(losses, window)
        ax_loss.plot(steps, smoothed, color=color, label=f"{name} (last {window}-step mean {smoothed[-1]:.3f})")
    ax_loss.set(xlabel="optimizer step", ylabel=f"training loss (moving average of {window})", yscale="log",
                title="Training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    evals = {name: final_eval(path) for name, path in runs.items()}
    qtypes = sorted({q for e in evals.values() if e for q in e.get("exact_match_by_type", {})})
    width = 0.8 / max(len(runs), 1)
    for i, (name, e) in enumerate(evals.items()):
        by_type = (e or {}).get("exact_match_by_type", {})
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(qtypes))]
        ax_acc.bar(xs, [by_type.get(q, 0.0) for q in qtypes], width=width, color=colors[i % len(colors)],
                   label=name)
    if chance:
        for j, q in enumerate(qtypes):
            if q in chance:
                ax_acc.hlines(chance[q]["blind"], j - 0.45, j + 0.45, colors="black", linestyles="--",
                              label="chance (question only)" if j == 0 else None)
    ax_acc.set_xticks(range(len(qtypes)), qtypes)
    ax_acc.set(ylim=(0, 1), ylabel="held-out exact match", title="Held-out exact match by question type")
    ax_acc.grid(axis="y", alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """Plot the runs' loss curves to `--out`, print their final exact match beside the chance levels; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], metavar="NAME=OUTPUT_DIR",
                        help="a run to plot (repeatable); default: the three variant runs under outputs/")
    parser.add_argument("--data", type=Path, default=None, help="synthetic data dir, for the chance levels")
    parser.add_argument("--out", type=Path, default=PROJECT / "docs" / "loss_curves.png")
    parser.add_argument("--window", type=int, default=20, help="moving-average window in steps")
    args = parser.parse_args(argv)
    runs: dict[str, Path] = {}
    for spec in args.run or [f"{v}={PROJECT / 'outputs' / v}" for v in DEFAULT_RUNS]:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--run {spec!r}: expected NAME=OUTPUT_DIR")
        runs[name] = Path(path)
    chance = chance_levels(args.data) if args.data is not None else None
    print(table(runs, chance))
    print(f"wrote {plot(runs, args.out, chance, args.window)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
