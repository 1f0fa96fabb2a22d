"""The console: numbers as a person reads them, and log lines written around the live progress bar."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from loguru import logger

#: a value this close to 0 prints as 0 (float noise such as a KL of -2.4e-11 between equal distributions)
ZERO_TOLERANCE = 1e-9

#: the live training bar (main process), so a log line can be written around it rather than into it
LIVE_BARS: list[Any] = []


@contextlib.contextmanager
def bars_paused() -> Iterator[None]:
    """While active, the live progress bars are cleared from the terminal; they are redrawn after it: a line logged
    inside it starts on a line of its own instead of after the bar's text."""
    bars = list(LIVE_BARS)
    for bar in bars:
        bar.clear()
    try:
        yield
    finally:
        for bar in bars:
            bar.refresh()


def console(level: str, message: str) -> None:
    """Log `message` (loguru, at `level`, named as the caller) around the live progress bar, never inside it."""
    with bars_paused():
        logger.opt(depth=1).log(level, message)


def format_number(value: Any) -> str:
    """A metric for the console: 4 decimals from 0.001 to 10^5, else 3 significant digits in e-notation; within
    ZERO_TOLERANCE of 0 it is `0` (never `-0.0000` or `-2.4e-11`); None `n/a`; ints and other values as they are."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if abs(value) < ZERO_TOLERANCE:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"
