"""Benchmark of report §4: exact coverage / R̂ at SuperGPQA scale, and footprint-harvest throughput.

    python benchmarks/bench_redundancy.py          # prints a table, writes docs/benchmarks_redundancy.md

1. R̂(D) and c_n for N = 26,529 samples and |F(D)| = 80,000 features (the issue's target: R̂ in < 1 s), next to a
   Monte-Carlo estimate of the same c_n grid (the obvious way to compute R8), whose error the table shows.
2. Harvest throughput of ``harvest_footprints`` (tokenise, batch by length, early-exit forward, encode the last
   token, CSR, checkpoint file) against the bare loop it replaces, measured in the same run, interleaved: the
   prompts pre-tokenised and padded, a full forward with a residual hook, then the SAE encode of every last
   token. Target: ratio >= 0.9.
"""

from __future__ import annotations

import itertools
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import best_of_interleaved

from qscope_plugin.demo.run import SENTENCES
from qscope_plugin.hooks import capture_residual
from qscope_plugin.models import DEMO_MODEL_DIR, load_model
from qscope_plugin.recipes.footprints import harvest_footprints
from qscope_plugin.recipes.redundancy import expected_coverage, feature_redundancy, samples_for_coverage
from qscope_plugin.store import DEMO_RELEASE, DEMO_SAE_DIR, load_sae, local_layers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks_redundancy.md"


def timed(fn, repeats: int = 5) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def coverage_rows() -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(0)
    n_samples, n_features = 26_529, 80_000
    support = np.minimum(np.ceil(rng.pareto(0.8, n_features) * 3).astype(int) + 1, n_samples)
    grid = np.unique(np.round(np.geomspace(1, n_samples, 128)).astype(int))
    t_rhat, rhat = timed(lambda: feature_redundancy(support, n_samples))
    t_grid, c_grid = timed(lambda: expected_coverage(support, n_samples, grid))
    t_all, c_all = timed(lambda: expected_coverage(support, n_samples), repeats=1)
    t_n90, n90 = timed(lambda: samples_for_coverage(support, n_samples, 0.9))
    # Monte Carlo on the same grid, as R8 is usually estimated: draw random n-subsets. Coverage is linear in the
    # features, so drawing, per feature, how many of its m_j samples a random n-subset holds (hypergeometric) is
    # the same estimator without materialising the samples x features matrix.
    draws = 20

    def monte_carlo() -> np.ndarray:
        return np.array([(rng.hypergeometric(support, n_samples - support, n, size=(draws, n_features)) > 0).mean()
                         for n in grid[::8]])

    t_mc, c_mc = timed(monte_carlo, repeats=1)
    err = float(np.abs(c_mc - c_grid[::8]).max())
    return [
        ("R̂(D), closed form (R10a)", f"{t_rhat * 1e3:.1f} ms", f"R̂ = {rhat:.4g}"),
        ("c_n exact on a 128-point grid (R8b)", f"{t_grid * 1e3:.1f} ms", f"c_1 = {c_grid[0]:.4f}"),
        ("c_n exact for every n = 1..N", f"{t_all:.2f} s", f"Σ c_n / |F| = {c_all.sum() / n_features:.4g}"),
        ("smallest n with c_n ≥ 0.9 (bisection)", f"{t_n90 * 1e3:.1f} ms", f"n = {n90}"),
        (f"Monte Carlo, {len(grid[::8])} grid points × {draws} draws", f"{t_mc:.2f} s",
         f"max |MC − exact| = {err:.4f}"),
    ]


@torch.no_grad()
def bare_loop(model, tok, texts: list[str], saes, batch_size: int) -> int:
    """What a user would write: pad, full forward with a hook, encode each row's last token."""
    tok.padding_side = "right"
    active = 0
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        last = enc["attention_mask"].sum(-1) - 1
        with capture_residual(model, list(saes)) as acts:
            model(**enc)
        rows = torch.arange(len(last))
        for n, sae in saes.items():
            values, _ = sae.encode_sparse(acts[n][rows, last])
            active += int((values > 0).sum())
    return active


def harvest_rows(repeats: int = 3) -> list[tuple[str, str, str]]:
    model, tok = load_model(str(DEMO_MODEL_DIR))
    saes = {n: load_sae(DEMO_RELEASE, n) for n in local_layers(DEMO_SAE_DIR)}
    base = SENTENCES["zh"] + SENTENCES["en"]
    texts = [" ".join(base[(i + j) % len(base)] for j in range(1 + i % 6)) for i in range(1024)]
    rows = []
    files = itertools.count()  # a fresh output file per run: an existing one would just be loaded
    with tempfile.TemporaryDirectory() as tmp:
        for label, layers in (("all 4 layers", list(saes)), ("layer 1 only (early exit)", [1])):
            chosen = {n: saes[n] for n in layers}

            def harvest(chosen=chosen) -> None:
                harvest_footprints(model, tok, texts, chosen, batch_size=32, chunk_size=256,
                                   out=Path(tmp) / f"{next(files)}.safetensors", progress=False)

            best = best_of_interleaved(repeats=repeats, runs={
                "bare": lambda chosen=chosen: bare_loop(model, tok, texts, chosen, 32), "harvest": harvest})
            rows.append((f"harvest, demo model, {label}", f"{len(texts) / best['harvest']:.0f} prompts/s",
                         f"bare forward + encode {len(texts) / best['bare']:.0f} prompts/s; "
                         f"ratio {best['bare'] / best['harvest']:.2f}×"))
    return rows


def main() -> None:
    torch.manual_seed(0)
    rows = coverage_rows() + harvest_rows()
    header = "| what | time / throughput | result |\n|---|---:|---|"
    table = "\n".join([header, *(f"| {a} | {b} | {c} |" for a, b, c in rows)])
    print(table)
    env = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
           f"Python {sys.version.split()[0]}, torch {torch.__version__}")
    script = Path(__file__).resolve().relative_to(ROOT)
    OUT.write_text(f"# Benchmark: benchmark redundancy (report §4)\n\nGenerated by `python {script}` on {env}. "
                   f"Harvest: best of interleaved runs; coverage: median of 5.\n\n{table}\n", encoding="utf-8")
    print(f"written to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
