"""Multilingual toxicity with OR-rule classifiers (report §5): data, splits, evaluation, transfer, data efficiency.

    >>> splits = load_splits("textdetox/multilingual_toxicity_dataset", languages=["en", "ru"], split_seed=0)
    >>> report = evaluate(model, tok, saes, splits)                  # one harvest per language and split
    >>> report.languages["en"].selected_layer, report.macro.selected_layer[5].f1
    >>> write_report(report, "toxicity-report")                      # recipes.reports: JSON, markdown, PNGs

The report's protocol: per language, a balanced discovery split of 4,000 (2,000 / 2,000) and a balanced
evaluation split of 1,000 (500 / 500); the split seed is not specified in the report, so it is a parameter.
Any dataset with a text and a label column works (anything ``recipes.data.load_tables`` reads).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from qscope_plugin.recipes._harvest import MaxActivations, sharded_harvest
from qscope_plugin.recipes.classifiers import (
    ORRuleClassifier,
    Scores,
    f1_grid,
    feature_deltas,
    jaccard,
    predict_or,
    prf,
    select_layers,
    top_features,
)
from qscope_plugin.recipes.data import DataError, Source, load_table, load_tables
from qscope_plugin.sae import QwenScopeSAE

LANGUAGES = ("en", "ru", "uk", "de", "es", "am", "zh", "ar", "hi", "it", "fr", "tt", "ja")
"""The 13 languages of the report's corpus (Dementieva et al. 2024)."""


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
                        f"{len(neg)}; lower n_discovery / n_test (the CLI's --n-discovery / --n-test)")
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


def pool_splits(splits: Mapping[str, Split]) -> Split:
    """Every language's discovery and test examples as one split: one classifier serves all the languages."""
    if not splits:
        raise DataError("no splits to pool; load_splits returns one per language")
    parts = list(splits.values())
    return Split([t for s in parts for t in s.discovery_texts], np.concatenate([s.discovery_labels for s in parts]),
                 [t for s in parts for t in s.test_texts], np.concatenate([s.test_labels for s in parts]))


def fit_classifier(model: object, tokenizer, saes: Mapping[int, QwenScopeSAE], splits: Mapping[str, Split], *,
                   release: str | None = None, k_features: int = 5, m_layers: int = 1,
                   eps: float = 0.0) -> tuple[ORRuleClassifier, Scores]:
    """One OR-rule classifier for all languages of ``splits`` (``qscope classify fit``): fitted on the pooled
    discovery examples, scored on the pooled test examples, which it never saw."""
    pooled = pool_splits(splits)
    clf = ORRuleClassifier(model, tokenizer, saes, release=release, k_features=k_features, m_layers=m_layers,
                           eps=eps).fit(pooled.discovery_texts, pooled.discovery_labels)
    return clf, clf.score(pooled.test_texts, pooled.test_labels)


@dataclass
class Harvest:
    """Max activations of one language's splits: every statistic below reuses them without the model."""

    discovery: MaxActivations
    y_discovery: np.ndarray
    test: MaxActivations
    y_test: np.ndarray


def harvest_splits(model: object, tokenizer, saes: Mapping[int, QwenScopeSAE], splits: Mapping[str, Split], *,
                   batch_size: int = 16, max_length: int | None = 512, exclude_first_token: bool = False,
                   progress: bool = False) -> dict[str, Harvest]:
    """Max activations (R15) of every language's discovery and test split, one shared harvest each."""
    out = {}
    for lang, s in splits.items():
        kw = dict(pooling="max", batch_size=batch_size, max_length=max_length,
                  exclude_first_token=exclude_first_token, progress=progress)
        out[lang] = Harvest(
            sharded_harvest(model, tokenizer, s.discovery_texts, saes, desc=f"{lang} discovery", **kw),
            s.discovery_labels, sharded_harvest(model, tokenizer, s.test_texts, saes, desc=f"{lang} test", **kw),
            s.test_labels)
    return out


def _subsample(h: Harvest, fraction: float, rng: np.random.Generator) -> tuple[MaxActivations, np.ndarray]:
    """A balanced ``fraction`` of the discovery split (same share of each class)."""
    keep = np.concatenate([rng.permutation(np.flatnonzero(h.y_discovery == c))[: max(1, int(fraction * n))]
                           for c in (True, False) for n in [int((h.y_discovery == c).sum())]])
    return {layer: a[keep] for layer, a in h.discovery.items()}, h.y_discovery[keep]


def best_f1(train: MaxActivations, y_train: np.ndarray, h: Harvest, ks: Sequence[int], eps: float) -> float:
    grid = f1_grid(train, y_train, h.test, h.y_test, ks=ks, eps=eps)
    return max(s.f1 for per_k in grid.values() for s in per_k.values())


Grid = dict[int, dict[int, Scores]]
"""Held-out precision / recall / F1 by layer and K: ``grid[layer][k]``."""


def _scores(s: Sequence[float]) -> Scores:
    return Scores(*map(float, s))


def _mean(scores: Sequence[Scores]) -> Scores:
    """Macro average: the unweighted mean over languages of each metric (macro F1 = mean of per-language F1)."""
    return Scores(*(float(np.mean(column)) for column in zip(*scores, strict=True)))


def _grid_json(grid: Grid) -> dict:
    return {str(layer): {str(k): s._asdict() for k, s in per_k.items()} for layer, per_k in grid.items()}


def _grid(data: Mapping) -> Grid:
    return {int(layer): {int(k): Scores(**s) for k, s in per_k.items()} for layer, per_k in data.items()}


@dataclass(frozen=True)
class LanguageResult:
    """One language's single-layer grid, ℓ* and multi-layer composition."""

    grid: Grid
    top1_diff: dict[int, float]
    """max_f Δ_f per layer on the discovery split (R19)."""
    selected_layer: int
    """ℓ*: the layer with the largest top1-diff."""
    multi_layers: list[int]
    """The ``m_layers`` best layers by top1-diff, composed with their top-1 feature each (R20)."""
    multi_layer: Scores

    @property
    def selected_layer_scores(self) -> dict[int, Scores]:
        """``{K: scores}`` at ℓ*."""
        return self.grid[self.selected_layer]

    @property
    def best_layer_f1(self) -> float:
        """The best held-out F1 over every layer and K (an oracle bound: ℓ* is chosen without test data)."""
        return max(s.f1 for per_k in self.grid.values() for s in per_k.values())

    def to_json(self) -> dict:
        return {"grid": _grid_json(self.grid), "top1_diff": {str(n): v for n, v in self.top1_diff.items()},
                "selected_layer": self.selected_layer, "multi_layers": self.multi_layers,
                "multi_layer": self.multi_layer._asdict()}

    @classmethod
    def from_json(cls, data: Mapping) -> LanguageResult:
        return cls(_grid(data["grid"]), {int(n): v for n, v in data["top1_diff"].items()}, data["selected_layer"],
                   list(data["multi_layers"]), Scores(**data["multi_layer"]))


@dataclass(frozen=True)
class MacroResult:
    """Unweighted means over languages."""

    grid: Grid
    selected_layer: dict[int, Scores]
    """``{K: scores}``, each language at its own ℓ*."""
    multi_layer: Scores

    def to_json(self) -> dict:
        return {"grid": _grid_json(self.grid), "selected_layer": {str(k): s._asdict() for k, s in
                                                                  self.selected_layer.items()},
                "multi_layer": self.multi_layer._asdict()}

    @classmethod
    def from_json(cls, data: Mapping) -> MacroResult:
        return cls(_grid(data["grid"]), {int(k): Scores(**s) for k, s in data["selected_layer"].items()},
                   Scores(**data["multi_layer"]))


@dataclass(frozen=True)
class Efficiency:
    """Macro best-over-layers F1 when discovering on a share of the discovery split."""

    macro_best_f1: float
    relative: float
    """``macro_best_f1`` over the full split's (NaN when that is 0)."""


@dataclass(frozen=True)
class ToxicityReport:
    """Everything §5 reports; ``write_report`` in ``recipes.reports`` renders it."""

    ks: list[int]
    eps: float
    languages: dict[str, LanguageResult]
    macro: MacroResult
    transfer_k: int
    """Features of the source language's ℓ* applied to the target language."""
    transfer: dict[str, dict[str, Scores]]
    """``transfer[src][dst]``: discovered on ``src``, tested on ``dst``."""
    jaccard_top_k: int
    jaccard: dict[int, dict[str, dict[str, float]]]
    """``jaccard[layer][a][b]``: overlap of the two languages' top-``jaccard_top_k`` features (R21)."""
    data_efficiency: dict[float, Efficiency]
    """By share of the discovery split; 1.0 is the full split."""

    @property
    def macro_best_f1(self) -> float:
        return float(np.mean([r.best_layer_f1 for r in self.languages.values()]))

    def to_json(self) -> dict:
        """Plain JSON types; layer, K and fraction keys become strings (as JSON has them)."""
        return {"ks": self.ks, "eps": self.eps,
                "languages": {lang: r.to_json() for lang, r in self.languages.items()},
                "macro": self.macro.to_json(), "transfer_k": self.transfer_k,
                "transfer": {a: {b: s._asdict() for b, s in row.items()} for a, row in self.transfer.items()},
                "jaccard_top_k": self.jaccard_top_k, "jaccard": {str(n): m for n, m in self.jaccard.items()},
                "data_efficiency": {str(f): asdict(e) for f, e in self.data_efficiency.items()}}

    @classmethod
    def from_json(cls, data: Mapping) -> ToxicityReport:
        """The report back from ``to_json`` output, read through JSON (numeric keys restored)."""
        return cls(list(data["ks"]), data["eps"],
                   {lang: LanguageResult.from_json(r) for lang, r in data["languages"].items()},
                   MacroResult.from_json(data["macro"]), data["transfer_k"],
                   {a: {b: Scores(**s) for b, s in row.items()} for a, row in data["transfer"].items()},
                   data["jaccard_top_k"], {int(n): m for n, m in data["jaccard"].items()},
                   {float(f): Efficiency(**{k: math.nan if v is None else v for k, v in e.items()})
                    for f, e in data["data_efficiency"].items()})


def evaluate(model: object, tokenizer, saes: Mapping[int, QwenScopeSAE], splits: Mapping[str, Split], *,
             ks: Sequence[int] = (1, 2, 5, 10), eps: float = 0.0, m_layers: int = 3, jaccard_k: int = 10,
             transfer_k: int | None = None, fractions: Sequence[float] = (0.1, 0.25, 0.5), repeats: int = 3,
             seed: int = 0, harvests: Mapping[str, Harvest] | None = None, **harvest_options) -> ToxicityReport:
    """Everything §5 reports: per-language precision / recall / F1 grids (layer × K) and their macro averages, ℓ*,
    multi-layer composition, cross-lingual transfer (top-``transfer_k`` features of the source's ℓ*, default
    K = min(ks)) and Jaccard overlap, and the data-efficiency curve.
    """
    hv = dict(harvests) if harvests is not None else harvest_splits(model, tokenizer, saes, splits, **harvest_options)
    transfer_k = min(ks) if transfer_k is None else transfer_k
    deltas = {lang: {layer: feature_deltas(a, h.y_discovery, eps) for layer, a in h.discovery.items()}
              for lang, h in hv.items()}
    languages = {}
    for lang, h in hv.items():
        grid = f1_grid(h.discovery, h.y_discovery, h.test, h.y_test, ks=ks, eps=eps)
        top = select_layers(deltas[lang], m_layers)
        composed = {layer: top_features(deltas[lang][layer], 1) for layer in top}
        languages[lang] = LanguageResult(
            grid={layer: {k: _scores(s) for k, s in per_k.items()} for layer, per_k in grid.items()},
            top1_diff={layer: float(d.max()) for layer, d in deltas[lang].items()},
            selected_layer=select_layers(deltas[lang])[0], multi_layers=top,
            multi_layer=_scores(prf(h.y_test, predict_or(h.test, composed, eps))))
    layers = list(next(iter(deltas.values())))
    per_lang = list(languages.values())
    macro = MacroResult(
        grid={layer: {k: _mean([r.grid[layer][k] for r in per_lang]) for k in ks} for layer in layers},
        selected_layer={k: _mean([r.selected_layer_scores[k] for r in per_lang]) for k in ks},
        multi_layer=_mean([r.multi_layer for r in per_lang]))
    transfer = {}
    for src in hv:
        star = languages[src].selected_layer
        feats = top_features(deltas[src][star], transfer_k)
        transfer[src] = {dst: _scores(prf(h.y_test, predict_or(h.test, {star: feats}, eps))) for dst, h in hv.items()}
    overlap = {layer: {a: {b: jaccard(top_features(deltas[a][layer], jaccard_k), top_features(deltas[b][layer],
                                                                                               jaccard_k))
                           for b in hv} for a in hv} for layer in layers}
    rng = np.random.default_rng(seed)
    full = float(np.mean([r.best_layer_f1 for r in per_lang]))
    efficiency = {}
    for fraction in fractions:
        runs = [np.mean([best_f1(*_subsample(h, fraction, rng), h, ks, eps) for h in hv.values()])
                for _ in range(repeats)]
        relative = float(np.mean(runs) / full) if full > 0 else float("nan")
        efficiency[float(fraction)] = Efficiency(float(np.mean(runs)), relative)
    efficiency[1.0] = Efficiency(full, 1.0)
    return ToxicityReport(list(ks), eps, languages, macro, transfer_k, transfer, jaccard_k, overlap, efficiency)
