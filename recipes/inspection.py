"""Feature cards: what a feature fires on, how strongly, what it writes to the logits, and whom it fires with.

    >>> cards = feature_cards(model, tok, texts, sae, [12, 40], layer=3)     # or features=None, top=50
    >>> card = cards[0]
    >>> card.density, card.max_activation, card.contexts[0].tokens, card.logit_effects.promoted[0]
    >>> FeatureCard.from_json(card.to_json()) == card

Every card of a call comes from ONE harvest pass over the texts (pooling ``tokens``): all texts' sparse ``(T, k)``
codes are concatenated once, the active entries of the chosen features are grouped with one sort, and each card
is a handful of tensor operations on its group, so 200 cards cost little more than the harvest itself
(``benchmarks/bench_dashboard.py``). See ``docs/dashboard.md`` for how each part is computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from qscope_plugin.backends import as_backend
from qscope_plugin.errors import feature_out_of_range
from qscope_plugin.recipes._harvest import EmptyInputError, HarvestError, TextCodes, check_texts, harvest
from qscope_plugin.sae import QwenScopeSAE


@dataclass(frozen=True)
class Context:
    """A window of one text around the token where the feature peaks in that text."""

    text: int
    """Index of the text in the input."""
    start: int
    """Position in the text of the window's first token."""
    peak: int
    """Index in ``tokens`` of the peak token."""
    tokens: list[str]
    """The window's tokens, each decoded alone."""
    activations: list[float]
    """The feature's activation on each token of the window (0 where it does not fire)."""


@dataclass(frozen=True)
class Histogram:
    """Histogram of the feature's non-zero activations (``numpy.histogram`` with ``n_bins`` equal bins)."""

    edges: list[float]
    counts: list[int]


@dataclass(frozen=True)
class TokenEffect:
    token: str
    token_id: int
    value: float
    """The token's logit in ``W_U · norm_final(d_f)``."""


@dataclass(frozen=True)
class LogitEffects:
    """The tokens the decoder direction promotes (highest logits) and suppresses (lowest), most extreme first."""

    promoted: list[TokenEffect]
    suppressed: list[TokenEffect]


@dataclass(frozen=True)
class Cofiring:
    """Another feature active on the same tokens."""

    feature: int
    count: int
    """Tokens where both fire."""
    jaccard: float
    """``count / (tokens where either fires)``: ranks partners without favouring features that fire everywhere."""


@dataclass(frozen=True)
class FeatureCard:
    """Everything a dashboard shows about one feature of one layer's SAE on a dataset."""

    layer: int
    feature: int
    explanation: str | None
    n_tokens: int
    """Tokens harvested (all texts)."""
    n_firing: int
    """Tokens where the feature fires (z > 0)."""
    density: float
    """``n_firing / n_tokens``."""
    max_activation: float
    mean_activation: float
    """Mean over the tokens where it fires."""
    contexts: list[Context]
    """Top-activating contexts, one per text, strongest peak first."""
    histogram: Histogram
    logit_effects: LogitEffects
    cofiring: list[Cofiring]
    """Most co-firing features, highest Jaccard first."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> FeatureCard:
        effects = data["logit_effects"]
        return cls(**{**data, "contexts": [Context(**c) for c in data["contexts"]],
                      "histogram": Histogram(**data["histogram"]),
                      "logit_effects": LogitEffects([TokenEffect(**e) for e in effects["promoted"]],
                                                    [TokenEffect(**e) for e in effects["suppressed"]]),
                      "cofiring": [Cofiring(**c) for c in data["cofiring"]]})


@dataclass(frozen=True)
class _Corpus:
    """All texts' codes at one layer, concatenated: token row r belongs to text ``text[r]``."""

    token_ids: torch.Tensor  # (N,)
    values: torch.Tensor  # (N, k)
    indices: torch.Tensor  # (N, k)
    text: torch.Tensor  # (N,)
    starts: torch.Tensor  # (n_texts + 1,): text t holds rows starts[t]:starts[t + 1]

    @classmethod
    def concat(cls, codes: list[TextCodes], layer: int) -> _Corpus:
        lengths = torch.tensor([len(c.token_ids) for c in codes])
        return cls(torch.cat([c.token_ids for c in codes]), torch.cat([c.values[layer].float() for c in codes]),
                   torch.cat([c.indices[layer] for c in codes]),
                   torch.repeat_interleave(torch.arange(len(codes)), lengths),
                   torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))


def _chosen(features: Sequence[int] | None, top: int | None, d_sae: int) -> list[int] | None:
    """The features asked for (checked, duplicates dropped), or None when ``top`` picks them after the harvest."""
    if (features is None) == (top is None):
        raise HarvestError("pass either features (a list of feature ids) or top (how many of the densest features)")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise HarvestError(f"top={top!r}; expected a positive number of features")
        return None
    features = list(dict.fromkeys(features))
    if not features:
        raise HarvestError("features is empty; pass at least one feature id, or top=N")
    for f in features:
        if isinstance(f, bool) or not isinstance(f, int | np.integer) or not 0 <= f < d_sae:
            raise feature_out_of_range(f, d_sae)
    return [int(f) for f in features]


@torch.no_grad()
def feature_cards(model: object, tokenizer, texts: Sequence[str], sae: QwenScopeSAE,
                  features: Sequence[int] | None = None, *, layer: int, top: int | None = None,
                  n_contexts: int = 10, window: int = 10, n_bins: int = 30, n_logits: int = 10, n_cofiring: int = 10,
                  explanations: Mapping[int, str] | None = None, batch_size: int = 16, max_length: int | None = 512,
                  progress: bool = True) -> list[FeatureCard]:
    """Cards of ``features`` (or of the ``top`` densest features) of ``sae`` at ``layer``, from one harvest.

    Args:
        model: a transformers model, a TransformerLens bridge, an nnsight model or a ``Backend``.
        texts: the dataset; each text's first ``max_length`` tokens are read.
        features: feature ids, in the order the cards come back; or None with ``top``.
        top: with ``features=None``, the ``top`` features of highest firing density (fraction of tokens where
            z > 0) among those that fire at all, densest first: density is what the data shows most of, and it
            does not single out features with one outlier activation.
        n_contexts: top-activating contexts per card (at most one per text).
        window: tokens kept on each side of a context's peak token.
        n_bins: bins of the activation histogram.
        n_logits: promoted and suppressed tokens per card.
        n_cofiring: co-firing features per card.
        explanations: ``{feature: text}`` shown on the cards (e.g. from the safety-synthesis explainer).

    Raises:
        HarvestError: both or neither of ``features`` / ``top``, an empty ``features``, a bad ``top``.
        FeatureOutOfRangeError: a feature outside ``0..d_sae-1``.
        LayerOutOfRangeError: ``layer`` outside the model.
        EmptyInputError: no texts, or none with a token.
    """
    texts = check_texts(texts)
    backend = as_backend(model)
    backend.check_layers([layer])
    d_sae = sae.cfg.d_sae
    chosen = _chosen(features, top, d_sae)
    codes = harvest(backend, tokenizer, texts, {layer: sae}, pooling="tokens", batch_size=batch_size,
                    max_length=max_length, progress=progress, desc="feature cards")
    corpus = _Corpus.concat(codes, layer)
    n_tokens = len(corpus.token_ids)
    if n_tokens == 0:
        raise EmptyInputError("no text has a token; pass texts the tokenizer turns into at least one token")
    active = corpus.values > 0
    rows, fired, values = active.nonzero()[:, 0], corpus.indices[active], corpus.values[active]
    counts = torch.bincount(fired, minlength=d_sae)  # tokens where each feature fires
    if chosen is None:
        densest = torch.sort(counts, descending=True, stable=True).indices[:top]
        chosen = densest[counts[densest] > 0].tolist()

    slot = torch.full((d_sae,), -1, dtype=torch.long)
    slot[chosen] = torch.arange(len(chosen))
    mine = slot[fired] >= 0
    group, order = torch.sort(slot[fired][mine], stable=True)
    rows, values = rows[mine][order], values[mine][order]
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(group, minlength=len(chosen)).cumsum(0)])

    peaks = [_peaks(corpus, rows[a:b], values[a:b], n_contexts) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    windows = _windows(corpus, chosen, peaks, window)
    promoted, suppressed = _logit_effects(backend, sae, chosen, n_logits)
    names = _token_names(tokenizer, torch.cat([corpus.token_ids[w.clamp(min=0)].flatten() for w, _, _ in windows]
                                              + [promoted.indices.flatten(), suppressed.indices.flatten()]))

    cards = []
    for i, f in enumerate(chosen):
        a, b = bounds[i], bounds[i + 1]
        vals = values[a:b]
        heights, edges = np.histogram(vals.numpy(), bins=n_bins)
        cards.append(FeatureCard(
            layer=layer, feature=f, explanation=(explanations or {}).get(f), n_tokens=n_tokens,
            n_firing=int(b - a), density=float(b - a) / n_tokens,
            max_activation=float(vals.max()) if len(vals) else 0.0,
            mean_activation=float(vals.mean()) if len(vals) else 0.0,
            contexts=_contexts(corpus, windows[i], names),
            histogram=Histogram(edges=edges.tolist(), counts=heights.tolist()),
            logit_effects=LogitEffects(_effects(promoted.values[i], promoted.indices[i], names),
                                       _effects(-suppressed.values[i], suppressed.indices[i], names)),
            cofiring=_cofiring(corpus, rows[a:b], f, counts, n_cofiring)))
    return cards


def _peaks(corpus: _Corpus, rows: torch.Tensor, values: torch.Tensor, n_contexts: int) -> torch.Tensor:
    """Token rows of the feature's peak in each of its ``n_contexts`` strongest texts, strongest first."""
    order = torch.sort(values, descending=True, stable=True).indices
    texts = corpus.text[rows[order]].numpy()
    _, first = np.unique(texts, return_index=True)  # each text's strongest entry
    return rows[order[torch.from_numpy(np.sort(first)[:n_contexts])]]


def _windows(corpus: _Corpus, features: list[int], peaks: list[torch.Tensor], window: int) -> list[tuple]:
    """Per feature, ``(rows (n, 2w+1) with -1 outside the peak's text, activations (n, 2w+1), peaks)``."""
    offsets = torch.arange(-window, window + 1)
    out = []
    for f, peak in zip(features, peaks, strict=True):
        rows = peak.unsqueeze(-1) + offsets
        text = corpus.text[peak].unsqueeze(-1)
        inside = (rows >= corpus.starts[text]) & (rows < corpus.starts[text + 1])
        rows = torch.where(inside, rows, -1)
        safe = rows.clamp(min=0)
        acts = (corpus.values[safe] * (corpus.indices[safe] == f)).sum(-1) * inside
        out.append((rows, acts, peak))
    return out


def _contexts(corpus: _Corpus, window: tuple, names: dict[int, str]) -> list[Context]:
    rows, acts, peaks = window
    contexts = []
    for row, act, peak in zip(rows, acts, peaks, strict=True):
        keep = row >= 0
        text = int(corpus.text[peak])
        first = int(row[keep][0])
        contexts.append(Context(text=text, start=first - int(corpus.starts[text]), peak=int(peak) - first,
                                tokens=[names[int(t)] for t in corpus.token_ids[row[keep]]],
                                activations=act[keep].tolist()))
    return contexts


def _logit_effects(backend, sae: QwenScopeSAE, features: list[int], n_logits: int):
    """``topk`` of ``W_U · norm_final(d_f)`` and of its negation for each feature's decoder column ``d_f``."""
    logits = backend.unembed(sae.W_dec[:, features].T).float().cpu()  # (F, vocab)
    n = min(n_logits, logits.shape[-1])
    return logits.topk(n, dim=-1), (-logits).topk(n, dim=-1)


def _effects(values: torch.Tensor, ids: torch.Tensor, names: dict[int, str]) -> list[TokenEffect]:
    return [TokenEffect(names[i], i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def _cofiring(corpus: _Corpus, rows: torch.Tensor, feature: int, counts: torch.Tensor, n: int) -> list[Cofiring]:
    """Features active on the tokens where ``feature`` fires, by Jaccard ``both / either`` (one bincount)."""
    values, indices = corpus.values[rows], corpus.indices[rows]
    both = torch.bincount(indices[values > 0], minlength=len(counts))
    both[feature] = 0
    jaccard = both / (len(rows) + counts - both).clamp(min=1)
    best = torch.sort(jaccard, descending=True, stable=True).indices[:n]
    best = best[both[best] > 0]
    return [Cofiring(int(g), int(both[g]), float(jaccard[g])) for g in best]


def _token_names(tokenizer, ids: torch.Tensor) -> dict[int, str]:
    """Each distinct token id decoded alone (one batch call)."""
    unique = ids.unique().tolist()
    return dict(zip(unique, tokenizer.batch_decode([[i] for i in unique]), strict=True))
