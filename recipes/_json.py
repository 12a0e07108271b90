"""JSON that every parser reads: Python's ``json`` writes ``NaN`` and ``Infinity``, which the JSON standard (and
``JSON.parse``, ``jq``) rejects; a non-finite float is written as ``null`` instead.

    >>> json.dumps(finite_json({"ce_loss_recovered": math.nan}), allow_nan=False)   # '{"ce_loss_recovered": null}'
"""

from __future__ import annotations

import math


def finite_json(value: object) -> object:
    """``value`` with every non-finite float, in nested dicts, lists and tuples, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value
