"""SAE-feature OR-rule classifiers (report §5; toxicity is the first use). No trained weights.

    >>> clf = ORRuleClassifier(model, tok, saes, k_features=5).fit(train_texts, train_labels)
    >>> clf.predict(["you are an idiot", "have a nice day"])          # array([ True, False])
    >>> clf.save("toxicity.json"); ORRuleClassifier.load("toxicity.json", model, tok, saes)

Equations (spec §3.3), with a^{(ℓ)}_{i,t,f} the SAE activation z_f of token t of example i at layer ℓ:

    (R15) h_{i,f} = 1[ max_t a_{i,t,f} > ε ]                       example-level firing, ε = 0
    (R16) Δ_f = P(h_f = 1 | positive) − P(h_f = 1 | negative)       on the discovery split
    (R17) S = top-K features by Δ
    (R18) ŷ_i = 1[ max_{f∈S} max_t a_{i,t,f} > ε ]                 OR rule
    (R19) ℓ* = argmax_ℓ max_f Δ^{(ℓ)}_f                             "top1-diff" layer selection, evaluation-free
    (R20) ŷ_i = OR over the m layers with the largest top1-diff of their best feature
    (R21) J(a, b) = |S_a ∩ S_b| / |S_a ∪ S_b|                       cross-lingual overlap of top-K sets

Everything statistical runs on ``MaxActivations``: a sparse (examples × d_sae) matrix of max_t a per layer,
harvested in one forward pass per batch; ε can then be changed without running the model again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from qscope_plugin.errors import QScopeError
from qscope_plugin.recipes._common import check_texts, encode_texts
from qscope_plugin.sae import QwenScopeSAE

MaxActivations = dict[int, sp.csr_matrix]
"""Per layer, a CSR matrix ``(n_examples, d_sae)`` of ``max_t a_{i,t,f}`` (only positive entries stored)."""


SAVED_FIELDS = ("k_features", "m_layers", "eps", "exclude_first_token", "features", "top1_diff", "provenance")


class ClassifierError(QScopeError, ValueError):
    """Labels, splits or saved classifiers that cannot be used."""


def max_activations(model: object, tokenizer, texts: Sequence[str], saes: Mapping[int, QwenScopeSAE], *,
                    exclude_first_token: bool = False, batch_size: int = 16, max_length: int | None = 512,
                    progress: bool = False) -> MaxActivations:
    """(R15)'s max over tokens for every example, feature and layer, in one batched pass; padding is masked.

    ``exclude_first_token`` defaults to False: the report takes the max over all tokens (spec §4 row 7).
    """
    rows: dict[int, list[sp.csr_matrix]] = {layer: [] for layer in saes}
    for codes in encode_texts(model, tokenizer, texts, saes, batch_size=batch_size, max_length=max_length,
                              progress=progress):
        start = int(exclude_first_token)
        for layer, sae in saes.items():
            values = codes.values[layer][start:].flatten().float()
            indices = codes.indices[layer][start:].flatten()
            best = torch.zeros(sae.cfg.d_sae).scatter_reduce_(0, indices, values, reduce="amax")
            nz = best.nonzero().flatten()
            rows[layer].append(sp.csr_matrix((best[nz].numpy(), (np.zeros(len(nz)), nz.numpy())),
                                             shape=(1, sae.cfg.d_sae)))
    return {layer: sp.vstack(r, format="csr") for layer, r in rows.items()}


def _labels(labels: Sequence, n: int) -> np.ndarray:
    y = np.asarray(labels).astype(bool)
    if y.shape != (n,):
        raise ClassifierError(f"got {y.shape[0] if y.ndim else 0} labels for {n} examples; give one label each")
    if y.all() or not y.any():
        raise ClassifierError("discovery needs both positive and negative examples; got only one class")
    return y


def feature_deltas(acts: sp.csr_matrix, labels: Sequence, eps: float = 0.0) -> np.ndarray:
    """(R16) Δ_f for every feature ``(d_sae,)``."""
    y = _labels(labels, acts.shape[0])
    fired = (acts > eps).astype(np.float64)
    return np.asarray(fired[y].mean(axis=0)).ravel() - np.asarray(fired[~y].mean(axis=0)).ravel()


def top_features(delta: np.ndarray, k: int) -> list[int]:
    """(R17) the K features with the largest Δ; ties broken by the lower feature id (stable)."""
    return [int(f) for f in np.argsort(-delta, kind="stable")[:k]]


def predict_or(acts: MaxActivations, features: Mapping[int, Sequence[int]], eps: float = 0.0) -> np.ndarray:
    """(R18) / (R20): positive iff any selected feature of any selected layer fires above ε."""
    n = next(iter(acts.values())).shape[0]
    out = np.zeros(n, dtype=bool)
    for layer, feats in features.items():
        if feats:
            out |= np.asarray((acts[layer][:, list(feats)] > eps).sum(axis=1)).ravel() > 0
    return out


def select_layers(deltas: Mapping[int, np.ndarray], m: int = 1) -> list[int]:
    """(R19) the ``m`` layers with the largest top1-diff max_f Δ_f, best first (m = 1 gives ℓ*)."""
    return sorted(deltas, key=lambda layer: (-float(deltas[layer].max()), layer))[:m]


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """(R21)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


class Scores(NamedTuple):
    precision: float
    recall: float
    f1: float


def prf(y_true: Sequence, y_pred: Sequence) -> Scores:
    """Precision, recall and F1 of the positive class (positive = toxic in the report)."""
    t, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    tp = float((t & p).sum())
    precision = tp / p.sum() if p.any() else 0.0
    recall = tp / t.sum() if t.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Scores(precision, recall, f1)


def f1_grid(train: MaxActivations, y_train: Sequence, test: MaxActivations, y_test: Sequence, *,
            ks: Sequence[int] = (1, 2, 5, 10), eps: float = 0.0) -> dict[int, dict[int, Scores]]:
    """Held-out scores of the single-layer OR rule for every layer and K: ``{layer: {K: Scores}}``."""
    grid = {}
    for layer in train:
        delta = feature_deltas(train[layer], y_train, eps)
        grid[layer] = {k: prf(y_test, predict_or({layer: test[layer]}, {layer: top_features(delta, k)}, eps))
                       for k in ks}
    return grid


@dataclass
class ORRuleClassifier:
    """Estimator-style OR-rule classifier over SAE features of one layer (ℓ*) or the top-m layers (R20)."""

    model: object = field(repr=False)
    tokenizer: object = field(repr=False)
    saes: Mapping[int, QwenScopeSAE] = field(repr=False)
    k_features: int = 5
    """K of (R17) for single-layer use; the report finds little gain beyond a very small K."""
    m_layers: int = 1
    """1: the top-K features of ℓ*; m > 1: the best feature of each of the top-m layers (R20)."""
    eps: float = 0.0
    exclude_first_token: bool = False
    features: dict[int, list[int]] = field(default_factory=dict)
    top1_diff: dict[int, float] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def _acts(self, texts: Sequence[str]) -> MaxActivations:
        return max_activations(self.model, self.tokenizer, check_texts(texts), self.saes,
                               exclude_first_token=self.exclude_first_token)

    def fit(self, texts: Sequence[str], labels: Sequence) -> ORRuleClassifier:
        """Discovery (R15–R17) on every layer of ``saes``, then layer selection (R19/R20)."""
        acts = self._acts(texts)
        deltas = {layer: feature_deltas(a, labels, self.eps) for layer, a in acts.items()}
        self.top1_diff = {layer: float(d.max()) for layer, d in deltas.items()}
        layers = select_layers(deltas, self.m_layers)
        if self.m_layers == 1:
            self.features = {layers[0]: top_features(deltas[layers[0]], self.k_features)}
        else:
            self.features = {layer: top_features(deltas[layer], 1) for layer in layers}
        first = next(iter(self.saes.values())).cfg
        self.provenance = {"release": first.release, "n_examples": len(texts), "n_positive": int(np.sum(labels))}
        return self

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        if not self.features:
            raise ClassifierError("the classifier has no features yet; call fit() or load() first")
        return predict_or(self._acts(texts), self.features, self.eps)

    def score(self, texts: Sequence[str], labels: Sequence) -> Scores:
        return prf(labels, self.predict(texts))

    def save(self, path: str | Path) -> None:
        """A small JSON: release, layers, features, ε, provenance; enough to share and re-run."""
        state = {key: getattr(self, key) for key in SAVED_FIELDS}
        Path(path).write_text(json.dumps({"format": "qscope-or-rule/1", **state}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, model: object, tokenizer, saes: Mapping[int, QwenScopeSAE]) -> ORRuleClassifier:
        state = json.loads(Path(path).read_text())
        if state.pop("format", None) != "qscope-or-rule/1":
            raise ClassifierError(f"{str(path)!r} is not a saved qscope OR-rule classifier")
        state["features"] = {int(layer): feats for layer, feats in state["features"].items()}
        state["top1_diff"] = {int(layer): d for layer, d in state["top1_diff"].items()}
        missing = sorted(set(state["features"]) - set(saes))
        if missing:
            raise ClassifierError(f"the classifier uses layers {missing}; pass SAEs for them")
        return cls(model, tokenizer, saes, **state)
