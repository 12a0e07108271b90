"""The one reader of index lists and ranges (layers, features, prompt positions) and of counts, for every command,
tab and recipe.

    >>> parse_indices("3,5,7-9", 28, what="layer", subject="this release")
    [3, 5, 7, 8, 9]
    >>> parse_indices("0-999999999", 12, what="position", subject="the prompt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    qscope_plugin.errors.IndexOutOfRangeError: position 999999999 is out of range for the prompt (12 positions: ...

Every bound is checked against what the indices index *before* anything is materialised, so ``0-999999999`` costs
the same few bytes as ``0-3``: a range reaching past the end is refused from its two ends, and the spec's text is
refused past ``MAX_SPEC_CHARS`` before it is split. Counts (batch sizes, top-k, new tokens) go through
``check_count``. Layers and features keep their own error classes (``LayerOutOfRangeError``,
``FeatureOutOfRangeError``), both ``IndexOutOfRangeError``; all of them are ``IndexSpecError`` with one message shape.
"""

from __future__ import annotations

import math
import re

from qscope_plugin.errors import (
    FeatureOutOfRangeError,
    IndexOutOfRangeError,
    IndexSpecError,
    LayerOutOfRangeError,
)

MAX_SPEC_CHARS = 10_000
"""Longest index spec read: thousands of comma-separated ids; a longer text is refused before it is split."""

MAX_NEW_TOKENS = 4096
"""The most new tokens one generation may ask for (CLI, app, recipes): more is refused before the model runs."""

_PART = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")
"""``N`` or ``low-high``."""
MAX_DIGITS = 18
"""No index has more digits than this; a longer number is refused before ``int()`` reads it."""

_OUT_OF_RANGE = {"layer": LayerOutOfRangeError, "feature": FeatureOutOfRangeError}


def out_of_range(what: str, index: object, size: int, subject: str) -> IndexOutOfRangeError:
    """The one message for an index past the end of what it indexes: the value, the valid range, what to do."""
    kind = _OUT_OF_RANGE.get(what, IndexOutOfRangeError)
    valid = f"0..{size - 1}" if size > 0 else "none"
    return kind(f"{what} {index!r} is out of range for {subject} ({size} {what}s: {valid}); pass {what}s in that "
                "range")


def parse_ranges(spec: str, *, what: str, option: str | None = None) -> list[tuple[int, int]]:
    """The ``(first, last)`` pairs of ``"14"``, ``"10-14"`` or ``"3,5,7-9"``, inclusive, read but not expanded.

    Raises ``IndexSpecError`` for a text that is not such a list (a reversed range included), naming ``option`` (the
    command-line option or page field it came from) when given.
    """
    name = option or f"{what}s"
    if not isinstance(spec, str):
        raise IndexSpecError(f"{name} {spec!r} is not text; pass e.g. '14', '10-14' or '3,5,7-9'")
    if len(spec) > MAX_SPEC_CHARS:
        raise IndexSpecError(f"{name} is {len(spec)} characters long, more than the {MAX_SPEC_CHARS} read; pass "
                             "ranges such as '10-14' instead of long lists")
    out = []
    for part in spec.split(","):
        bounds = _PART.fullmatch(part)
        if bounds is None:
            raise IndexSpecError(f"{name} {spec[:80]!r} cannot be read; expected indices such as '14', '10-14' or "
                                 "'3,5,7-9'")
        if max(len(bounds[1]), len(bounds[2] or "")) > MAX_DIGITS:
            raise IndexSpecError(f"{name} {part.strip()[:60]!r} holds a number of more than {MAX_DIGITS} digits; no "
                                 f"{what} is that large")
        first, last = int(bounds[1]), int(bounds[2] or bounds[1])
        if first > last:
            raise IndexSpecError(f"{name} {part.strip()!r} is a reversed range; write it low-high, e.g. "
                                 f"'{last}-{first}'")
        out.append((first, last))
    return out


def parse_indices(spec: str, size: int, *, what: str, subject: str, option: str | None = None,
                  all_word: str | None = "all") -> list[int]:
    """``spec`` (``"10-14"``, ``"3,5,7-9"`` or ``all_word``) as the sorted, distinct indices below ``size``.

    ``what`` names one index (``"layer"``, ``"feature"``, ``"prompt position"``) and ``subject`` what holds them
    (``"release 'x'"``, ``"the prompt"``); they make the message of the error raised for an index past the end
    (``LayerOutOfRangeError`` for layers, ``FeatureOutOfRangeError`` for features, else ``IndexOutOfRangeError``).
    Every range is checked from its ends before it is expanded.
    """
    if all_word is not None and isinstance(spec, str) and spec.strip() == all_word:
        return list(range(size))
    ranges = parse_ranges(spec, what=what, option=option)
    for _, last in ranges:
        if last >= size:
            raise out_of_range(what, last, size, subject)
    return sorted({i for first, last in ranges for i in range(first, last + 1)})


def check_count(value: object, what: str, low: int, high: int) -> int:
    """A whole number in ``low..high`` (batch sizes, top-k, new tokens), else ``IndexSpecError`` saying the range.

    Accepts ints and integral floats (a web form sends ``5.0``); refuses bools, NaN, infinities and fractions.
    """
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
            and value == int(value) and low <= value <= high:
        return int(value)
    shown = value if not isinstance(value, str) else value[:40]
    raise IndexSpecError(f"{what} {shown!r} cannot be used; pass a whole number in {low}..{high}")
