"""What the loop prints: the model's parameter counts at the start, evaluation results after each evaluation."""

from __future__ import annotations

from typing import Any


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


def format_results(results: dict[str, Any]) -> str:
    """Evaluation results on one line: `eval_loss 1.2345, exact_match 0.5000 (colour 0.6000, count 0.4000), ...`."""
    out = []
    for key, value in results.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {_number(v)}" for k, v in value.items())
            out.append(f"{key} ({inner})")
        else:
            out.append(f"{key} {_number(value)}")
    return ", ".join(out)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
