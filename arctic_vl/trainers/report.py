"""What the loop prints: the model's parameter counts at the start, the step line, evaluation results as a table."""

from __future__ import annotations

from typing import Any

from arctic_vl.callbacks.console import format_number

#: an evaluation table shows at most this many rows (the rest are in eval.jsonl)
MAX_RESULT_ROWS = 24


def human_count(n: int) -> str:
    """1234 -> 1.23K, 7_061_000_000 -> 7.06B (three significant digits)."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def format_parameter_counts(counts: dict[str, dict[str, int]]) -> str:
    """One line: the total and trainable parameters, then each part's (parts with no parameters left out)."""
    total = counts["total"]
    share = 100 * total["trainable"] / total["params"] if total["params"] else 0.0
    parts = [f"{name} {human_count(c['params'])} ({human_count(c['trainable'])} trainable)"
             for name, c in counts.items() if name != "total" and c["params"]]
    return (f"parameters: {human_count(total['params'])} total, {human_count(total['trainable'])} trainable "
            f"({share:.1f}%); " + ", ".join(parts))


def format_step_line(step: int, total: int, metrics: dict[str, Any], components: list[str]) -> str:
    """`step 10/100 loss 1.2345 (loss_bbox 0.4000 loss_giou 0.3000) lr 1.00e-03`: the loss, the trainer's named
    side metrics (LossOutput.metrics, as reduced over the step) in parentheses, the LR."""
    shown = [f"{name} {format_number(metrics.get(name))}" for name in components]
    inner = f" ({' '.join(shown)})" if shown else ""
    return f"step {step}/{total} loss {format_number(metrics.get('loss'))}{inner} lr {metrics['lr']:.2e}"


def _rows(results: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_rows(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            rows.append((name, f"[{len(value)} item{'s' if len(value) != 1 else ''}]"))
        elif isinstance(value, str):
            rows.append((name, value if len(value) <= 40 else value[:37] + "..."))
        else:
            rows.append((name, format_number(value)))
    return rows


def format_results(results: dict[str, Any], more_in: str = "eval.jsonl") -> str:
    """Evaluation results as a short aligned table, one `name  value` row each (a line break before every row):
    nested dicts flattened as `outer/inner`, lists shown by their length, at most MAX_RESULT_ROWS rows (the rest
    counted, and in `more_in`)."""
    rows = _rows(results)
    if not rows:
        return " (no results)"
    kept = rows[:MAX_RESULT_ROWS]
    width = max(len(name) for name, _ in kept)
    lines = [f"  {name.ljust(width)}  {value}" for name, value in kept]
    if len(rows) > len(kept):
        lines.append(f"  ... {len(rows) - len(kept)} more in {more_in}")
    return "\n" + "\n".join(lines)
