"""Multilingual toxicity with OR-rule classifiers (report §5): data, splits, evaluation, transfer, data efficiency.

    >>> splits = load_splits("textdetox/multilingual_toxicity_dataset", languages=["en", "ru"], split_seed=0)
    >>> report = evaluate(model, tok, saes, splits)                  # one harvest per language and split
    >>> write_report(report, "toxicity-report")                      # report.json, report.md, PNGs

The report's protocol: per language, a balanced discovery split of 4,000 (2,000 / 2,000) and a balanced
evaluation split of 1,000 (500 / 500); the split seed is not specified in the report, so it is a parameter.
Any dataset with a text and a label column works (anything ``recipes.data.load_tables`` reads).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qscope_plugin.recipes.classifiers import (
    MaxActivations,
    Scores,
    f1_grid,
    feature_deltas,
    jaccard,
    max_activations,
    predict_or,
    prf,
    select_layers,
    top_features,
)
from qscope_plugin.recipes.data import DataError, Source, load_table, load_tables
from qscope_plugin.sae import QwenScopeSAE

LANGUAGES = ("en", "ru", "uk", "de", "es", "am", "zh", "ar", "hi", "it", "fr", "tt", "ja")
"""The 13 languages of the report's corpus (Dementieva et al. 2024)."""
METRICS = ("precision", "recall", "f1")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


@dataclass(frozen=True)
class Split:
    discovery_texts: list[str]
    discovery_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray


def balanced_split(texts: Sequence[str], labels: Sequence, n_discovery: int, n_test: int, seed: int) -> Split:
    """Disjoint balanced discovery / test splits, seeded (the report: 4,000 and 1,000 per language)."""
    y = np.asarray(labels).astype(bool)
    rng = np.random.default_rng(seed)
    pos, neg = rng.permutation(np.flatnonzero(y)), rng.permutation(np.flatnonzero(~y))
    need = (n_discovery + n_test) // 2
    if min(len(pos), len(neg)) < need:
        raise DataError(f"need {need} positive and {need} negative examples for the split, have {len(pos)} and "
                        f"{len(neg)}; lower n_discovery / n_test")
    d, t = n_discovery // 2, n_test // 2
    disc = np.concatenate([pos[:d], neg[:d]])
    test = np.concatenate([pos[d : d + t], neg[d : d + t]])
    return Split([texts[i] for i in disc], y[disc], [texts[i] for i in test], y[test])


def load_splits(source: Source, languages: Sequence[str] | None = None, *, text_column: str = "text",
                label_column: str = "toxic", language_column: str | None = None, n_discovery: int = 4000,
                n_test: int = 1000, split_seed: int = 0, revision: str | None = None) -> dict[str, Split]:
    """Per-language balanced splits from the ``textdetox/multilingual_toxicity_dataset`` layout (one split per
    language, columns ``text`` and ``toxic``) or any labelled dataset (``language_column`` for a single table)."""
    if language_column:
        table = load_table(source, revision=revision)
        if language_column not in table.column_names:
            raise DataError(f"{source!r} has no column {language_column!r}; columns: {table.column_names}")
        tables = {lang: table.filter(lambda row, lang=lang: row[language_column] == lang)
                  for lang in sorted(set(table[language_column]))}
    else:
        tables = load_tables(source, revision=revision)
    wanted = list(languages) if languages else sorted(tables)
    missing = [lang for lang in wanted if lang not in tables]
    if missing:
        raise DataError(f"languages {missing} are not in {source!r}; it has {sorted(tables)}")
    splits = {}
    for lang in wanted:
        table = tables[lang]
        for column in (text_column, label_column):
            if column not in table.column_names:
                raise DataError(f"{source!r} [{lang}] has no column {column!r}; columns: {table.column_names}")
        splits[lang] = balanced_split(table[text_column], table[label_column], n_discovery, n_test, split_seed)
    return splits


@dataclass
class Harvest:
    """Max activations of one language's splits: every statistic below reuses them without the model."""

    discovery: MaxActivations
    y_discovery: np.ndarray
    test: MaxActivations
    y_test: np.ndarray


def harvest(model: object, tokenizer, saes: Mapping[int, QwenScopeSAE], splits: Mapping[str, Split], *,
            batch_size: int = 16, max_length: int | None = 512, exclude_first_token: bool = False,
            progress: bool = False) -> dict[str, Harvest]:
    out = {}
    for lang, s in splits.items():
        kw = dict(batch_size=batch_size, max_length=max_length, exclude_first_token=exclude_first_token,
                  progress=progress)
        out[lang] = Harvest(max_activations(model, tokenizer, s.discovery_texts, saes, **kw), s.discovery_labels,
                            max_activations(model, tokenizer, s.test_texts, saes, **kw), s.test_labels)
    return out


def _subsample(h: Harvest, fraction: float, rng: np.random.Generator) -> tuple[MaxActivations, np.ndarray]:
    """A balanced ``fraction`` of the discovery split (same share of each class)."""
    keep = np.concatenate([rng.permutation(np.flatnonzero(h.y_discovery == c))[: max(1, int(fraction * n))]
                           for c in (True, False) for n in [int((h.y_discovery == c).sum())]])
    return {layer: a[keep] for layer, a in h.discovery.items()}, h.y_discovery[keep]


def best_f1(train: MaxActivations, y_train: np.ndarray, h: Harvest, ks: Sequence[int], eps: float) -> float:
    grid = f1_grid(train, y_train, h.test, h.y_test, ks=ks, eps=eps)
    return max(s.f1 for per_k in grid.values() for s in per_k.values())


def _as_dict(s: Scores) -> dict[str, float]:
    return {"precision": float(s.precision), "recall": float(s.recall), "f1": float(s.f1)}


def _mean(scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Macro average: the unweighted mean over languages of each metric (macro F1 = mean of per-language F1)."""
    return {metric: float(np.mean([s[metric] for s in scores])) for metric in METRICS}


def evaluate(model: object, tokenizer, saes: Mapping[int, QwenScopeSAE], splits: Mapping[str, Split], *,
             ks: Sequence[int] = (1, 2, 5, 10), eps: float = 0.0, m_layers: int = 3, jaccard_k: int = 10,
             transfer_k: int | None = None, fractions: Sequence[float] = (0.1, 0.25, 0.5), repeats: int = 3,
             seed: int = 0, harvests: Mapping[str, Harvest] | None = None, **harvest_options) -> dict:
    """Everything §5 reports, as one JSON-able dict: per-language precision / recall / F1 grids (layer × K) and
    their macro averages, ℓ*, multi-layer composition, cross-lingual transfer (top-``transfer_k`` features of the
    source's ℓ*, default K = min(ks)) and Jaccard overlap, and the data-efficiency curve.

    Per language: ``precision``, ``recall``, ``f1`` are ``{layer: {K: value}}``; ``selected_layer_scores`` is
    ``{K: {precision, recall, f1}}`` at ℓ*. ``macro``: the three grids averaged over languages, ``selected_layer``
    (``{K: scores}``, each language at its own ℓ*) and ``multi_layer``. ``transfer``: ``{src: {dst: scores}}``.
    """
    hv = dict(harvests) if harvests is not None else harvest(model, tokenizer, saes, splits, **harvest_options)
    transfer_k = min(ks) if transfer_k is None else transfer_k
    deltas = {lang: {layer: feature_deltas(a, h.y_discovery, eps) for layer, a in h.discovery.items()}
              for lang, h in hv.items()}
    languages = {}
    for lang, h in hv.items():
        grid = f1_grid(h.discovery, h.y_discovery, h.test, h.y_test, ks=ks, eps=eps)
        star = select_layers(deltas[lang])[0]
        top = select_layers(deltas[lang], m_layers)
        composed = {layer: top_features(deltas[lang][layer], 1) for layer in top}
        multi = prf(h.y_test, predict_or(h.test, composed, eps))
        languages[lang] = {
            **{metric: {layer: {k: float(getattr(s, metric)) for k, s in per_k.items()}
                        for layer, per_k in grid.items()} for metric in METRICS},
            "top1_diff": {layer: float(d.max()) for layer, d in deltas[lang].items()},
            "selected_layer": star,
            "selected_layer_f1": {k: grid[star][k].f1 for k in ks},
            "selected_layer_scores": {k: _as_dict(grid[star][k]) for k in ks},
            "best_layer_f1": max(s.f1 for per_k in grid.values() for s in per_k.values()),
            "multi_layer": {"layers": top, **_as_dict(multi)},
        }
    layers = list(next(iter(deltas.values())))
    per_lang = languages.values()
    macro = {
        **{metric: {layer: {k: float(np.mean([r[metric][layer][k] for r in per_lang])) for k in ks}
                    for layer in layers} for metric in METRICS},
        "selected_layer": {k: _mean([r["selected_layer_scores"][k] for r in per_lang]) for k in ks},
        "multi_layer": _mean([r["multi_layer"] for r in per_lang]),
    }
    transfer = {}
    for src in hv:
        star = languages[src]["selected_layer"]
        feats = top_features(deltas[src][star], transfer_k)
        transfer[src] = {dst: _as_dict(prf(h.y_test, predict_or(h.test, {star: feats}, eps))) for dst, h in hv.items()}
    overlap = {layer: {a: {b: jaccard(top_features(deltas[a][layer], jaccard_k), top_features(deltas[b][layer],
                                                                                               jaccard_k))
                           for b in hv} for a in hv} for layer in layers}
    rng = np.random.default_rng(seed)
    full = np.mean([languages[lang]["best_layer_f1"] for lang in hv])
    efficiency = {}
    for fraction in fractions:
        runs = [np.mean([best_f1(*_subsample(h, fraction, rng), h, ks, eps) for h in hv.values()])
                for _ in range(repeats)]
        relative = float(np.mean(runs) / full) if full > 0 else float("nan")
        efficiency[fraction] = {"macro_best_f1": float(np.mean(runs)), "relative": relative}
    efficiency[1.0] = {"macro_best_f1": float(full), "relative": 1.0}
    return {"ks": list(ks), "eps": eps, "languages": languages, "macro": macro, "transfer_k": transfer_k,
            "transfer_f1": {a: {b: s["f1"] for b, s in row.items()} for a, row in transfer.items()},
            "transfer": transfer, "jaccard_top_k": jaccard_k, "jaccard": overlap, "data_efficiency": efficiency,
            "macro_best_f1": float(full)}


def _prf_cell(s: Mapping[str, float]) -> str:
    return f"{s['precision']:.3f} / {s['recall']:.3f} / {s['f1']:.3f}"


def _grid_rows(name: str, r: Mapping) -> list[str]:
    """One row per layer: ``P / R / F1`` for every K (keys as stored, so a report read back from JSON works too)."""
    rows = []
    for layer, per_k in r["f1"].items():
        cells = [_prf_cell({m: r[m][layer][k] for m in METRICS}) for k in per_k]
        rows.append(f"| {name} | {layer} | " + " | ".join(cells) + " |")
    return rows


def _numeric_keys(obj):
    """Dict keys such as ``"14"`` / ``"0.5"`` (JSON's) back to ``14`` / ``0.5``, recursively; other keys unchanged."""
    if isinstance(obj, dict):
        return {(float(k) if "." in k else int(k)) if isinstance(k, str) and _NUMBER.fullmatch(k) else k:
                _numeric_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numeric_keys(v) for v in obj]
    return obj


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """``report.json``, ``report.md`` and two PNGs (F1 vs layer per K; cross-lingual Jaccard at ℓ*)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    report = _numeric_keys(report)  # a report read back from report.json has string layer / K keys
    langs = list(report["languages"])
    fig, axes = plt.subplots(1, len(langs), figsize=(4 * len(langs), 3), squeeze=False)
    for ax, lang in zip(axes[0], langs, strict=True):
        f1 = report["languages"][lang]["f1"]
        layers = sorted(f1)
        for k in report["ks"]:
            ax.plot(layers, [f1[layer][k] for layer in layers], marker="o", label=f"K={k}")
        ax.set_title(f"{lang}: held-out F1 by layer")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "f1_by_layer.png", dpi=110)
    plt.close(fig)

    star = report["languages"][langs[0]]["selected_layer"]
    matrix = np.array([[report["jaccard"][star][a][b] for b in langs] for a in langs])
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(langs), 1 + 0.6 * len(langs)))
    ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_yticks(range(len(langs)), langs)
    ax.set_title(f"Jaccard of top-{report['jaccard_top_k']} sets, layer {star}")
    fig.tight_layout()
    fig.savefig(out / "jaccard.png", dpi=110)
    plt.close(fig)

    macro = report.get("macro")
    lines = ["# OR-rule classifier report", "", f"Macro-average best-over-layers F1: {report['macro_best_f1']:.3f}"]
    if macro:
        lines += ["", "Macro-average at ℓ* (precision / recall / F1): "
                  + "; ".join(f"K={k}: {_prf_cell(s)}" for k, s in macro["selected_layer"].items()),
                  "", f"Macro-average multi-layer (precision / recall / F1): {_prf_cell(macro['multi_layer'])}"]
    lines += ["", "| language | ℓ* (top1-diff) | F1 at ℓ* by K | best F1 | multi-layer F1 (layers) |",
              "|---|---|---|---|---|"]
    for lang, r in report["languages"].items():
        by_k = ", ".join(f"K={k}: {f:.3f}" for k, f in r["selected_layer_f1"].items())
        ml = r["multi_layer"]
        lines.append(f"| {lang} | {r['selected_layer']} | {by_k} | {r['best_layer_f1']:.3f} | "
                     f"{ml['f1']:.3f} ({', '.join(map(str, ml['layers']))}) |")
    if macro:
        lines += ["", "Precision / recall / F1 by layer and K (held-out; macro = unweighted mean over languages):", "",
                  "| language | layer | " + " | ".join(f"K={k} P / R / F1" for k in report["ks"]) + " |",
                  "|---|---|" + "---|" * len(report["ks"])]
        lines += _grid_rows("macro", macro)
        for lang, r in report["languages"].items():
            lines += _grid_rows(lang, r)
    k = report.get("transfer_k")
    lines += ["", f"Cross-lingual transfer (discover on row, test on column{f', top-{k} at ℓ*' if k else ''}), F1:",
              "", "| from \\ to | " + " | ".join(langs) + " |", "|---" * (len(langs) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(f"{report['transfer_f1'][a][b]:.3f}" for b in langs) + " |" for a in langs]
    lines += ["", "Data efficiency (share of the discovery split, balanced, seeded repeats):", "",
              "| fraction | macro best F1 | relative |", "|---|---|---|"]
    lines += [f"| {f} | {r['macro_best_f1']:.3f} | {r['relative']:.3f} |"
              for f, r in sorted(report["data_efficiency"].items(), key=lambda kv: float(kv[0]))]
    lines += ["", "![F1 by layer](f1_by_layer.png)", "", "![Jaccard](jaccard.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return [out / name for name in ("report.json", "report.md", "f1_by_layer.png", "jaccard.png")]
