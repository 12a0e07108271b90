"""JSON that every parser reads: Python's ``json`` writes ``NaN`` and ``Infinity``, which the JSON standard (and
``JSON.parse``, ``jq``) rejects; a non-finite float is written as ``null`` instead. ``read_json`` and the
shape checks read the project's own saved JSON back, turning a damaged file into one error that names it.

    >>> json.dumps(finite_json({"ce_loss_recovered": math.nan}), allow_nan=False)   # '{"ce_loss_recovered": null}'
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from qscope_plugin.errors import MalformedFileError


def finite_json(value: object) -> object:
    """``value`` with every non-finite float, in nested dicts, lists and tuples, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def read_json(path: str | Path, error: type[MalformedFileError], expected: str) -> object:
    """The JSON value in ``path``, or ``error`` naming the file and what is wrong (missing, not UTF-8, not JSON):
    the one reader for the project's saved JSON files, so that a damaged one is a usage error (exit 2)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{str(path)!r} cannot be read as JSON ({type(e).__name__}: {e}); expected {expected}") from None


def is_number(value: object) -> bool:
    """A JSON number (bool is an int to Python but not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_index(value: object) -> bool:
    """A non-negative JSON integer (a layer or feature index)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_list_of(value: object, check: Callable[[object], bool]) -> bool:
    return isinstance(value, list) and all(check(v) for v in value)


def is_layer_map(value: object, check: Callable[[object], bool]) -> bool:
    """``{"<layer>": v}`` with decimal layer keys (JSON keys are strings) and every value passing ``check``."""
    return isinstance(value, dict) and all(isinstance(k, str) and k.isdecimal() and len(k) <= 6 and check(v)
                                           for k, v in value.items())
