"""SAE-feature OR-rule classifiers (report §5; toxicity is the first use). No trained weights.

    >>> clf = ORRuleClassifier(model, tok, saes, k_features=5).fit(train_texts, train_labels)
    >>> clf.predict(["you are an idiot", "have a nice day"])          # array([ True, False])
    >>> clf.save("toxicity.json"); ORRuleClassifier.load("toxicity.json", model, tok, saes)

The saved JSON records the backbone (``model``: its ``name_or_path``), the SAE ``release`` (name or folder) and
each used layer's SAE geometry (d_model, d_sae, k), the layers, features, ε, per-feature thresholds, K / m and
provenance; ``load`` refuses SAEs whose release or geometry differ from the saved ones.

Equations (docs/method.md §3.3), with a^{(ℓ)}_{i,t,f} the SAE activation z_f of token t of example i at layer ℓ:

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
import platform
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from qscope_plugin.backends import as_backend
from qscope_plugin.errors import MalformedFileError, QScopeError, QScopeWarning
from qscope_plugin.recipes._harvest import MaxActivations, check_texts, sharded_harvest
from qscope_plugin.sae import QwenScopeSAE

SAVED_FIELDS = ("k_features", "m_layers", "eps", "exclude_first_token", "features", "top1_diff", "provenance",
                "model_id", "release")
"""Constructor fields written to (and restored from) the JSON; ``layers``, ``thresholds`` and ``saes`` are derived."""
FORMAT = "qscope-or-rule/1"
"""Unchanged by the added keys: files written before them still load (their SAEs are then not checked)."""


def _feature_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"feature id {value!r} is not an integer >= 0")
    return value


class ClassifierError(QScopeError, ValueError):
    """Labels, splits or saved classifiers that cannot be used."""


class ClassifierFileError(ClassifierError, MalformedFileError):
    """A saved classifier file that is truncated, damaged or not one (the message names the file)."""


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
    model_id: str | None = None
    """The backbone's ``name_or_path``; filled by ``fit`` when left None."""
    release: str | None = None
    """Release name or SAE folder the SAEs came from (the CLI passes ``--release``); default ``sae.cfg.release``."""

    def _acts(self, texts: Sequence[str]) -> MaxActivations:
        return sharded_harvest(self.model, self.tokenizer, check_texts(texts), self.saes, pooling="max",
                               exclude_first_token=self.exclude_first_token, desc="classifier features")

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
        if self.model_id is None:
            self.model_id = model_name(self.model)
        if self.release is None:
            self.release = next((s.cfg.release for s in self.saes.values() if s.cfg.release), None)
        self.provenance = {"release": self.release, "model": self.model_id, "n_examples": len(texts),
                           "n_positive": int(np.sum(np.asarray(labels).astype(bool))),
                           "searched_layers": sorted(acts), "created": datetime.now(UTC).isoformat(
                               timespec="seconds"), **_versions()}
        return self

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        if not self.features:
            raise ClassifierError("the classifier has no features yet; call fit() or load() first")
        return predict_or(self._acts(texts), self.features, self.eps)

    def score(self, texts: Sequence[str], labels: Sequence) -> Scores:
        return prf(labels, self.predict(texts))

    def save(self, path: str | Path) -> None:
        """A small JSON: model, release, SAE geometry, layers, features, ε, thresholds, provenance."""
        if not self.features:
            raise ClassifierError("nothing to save: call fit() first")
        state = {key: getattr(self, key) for key in SAVED_FIELDS}
        state["layers"] = sorted(self.features)
        state["thresholds"] = {layer: [self.eps] * len(feats) for layer, feats in self.features.items()}
        state["saes"] = {layer: sae_signature(self.saes[layer]) for layer in sorted(self.features)}
        Path(path).write_text(json.dumps({"format": FORMAT, **state}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, model: object, tokenizer, saes: Mapping[int, QwenScopeSAE]) -> ORRuleClassifier:
        """Restore a saved classifier onto ``model`` and ``saes``; refuses SAEs other than the saved ones."""
        expected = f"the JSON ORRuleClassifier.save / `qscope classify fit` writes (format {FORMAT!r})"
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ClassifierFileError(f"{str(path)!r} is not a saved qscope OR-rule classifier ({e}); expected "
                                      f"{expected}") from None
        if not isinstance(state, dict) or state.pop("format", None) != FORMAT:
            raise ClassifierFileError(f"{str(path)!r} is not a saved qscope OR-rule classifier; expected {expected}")
        try:
            features = {int(layer): [_feature_id(f) for f in feats] for layer, feats in state["features"].items()}
            state["eps"] = float(state.get("eps", 0.0))
            saved_saes = {int(layer): dict(saved) for layer, saved in state.get("saes", {}).items()}
            per_layer = {int(layer): [float(t) for t in ts] for layer, ts in state.get("thresholds", {}).items()}
            state["top1_diff"] = {int(layer): float(d) for layer, d in state.get("top1_diff", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ClassifierFileError(f"{str(path)!r} is a damaged classifier file ({type(e).__name__}: {e}); "
                                      f"expected {expected}") from None
        missing = sorted(set(features) - set(saes))
        if missing:
            raise ClassifierError(f"the classifier uses layers {missing}; pass SAEs for them"
                                  + (f" (release {state['release']!r})" if state.get("release") else ""))
        for layer, feats in features.items():
            if any(f >= saes[layer].cfg.d_sae for f in feats):
                raise ClassifierFileError(f"{str(path)!r} uses feature {max(feats)} of layer {layer}, whose SAE has "
                                          f"{saes[layer].cfg.d_sae} features; expected {expected}")
        for layer, saved in saved_saes.items():
            if layer not in saes:
                raise ClassifierFileError(f"{str(path)!r} records an SAE for layer {layer}, which it uses no "
                                          f"feature of; expected {expected}")
            _check_sae(layer, saved, saes[layer], state.get("release"))
        for layer, thresholds in per_layer.items():
            if any(t != state["eps"] for t in thresholds):
                raise ClassifierError(f"layer {layer} has per-feature thresholds {thresholds}; this version applies "
                                      f"one threshold ε = {state['eps']} to every feature. Set them all to ε")
        saved_model, ours = state.get("model_id"), model_name(model)
        if saved_model and ours and saved_model != ours:
            warnings.warn(f"the classifier was fitted on model {saved_model!r}; running it on {ours!r}",
                          QScopeWarning, stacklevel=2)
        kept = {key: state[key] for key in SAVED_FIELDS if key in state}
        kept["features"] = features
        kept["top1_diff"] = state["top1_diff"]
        return cls(model, tokenizer, saes, **kept)


def model_name(model: object) -> str | None:
    """The backbone's ``name_or_path`` (hub id or folder), or None when it has none."""
    try:
        return as_backend(model).name
    except QScopeError:
        return None


def sae_signature(sae: QwenScopeSAE) -> dict:
    """What must match between the SAEs a classifier was fitted on and the ones it runs on."""
    c = sae.cfg
    return {"release": c.release, "d_model": c.d_model, "d_sae": c.d_sae, "k": c.k}


def _describe(sig: Mapping) -> str:
    return f"release {sig.get('release')!r} (d_model={sig.get('d_model')}, d_sae={sig.get('d_sae')}, k={sig.get('k')})"


def _check_sae(layer: int, saved: Mapping, sae: QwenScopeSAE, release: str | None) -> None:
    got = sae_signature(sae)
    differs = any(saved.get(key) != got[key] for key in ("d_model", "d_sae", "k"))
    differs |= bool(saved.get("release") and got["release"] and saved["release"] != got["release"])
    if differs:
        raise ClassifierError(
            f"layer {layer}: the classifier was fitted on SAEs of {_describe(saved)} but got {_describe(got)}; "
            f"pass the SAEs it was fitted on" + (f" (release {release!r})" if release else ""))


def _versions() -> dict:
    import transformers

    from qscope_plugin import __version__

    return {"qscope_plugin": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
