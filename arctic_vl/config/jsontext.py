"""JSON text from users (data files, record lines, a verb's input files): one parser for all of them.

Python's `json.loads` fails in several ways on hostile or odd input: `JSONDecodeError` for bad syntax, but a
bare `ValueError` for an integer longer than the interpreter's digit limit (4300 digits), `RecursionError` for
deep nesting, and a `JSONDecodeError` for a UTF-8 byte-order mark that editors on Windows put first. `parse_json`
turns every one of them into a `JsonTextError` saying what is wrong, and accepts the BOM (as the YAML config
loader does). Imports nothing of the project, so every layer may use it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

BOM = "\ufeff"


class JsonTextError(ValueError):
    """Text that is no JSON value: `msg` says why (no position), `lineno`/`colno` where (1-based, None if unknown)."""

    def __init__(self, msg: str, lineno: int | None = None, colno: int | None = None):
        at = f" at line {lineno}, column {colno}" if lineno is not None else ""
        super().__init__(f"not valid JSON ({msg}{at})")
        self.msg = msg
        self.lineno = lineno
        self.colno = colno


def parse_json(text: str | bytes) -> Any:
    """The JSON value of `text` (bytes must be UTF-8); a leading UTF-8 BOM is dropped. Anything that is not a JSON
    value within the interpreter's limits (bad syntax, a number of more digits than it converts, nesting deeper
    than its recursion limit, bytes that are not UTF-8) raises `JsonTextError`."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonTextError(f"not UTF-8 text: byte {text[e.start]:#04x} at offset {e.start}") from None
    text = text.removeprefix(BOM)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JsonTextError(e.msg, e.lineno, e.colno) from None
    except RecursionError:
        raise JsonTextError(f"nested deeper than this interpreter's recursion limit ({sys.getrecursionlimit()})") \
            from None
    except ValueError as e:  # int('9' * 5000): "Exceeds the limit (4300 digits) for integer string conversion"
        limit = sys.get_int_max_str_digits()
        if "integer string conversion" in str(e):
            raise JsonTextError(f"a number with more than {limit} digits") from None
        raise JsonTextError(str(e)) from None
