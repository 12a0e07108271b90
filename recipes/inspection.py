"""Feature cards: what a feature fires on, how strongly, what it writes to the logits, and whom it fires with.

    >>> cards = feature_cards(model, tok, texts, sae, [12, 40], layer=3)     # or features=None, top=50
    >>> corpus = harvest_corpus(model, tok, texts, sae, layer=3)             # or: one harvest, many calls
    >>> more = cards_from_corpus(model, tok, corpus, sae, [7])
    >>> card = cards[0]
    >>> card.density, card.max_activation, card.contexts[0].tokens, card.logit_effects.promoted[0]
    >>> FeatureCard.from_json(card.to_json()) == card

Every card of a call comes from ONE harvest pass over the texts (pooling ``tokens``): all texts' sparse ``(T, k)``
codes are concatenated once into one tokens x features CSC matrix, so a feature's firing tokens are one slice;
each card is a few array operations on its slice, and the logit effects and co-firing of all cards are one
(blocked) product each. 200 cards over 2,000 texts cost ~1.1x the harvest alone (``benchmarks/bench_dashboard.py``).
See ``docs/dashboard.md`` for how each part is computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch

from qscope_plugin.backends import as_backend
from qscope_plugin.errors import feature_out_of_range
from qscope_plugin.recipes._harvest import EmptyInputError, HarvestError, TextCodes, check_texts, sharded_harvest
from qscope_plugin.sae import QwenScopeSAE
from qscope_plugin.tokens import Piece, pieces_text, token_pieces


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
    """The window's tokens as text (``qscope_plugin.tokens``: a character split into byte tokens is shown whole on
    the token that completes it)."""
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
    """Tokens counted (all texts; less each text's first with ``exclude_first_token``)."""
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
    scores: dict | None = None
    """How far to trust ``explanation`` when it comes from ``qscope explain``: ``{"detection": {...},
    "fuzzing": {...}}``, each a ``recipes.explain.Score`` as a dict (balanced accuracy, interval, counts)."""

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
class Corpus:
    """All texts' codes at one layer, concatenated: token row r belongs to text ``text[r]``.

    ``by_feature`` holds the same codes column-major (CSC), so a feature's firing rows and values are one slice,
    rows ascending: grouping by feature is scipy's counting sort, not a sort of all entries. With
    ``exclude_first_token`` each text's position 0 counts as not firing (its codes are zeroed) and is not counted
    in ``n_tokens``: every statistic of a card then leaves it out.
    """

    layer: int
    token_ids: np.ndarray  # (N,)
    values: np.ndarray  # (N, k)
    indices: np.ndarray  # (N, k)
    text: np.ndarray  # (N,)
    starts: np.ndarray  # (n_texts + 1,): text t holds rows starts[t]:starts[t + 1]
    by_feature: sp.csc_matrix  # (N, d_sae)
    n_tokens: int
    """Tokens the statistics count: all rows, less each text's first with ``exclude_first_token``."""

    @classmethod
    def concat(cls, codes: list[TextCodes], layer: int, d_sae: int, *, exclude_first_token: bool) -> Corpus:
        lengths = np.array([len(c.token_ids) for c in codes])
        starts = np.concatenate([[0], np.cumsum(lengths)])
        values = torch.cat([c.values[layer].float() for c in codes]).numpy()
        indices = torch.cat([c.indices[layer] for c in codes]).numpy()
        firsts = starts[:-1][lengths > 0]
        if exclude_first_token:
            values[firsts] = 0
        n, k = values.shape
        by_token = sp.csr_matrix((values.ravel(), indices.ravel(), np.arange(0, n * k + 1, k)), shape=(n, d_sae),
                                 copy=True)  # eliminate_zeros compacts the data in place: it must not be `values`
        by_token.eliminate_zeros()  # TopK keeps k entries per token; those not positive are not firing
        return cls(layer, torch.cat([c.token_ids for c in codes]).numpy(), values, indices,
                   np.repeat(np.arange(len(codes)), lengths), starts, by_token.tocsc(),
                   n - len(firsts) if exclude_first_token else n)

    def firing(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, values)`` of the tokens where ``feature`` fires, rows ascending."""
        a, b = self.by_feature.indptr[feature], self.by_feature.indptr[feature + 1]
        return self.by_feature.indices[a:b], self.by_feature.data[a:b]


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


def _check_sizes(n_contexts: int, window: int, n_bins: int, n_logits: int, n_cofiring: int) -> None:
    for name, value, least in (("n_contexts", n_contexts, 0), ("window", window, 0), ("n_bins", n_bins, 1),
                               ("n_logits", n_logits, 0), ("n_cofiring", n_cofiring, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise HarvestError(f"{name}={value!r}; expected an integer >= {least}")


@torch.no_grad()
def feature_cards(model: object, tokenizer, texts: Sequence[str], sae: QwenScopeSAE,
                  features: Sequence[int] | None = None, *, layer: int, top: int | None = None,
                  exclude_first_token: bool = True, n_contexts: int = 10, window: int = 10, n_bins: int = 30,
                  n_logits: int = 10, n_cofiring: int = 10, explanations: Mapping[int, object] | None = None,
                  batch_size: int = 16, max_length: int | None = 512, progress: bool = True) -> list[FeatureCard]:
    """Cards of ``features`` (or of the ``top`` densest features) of ``sae`` at ``layer``, from one harvest.

    ``harvest_corpus`` then ``cards_from_corpus``; call those two to draw many cards from one harvest.

    Args:
        model: a transformers model, a TransformerLens bridge, an nnsight model or a ``Backend``.
        texts: the dataset; each text's first ``max_length`` tokens are read.
        features: feature ids, in the order the cards come back; or None with ``top``.
        top: with ``features=None``, the ``top`` features of highest firing density (fraction of tokens where
            z > 0) among those that fire at all, densest first: density is what the data shows most of, and it
            does not single out features with one outlier activation.
        exclude_first_token: leave each text's position 0 (Qwen's massive-activation outliers, docs/method.md §2.5)
            out of every statistic: density, ``top``, max / mean, histogram, contexts' peaks and co-firing. True
            by default, as ``discovery.top_contexts``.
        n_contexts: top-activating contexts per card (at most one per text).
        window: tokens kept on each side of a context's peak token.
        n_bins: bins of the activation histogram.
        n_logits: promoted and suppressed tokens per card.
        n_cofiring: co-firing features per card.
        explanations: ``{feature: text}`` shown on the cards (e.g. from the safety-synthesis explainer), or
            ``{feature: recipes.explain.FeatureExplanation}`` (``qscope explain``), whose scores the cards carry.

    Raises:
        HarvestError: both or neither of ``features`` / ``top``, an empty ``features``, a bad ``top`` or size.
        FeatureOutOfRangeError: a feature outside ``0..d_sae-1``.
        LayerOutOfRangeError: ``layer`` outside the model.
        EmptyInputError: no texts, or none with a token.
    """
    texts = check_texts(texts)
    _check_sizes(n_contexts, window, n_bins, n_logits, n_cofiring)
    _chosen(features, top, sae.cfg.d_sae)  # bad choices fail before the harvest
    corpus = harvest_corpus(model, tokenizer, texts, sae, layer=layer, exclude_first_token=exclude_first_token,
                            batch_size=batch_size, max_length=max_length, progress=progress)
    return cards_from_corpus(model, tokenizer, corpus, sae, features, top=top, n_contexts=n_contexts, window=window,
                             n_bins=n_bins, n_logits=n_logits, n_cofiring=n_cofiring, explanations=explanations)


@torch.no_grad()
def harvest_corpus(model: object, tokenizer, texts: Sequence[str], sae: QwenScopeSAE, *, layer: int,
                   exclude_first_token: bool = True, batch_size: int = 16, max_length: int | None = 512,
                   progress: bool = True) -> Corpus:
    """The one model pass of ``feature_cards``: every text's codes at ``layer``, concatenated (pooling ``tokens``).

    Raises:
        LayerOutOfRangeError: ``layer`` outside the model.
        EmptyInputError: no texts, or none with a token.
    """
    texts = check_texts(texts)
    backend = as_backend(model)
    backend.check_layers([layer])
    codes = sharded_harvest(backend, tokenizer, texts, {layer: sae}, pooling="tokens", batch_size=batch_size,
                            max_length=max_length, progress=progress, desc="feature cards")
    if not sum(len(c.token_ids) for c in codes):
        raise EmptyInputError("no text has a token; pass texts the tokenizer turns into at least one token")
    return Corpus.concat(codes, layer, sae.cfg.d_sae, exclude_first_token=exclude_first_token)


@torch.no_grad()
def cards_from_corpus(model: object, tokenizer, corpus: Corpus, sae: QwenScopeSAE,
                      features: Sequence[int] | None = None, *, top: int | None = None, n_contexts: int = 10,
                      window: int = 10, n_bins: int = 30, n_logits: int = 10, n_cofiring: int = 10,
                      explanations: Mapping[int, object] | None = None) -> list[FeatureCard]:
    """Cards from a ``harvest_corpus``: array work and the logit effects (final norm and LM head only), no
    forward pass. Arguments as ``feature_cards``; ``sae`` must be the corpus's."""
    _check_sizes(n_contexts, window, n_bins, n_logits, n_cofiring)
    chosen = _chosen(features, top, sae.cfg.d_sae)
    layer, n_tokens = corpus.layer, corpus.n_tokens
    counts = np.diff(corpus.by_feature.indptr)  # tokens where each feature fires
    if chosen is None:
        densest = np.argsort(-counts, kind="stable")[:top]
        chosen = densest[counts[densest] > 0].tolist()

    firing = [corpus.firing(f) for f in chosen]
    windows = [_window(corpus, f, _peaks(corpus.text, rows, values, n_contexts), window)
               for f, (rows, values) in zip(chosen, firing, strict=True)]
    promoted, suppressed = _logit_effects(as_backend(model), sae, chosen, n_logits)
    pieces = _token_pieces(tokenizer, np.concatenate([corpus.token_ids[rows[inside]] for _, rows, inside, _ in windows]
                                                   + [promoted.indices.flatten(), suppressed.indices.flatten()]))
    cofiring = _cofiring(corpus, chosen, counts, n_cofiring)

    cards = []
    for i, (f, (_, values)) in enumerate(zip(chosen, firing, strict=True)):
        heights, edges = np.histogram(values, bins=n_bins)
        explanation, scores = _explained((explanations or {}).get(f))
        cards.append(FeatureCard(
            layer=layer, feature=f, explanation=explanation, scores=scores, n_tokens=n_tokens,
            n_firing=len(values), density=len(values) / max(n_tokens, 1),
            max_activation=float(values.max()) if len(values) else 0.0,
            mean_activation=float(values.mean()) if len(values) else 0.0,
            contexts=_contexts(corpus, windows[i], pieces),
            histogram=Histogram(edges=edges.tolist(), counts=heights.tolist()),
            logit_effects=LogitEffects(_effects(promoted.values[i], promoted.indices[i], pieces),
                                       _effects(-suppressed.values[i], suppressed.indices[i], pieces)),
            cofiring=cofiring[i]))
    return cards


def _explained(given: object) -> tuple[str | None, dict | None]:
    """``(explanation, scores)`` of a plain text or of a ``recipes.explain.FeatureExplanation``."""
    if given is None or isinstance(given, str):
        return given, None
    scores = {kind: asdict(score) for kind in ("detection", "fuzzing") if (score := getattr(given, kind)) is not None}
    return given.explanation or None, scores or None


def _peaks(text: np.ndarray, rows: np.ndarray, values: np.ndarray, n_contexts: int) -> np.ndarray:
    """Token rows of the feature's peak in each of its ``n_contexts`` strongest texts, strongest first (ties: the
    earlier row). Only the strongest entries are sorted, widened until they span ``n_contexts`` texts."""
    m = max(8 * n_contexts, 1)
    while True:
        m = min(m, len(values))
        candidates = np.sort(np.argpartition(-values, m - 1)[:m]) if m < len(values) else np.arange(len(values))
        candidates = candidates[np.argsort(-values[candidates], kind="stable")]
        _, first = np.unique(text[rows[candidates]], return_index=True)  # each text's strongest entry
        if len(first) >= n_contexts or m == len(values):
            return rows[candidates[np.sort(first)[:n_contexts]]]
        m *= 4


def _window(corpus: Corpus, feature: int, peaks: np.ndarray, window: int) -> tuple[np.ndarray, ...]:
    """``(peaks, rows, inside, activations)``, the last three ``(n_peaks, 2 window + 1)``: the rows around each
    peak, which of them lie in the peak's text, and the feature's activation on them."""
    rows = peaks[:, None] + np.arange(-window, window + 1)
    text = corpus.text[peaks][:, None]
    inside = (rows >= corpus.starts[text]) & (rows < corpus.starts[text + 1])
    rows = np.where(inside, rows, 0)
    acts = np.where(corpus.indices[rows] == feature, corpus.values[rows], 0).sum(-1) * inside
    return peaks, rows, inside, acts


def _contexts(corpus: Corpus, window: tuple[np.ndarray, ...], pieces: dict[int, Piece]) -> list[Context]:
    contexts = []
    for peak, rows, inside, acts in zip(*window, strict=True):
        rows, acts = rows[inside], acts[inside]
        text = int(corpus.text[peak])
        contexts.append(Context(text=text, start=int(rows[0] - corpus.starts[text]), peak=int(peak - rows[0]),
                                tokens=pieces_text([pieces[t] for t in corpus.token_ids[rows].tolist()]),
                                activations=acts.tolist()))
    return contexts


def _logit_effects(backend, sae: QwenScopeSAE, features: list[int], n_logits: int):
    """``topk`` of ``W_U · norm_final(d_f)`` and of its negation for each feature's decoder column ``d_f``."""
    logits = backend.unembed(sae.W_dec[:, features].T).float().cpu()  # (F, vocab)
    n = min(n_logits, logits.shape[-1])
    return logits.topk(n, dim=-1), (-logits).topk(n, dim=-1)


def _effects(values: torch.Tensor, ids: torch.Tensor, pieces: dict[int, Piece]) -> list[TokenEffect]:
    """Each promoted / suppressed token shown alone (a one-token sequence)."""
    return [TokenEffect(pieces_text([pieces[i]])[0], i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def _cofiring(corpus: Corpus, features: list[int], counts: np.ndarray, n: int) -> list[list[Cofiring]]:
    """Per feature, the features active on the same tokens, by Jaccard ``both / either``.

    ``both`` (features x d_sae) is summed over blocks of tokens as ``fires_blockᵀ @ chosen_block``: the block's
    sparse firing matrix times the dense 0/1 columns of the chosen features, a SIMD-friendly sparse x dense
    product (measured ~2x faster than a sparse x sparse product or a bincount over the firing pairs).
    """
    fires = corpus.by_feature.tocsr()
    fires.data[:] = 1
    both = np.zeros((len(features), len(counts)), dtype=np.int64)
    rows = max(1, (1 << 22) // max(len(features), 1))  # a dense block of at most 4M float32
    for start in range(0, fires.shape[0], rows):
        block = fires[start:start + rows]
        both += np.rint(block.T @ block[:, features].toarray()).astype(np.int64).T
    both[np.arange(len(features)), features] = 0
    out = []
    for start in range(0, len(features), 64):  # Jaccard and ranking of 64 features at a time: bounded memory
        group, counted = features[start:start + 64], both[start:start + 64]
        jaccard = counted / np.maximum(counts[group][:, None] + counts[None, :] - counted, 1)
        best = np.argsort(-jaccard, axis=1, kind="stable")[:, :n]
        out += [[Cofiring(int(g), int(counted[i, g]), float(jaccard[i, g])) for g in row if counted[i, g]]
                for i, row in enumerate(best)]
    return out


def _token_pieces(tokenizer, ids: np.ndarray) -> dict[int, Piece]:
    """Each distinct token id's content (one tokenizer call), shown per context by ``pieces_text``."""
    unique = np.unique(ids).tolist()
    return dict(zip(unique, token_pieces(tokenizer, unique), strict=True))
