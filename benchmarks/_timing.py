"""Timing shared by the benchmark scripts (imported as ``_timing``: the script's folder is on ``sys.path``)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def best_of_interleaved(runs: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Best time of each run, the runs taking turns so that machine drift hits them alike; each starts after a
    full garbage collection, so that one run's garbage is not collected on the next one's clock."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            gc.collect()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def publish(text: str, doc: str) -> Path:
    """Print a benchmark's markdown and write it to ``docs/<doc>`` (the file the README links)."""
    print(text)
    out = DOCS / doc
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return out
