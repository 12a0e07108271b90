"""Markdown and plots of the recipe reports, apart from the methods that compute them.

    >>> write_report(evaluate(model, tok, saes, splits), "toxicity-report")      # a ToxicityReport
    >>> write_report(redundancy_report(footprints), "redundancy-report")          # a RedundancyReport
    >>> write_report(evaluate_saes(model, tok, texts, saes), "quality-report")    # a QualityReport
    >>> again = ToxicityReport.from_json(json.loads(Path("toxicity-report/report.json").read_text()))

Each folder gets ``report.json`` (every number; ``from_json`` reads it back), ``report.md`` and PNGs. The markdown
is rendered from the typed report, so a report read back from ``report.json`` renders the same text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from qscope_plugin.recipes._json import finite_json
from qscope_plugin.recipes.classifiers import Scores
from qscope_plugin.recipes.quality import QualityReport
from qscope_plugin.recipes.redundancy import Matrix, RedundancyReport
from qscope_plugin.recipes.toxicity import Grid, ToxicityReport


def write_report(report: ToxicityReport | RedundancyReport | QualityReport, out_dir: str | Path) -> list[Path]:
    """``report.json``, ``report.md`` and the report's PNGs in ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(report, ToxicityReport):
        markdown, images = toxicity_markdown(report), _toxicity_plots(report, out)
    elif isinstance(report, RedundancyReport):
        markdown, images = redundancy_markdown(report), _redundancy_plots(report, out)
    elif isinstance(report, QualityReport):
        markdown, images = quality_markdown(report), _quality_plots(report, out)
    else:
        raise TypeError(f"write_report takes a ToxicityReport, a RedundancyReport or a QualityReport, not "
                        f"{type(report).__name__}; build one with toxicity.evaluate, redundancy.redundancy_report "
                        "or quality.evaluate_saes")
    text = json.dumps(finite_json(report.to_json()), indent=2, ensure_ascii=False, allow_nan=False)
    (out / "report.json").write_text(text + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown, encoding="utf-8")
    return [out / "report.json", out / "report.md", *images]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------ toxicity (§5)


def _prf_cell(s: Scores) -> str:
    return f"{s.precision:.3f} / {s.recall:.3f} / {s.f1:.3f}"


def _grid_rows(name: str, grid: Grid) -> list[str]:
    """One row per layer: ``P / R / F1`` for every K."""
    return [f"| {name} | {layer} | " + " | ".join(_prf_cell(s) for s in per_k.values()) + " |"
            for layer, per_k in grid.items()]


def _toxicity_plots(report: ToxicityReport, out: Path) -> list[Path]:
    """F1 vs layer per K for each language; cross-lingual Jaccard at the first language's ℓ*."""
    plt = _pyplot()
    langs = list(report.languages)
    fig, axes = plt.subplots(1, len(langs), figsize=(4 * len(langs), 3), squeeze=False)
    for ax, lang in zip(axes[0], langs, strict=True):
        grid = report.languages[lang].grid
        layers = sorted(grid)
        for k in report.ks:
            ax.plot(layers, [grid[layer][k].f1 for layer in layers], marker="o", label=f"K={k}")
        ax.set_title(f"{lang}: held-out F1 by layer")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "f1_by_layer.png", dpi=110)
    plt.close(fig)

    star = report.languages[langs[0]].selected_layer
    matrix = np.array([[report.jaccard[star][a][b] for b in langs] for a in langs])
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(langs), 1 + 0.6 * len(langs)))
    ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_yticks(range(len(langs)), langs)
    ax.set_title(f"Jaccard of top-{report.jaccard_top_k} sets, layer {star}")
    fig.tight_layout()
    fig.savefig(out / "jaccard.png", dpi=110)
    plt.close(fig)
    return [out / "f1_by_layer.png", out / "jaccard.png"]


def toxicity_markdown(report: ToxicityReport) -> str:
    macro, langs = report.macro, list(report.languages)
    lines = ["# OR-rule classifier report", "", f"Macro-average best-over-layers F1: {report.macro_best_f1:.3f}",
             "", "Macro-average at ℓ* (precision / recall / F1): "
             + "; ".join(f"K={k}: {_prf_cell(s)}" for k, s in macro.selected_layer.items()),
             "", f"Macro-average multi-layer (precision / recall / F1): {_prf_cell(macro.multi_layer)}",
             "", "| language | ℓ* (top1-diff) | F1 at ℓ* by K | best F1 | multi-layer F1 (layers) |",
             "|---|---|---|---|---|"]
    for lang, r in report.languages.items():
        by_k = ", ".join(f"K={k}: {s.f1:.3f}" for k, s in r.selected_layer_scores.items())
        lines.append(f"| {lang} | {r.selected_layer} | {by_k} | {r.best_layer_f1:.3f} | "
                     f"{r.multi_layer.f1:.3f} ({', '.join(map(str, r.multi_layers))}) |")
    lines += ["", "Precision / recall / F1 by layer and K (held-out; macro = unweighted mean over languages):", "",
              "| language | layer | " + " | ".join(f"K={k} P / R / F1" for k in report.ks) + " |",
              "|---|---|" + "---|" * len(report.ks)]
    lines += _grid_rows("macro", macro.grid)
    for lang, r in report.languages.items():
        lines += _grid_rows(lang, r.grid)
    lines += ["", f"Cross-lingual transfer (discover on row, test on column, top-{report.transfer_k} at ℓ*), F1:",
              "", "| from \\ to | " + " | ".join(langs) + " |", "|---" * (len(langs) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(f"{report.transfer[a][b].f1:.3f}" for b in langs) + " |" for a in langs]
    lines += ["", "Data efficiency (share of the discovery split, balanced, seeded repeats):", "",
              "| fraction | macro best F1 | relative |", "|---|---|---|"]
    lines += [f"| {f} | {e.macro_best_f1:.3f} | {e.relative:.3f} |" for f, e in sorted(report.data_efficiency.items())]
    lines += ["", "![F1 by layer](f1_by_layer.png)", "", "![Jaccard](jaccard.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- redundancy (§4)


def _redundancy_plots(report: RedundancyReport, out: Path) -> list[Path]:
    """The overlap heatmap; c_n (and τ_n when there are per-sample scores) against n / N."""
    plt = _pyplot()
    names, values = report.overlap.names, np.array(report.overlap.values, dtype=float)
    size = 1.2 + 0.6 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xlabel("D2 (covering)")
    ax.set_ylabel("D1 (covered)")
    ax.set_title("overlap(D1, D2) = |F(D1) ∩ F(D2)| / |F(D1)|")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "overlap.png", dpi=120)
    plt.close(fig)

    profiles = any(row.tau_profile for row in report.benchmarks.values())
    fig, axes = plt.subplots(1, 2 if profiles else 1, figsize=(11 if profiles else 6, 4), squeeze=False)
    for name, row in report.benchmarks.items():
        axes[0, 0].plot(np.array(row.coverage.n) / row.n_samples, row.coverage.values,
                        label=f"{name} (R̂ {row.feature_redundancy:.3g})")
        if row.tau_profile:
            axes[0, 1].plot(np.array(row.tau_profile.n) / row.n_samples, row.tau_profile.values,
                            label=f"{name} (R {row.performance_redundancy:.3f})")
    axes[0, 0].set(xscale="log", xlabel="subset size n / N", ylabel="c_n (exact)", title="feature coverage c_n")
    axes[0, 0].legend(fontsize=8)
    if profiles:
        axes[0, 1].set(xscale="log", xlabel="subset size n / N", ylabel="τ_n", title="redundancy profile τ_n")
        axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "coverage.png", dpi=120)
    plt.close(fig)
    return [out / "overlap.png", out / "coverage.png"]


def redundancy_markdown(report: RedundancyReport) -> str:
    lines = ["# Benchmark redundancy (Qwen-Scope report §4)", "",
             "| benchmark | N | \\|F(D)\\| | R̂(D) | n for 90% coverage | R(D) |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in report.benchmarks.items():
        perf = row.performance_redundancy
        lines.append(f"| {name} | {row.n_samples} | {row.footprint_size} | {row.feature_redundancy:.4g} | "
                     f"{row.samples_for_90pct_coverage} | {'' if perf is None else f'{perf:.3f}'} |")
    if report.spearman_r_vs_rhat:
        lines += ["", f"Spearman ρ(R, R̂) over {len(report.spearman_r_vs_rhat.benchmarks)} benchmarks: "
                      f"{report.spearman_r_vs_rhat.rho:.3f}"]
    lines += ["", "## overlap(D1, D2) (row D1 covered by column D2)", "", "![overlap](overlap.png)", "",
              _md_matrix(report.overlap), "", "## overlap_min", "", _md_matrix(report.overlap_min)]
    matrices: Mapping[str, Matrix | None] = {
        "Pearson ρ of scores over the model panel (R13)": report.pearson,
        f"partial ρ given {report.settings.reference} (R14)": report.partial_pearson}
    for title, matrix in matrices.items():
        if matrix:
            lines += ["", f"## {title}", "", _md_matrix(matrix)]
    pairs = {"overlap min vs pearson": report.overlap_min_vs_pearson,
             "overlap min vs partial pearson": report.overlap_min_vs_partial_pearson}
    for title, pair in pairs.items():
        if pair and pair.pearson is not None:
            lines.append(f"\n{title} over {pair.pairs} pairs: Pearson {pair.pearson:.3f}, "
                         f"Spearman {pair.spearman:.3f}")
    summary = report.summary
    lines += ["", "## Summary", "", f"Rule: {summary.rule}.", ""]
    lines += [f"- drop candidate: **{d.benchmark}** ({d.overlap:.0%} of its footprint is in {d.covered_by})"
              for d in summary.drop_candidates] or ["- no drop candidates"]
    lines += [f"- distinct, keep: **{d.benchmark}** (at most {d.max_overlap:.0%} covered by any other)"
              for d in summary.distinct]
    lines += ["", "![coverage](coverage.png)", ""]
    return "\n".join(lines)


def _md_matrix(matrix: Matrix) -> str:
    rows = ["| | " + " | ".join(matrix.names) + " |", "|---" * (len(matrix.names) + 1) + "|"]
    for name, values in zip(matrix.names, matrix.values, strict=True):
        rows.append(f"| {name} | " + " | ".join("" if v is None else f"{v:.2f}" for v in values) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ SAE quality


def quality_table(report: QualityReport) -> str:
    """One markdown row per layer (also the closing table of docs/quality.md)."""
    lines = ["| layer | tokens | FVU | explained var. | mean L0 | dead | dense | CE clean | CE spliced | CE zero | "
             "KL spliced | KL zero | CE recovered |", "|---:" * 13 + "|"]
    for n, q in sorted(report.layers.items()):
        lines.append(f"| {n} | {q.n_tokens} | {q.fvu:.4f} | {q.explained_variance:.4f} | {q.mean_l0:.1f} | "
                     f"{q.dead_features} ({q.dead_fraction:.1%}) | {q.dense_features} ({q.dense_fraction:.1%}) | "
                     f"{q.ce_clean:.4f} | {q.ce_spliced:.4f} | {q.ce_zero:.4f} | {q.kl_spliced:.4f} | "
                     f"{q.kl_zero:.4f} | {q.ce_loss_recovered:.4f} |")
    return "\n".join(lines)


def quality_markdown(report: QualityReport) -> str:
    where = ", ".join(f"{what} `{name}`" for what, name in (("SAEs", report.release), ("model", report.model))
                      if name)
    return "\n".join([
        "# SAE quality per layer", "",
        f"{report.n_texts} texts (first {report.max_length} tokens each){'; ' + where if where else ''}. Dense: "
        f"fires on more than {report.dense_threshold:.0%} of tokens. CE and KL in nats per predicted token; "
        "CE recovered = (CE zero − CE spliced) / (CE zero − CE clean).", "",
        quality_table(report), "", "![quality by layer](quality.png)", ""])


def _quality_plots(report: QualityReport, out: Path) -> list[Path]:
    """FVU, mean L0 and CE loss recovered against the layer, side by side."""
    plt = _pyplot()
    layers = sorted(report.layers)
    panels = (("FVU", "fvu"), ("mean L0", "mean_l0"), ("CE loss recovered", "ce_loss_recovered"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
    for ax, (title, field) in zip(axes, panels, strict=True):
        ax.plot(layers, [getattr(report.layers[n], field) for n in layers], marker="o")
        ax.set(title=title, xlabel="layer", xticks=layers)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)
    return [out / "quality.png"]
