"""Feature discovery (report §3): per-token feature tables, contrastive identification, top-activating contexts.

    >>> table = analyze(model, tok, "我今天很开心 but tired", saes, top_n=5)
    >>> ranking = contrast(model, tok, chinese_lines, english_lines, saes, method="mean")
    >>> ranking[14][0]                       # best feature of layer 14: FeatureScore(feature=..., score=...)
    >>> contexts = top_contexts(model, tok, dataset["text"], saes, {14: [ranking[14][0].feature]})

Two contrastive scores are offered (docs/method.md §3.1):
- ``method="mean"``, (R1): δ_f = mean over D+ of pool_t z_f − mean over D− of pool_t z_f (pool = mean | max);
- ``method="rate"``, (R2, the official app's Compare): difference of firing rates 1[z_f > 0] over kept tokens.
Position 0 carries massive-norm outliers on Qwen3, so ``exclude_first_token`` defaults to True.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from qscope_plugin.distributed import rank_and_world, run_chunks
from qscope_plugin.errors import QScopeError
from qscope_plugin.recipes._harvest import (
    TextCodes,
    check_texts,
    dense_codes,
    harvest,
    harvest_settings,
    sharded_harvest,
)
from qscope_plugin.sae import QwenScopeSAE
from qscope_plugin.tokens import token_texts


class ContrastError(QScopeError, ValueError):
    """Contrast options that cannot be used."""


class TokenFeatures(NamedTuple):
    """Top features of one token at one layer."""

    position: int
    token: str
    """The token as text (``qscope_plugin.tokens``)."""
    layer: int
    features: list[tuple[int, float]]


class FeatureScore(NamedTuple):
    feature: int
    score: float
    positive: float
    """Mean pooled activation (or firing rate) over the positive texts."""
    negative: float


def analyze(model: object, tokenizer, text: str, saes: Mapping[int, QwenScopeSAE], *,
            top_n: int = 5) -> list[TokenFeatures]:
    """Per-token table: the ``top_n`` strongest features of every token at every layer in ``saes``."""
    (codes,) = harvest(model, tokenizer, check_texts([text]), saes)
    rows = []
    tokens = token_texts(tokenizer, codes.token_ids.tolist())
    for layer in sorted(saes):
        values, indices = codes.values[layer], codes.indices[layer]
        order = values.argsort(dim=-1, descending=True)[:, :top_n]
        for pos in range(values.shape[0]):
            feats = [(int(indices[pos, j]), float(values[pos, j])) for j in order[pos] if values[pos, j] > 0]
            rows.append(TokenFeatures(pos, tokens[pos], layer, feats))
    return rows


@dataclass(frozen=True)
class ContrastOptions:
    """Choices the report leaves open (docs/method.md §4 row 3), with the official app's options."""

    method: Literal["mean", "rate"] = "mean"
    pool: Literal["mean", "max"] = "mean"
    """Token pooling for ``method="mean"`` (R1); not specified in the report."""
    rank_by: Literal["signed", "abs"] = "signed"
    """``signed`` finds features of the positive side; ``abs`` either side (the app ranks by |difference|)."""
    exclude_first_token: bool = True
    drop_common_prefix: bool = False
    """Drop the longest token prefix shared by every text (e.g. a common template)."""
    drop_shared_tokens: bool = False
    """Drop positions whose token id occurs on both sides (the app's option)."""
    top_k: int = 5

    def __post_init__(self) -> None:
        for name, valid in (("method", ("mean", "rate")), ("pool", ("mean", "max")), ("rank_by", ("signed", "abs"))):
            if getattr(self, name) not in valid:
                raise ContrastError(f"{name}={getattr(self, name)!r}; expected one of {', '.join(map(repr, valid))}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ContrastError(f"top_k={self.top_k!r}; expected a whole number >= 1, e.g. 5")


def _kept_positions(codes: list[TextCodes], other_side: list[TextCodes], all_codes: list[TextCodes],
                    opts: ContrastOptions) -> list[torch.Tensor]:
    prefix = 0
    if opts.drop_common_prefix:
        shortest = min(len(c.token_ids) for c in all_codes)
        first = all_codes[0].token_ids
        while prefix < shortest and all(int(c.token_ids[prefix]) == int(first[prefix]) for c in all_codes):
            prefix += 1
    shared = set()
    if opts.drop_shared_tokens:
        shared = {int(t) for c in codes for t in c.token_ids} & {int(t) for c in other_side for t in c.token_ids}
    kept = []
    for c in codes:
        keep = torch.ones(len(c.token_ids), dtype=torch.bool)
        keep[: max(prefix, int(opts.exclude_first_token))] = False
        if shared:
            keep &= ~torch.isin(c.token_ids, torch.tensor(sorted(shared)))
        kept.append(keep)
    return kept


def _side_statistic(codes: list[TextCodes], kept: list[torch.Tensor], layer: int, d_sae: int,
                    opts: ContrastOptions) -> torch.Tensor:
    """Per-feature mean over texts of the pooled activation (R1) or of the firing rate (R2); ``(d_sae,)``.

    A text with no kept position is skipped; ``contrast_codes`` has already refused a side where that is every text.
    """
    total, n_texts = torch.zeros(d_sae), 0
    for c, keep in zip(codes, kept, strict=True):
        if not keep.any():
            continue
        z = dense_codes(c, layer, d_sae)[keep].float()
        if opts.method == "rate":
            total += (z > 0).float().mean(0)
        else:
            total += z.max(0).values if opts.pool == "max" else z.mean(0)
        n_texts += 1
    return total / n_texts


def _check_side_kept(kept: list[torch.Tensor], side: str, opts: ContrastOptions) -> None:
    """A side with no kept position has no statistic; reading it as all-zero rates would rank noise."""
    if not any(keep.any() for keep in kept):
        dropped = [name for name, on in (("the first token", opts.exclude_first_token),
                                         ("the common prefix", opts.drop_common_prefix),
                                         ("tokens shared by both sides", opts.drop_shared_tokens)) if on]
        raise ContrastError(f"every position of the {side} texts was excluded (dropping {', '.join(dropped)}); "
                            "give longer or more different texts, or turn one of those options off")


def contrast_codes(positive: list[TextCodes], negative: list[TextCodes], d_sae: Mapping[int, int],
                   opts: ContrastOptions = ContrastOptions()) -> dict[int, list[FeatureScore]]:
    """Rank features per layer by how much more they fire on ``positive`` than ``negative`` (pure statistics).

    Features whose score is exactly 0 are left out (a tie says nothing), so a layer may rank fewer than ``top_k``.

    Raises:
        ContrastError: a side has no kept position (everything dropped by the exclusion options).
    """
    everything = positive + negative
    kept_pos = _kept_positions(positive, negative, everything, opts)
    kept_neg = _kept_positions(negative, positive, everything, opts)
    _check_side_kept(kept_pos, "positive (A)", opts)
    _check_side_kept(kept_neg, "negative (B)", opts)
    ranking = {}
    for layer, width in d_sae.items():
        pos = _side_statistic(positive, kept_pos, layer, width, opts)
        neg = _side_statistic(negative, kept_neg, layer, width, opts)
        diff = pos - neg
        key = diff.abs() if opts.rank_by == "abs" else diff
        top = key.topk(min(opts.top_k, width)).indices
        ranking[layer] = [FeatureScore(int(f), float(diff[f]), float(pos[f]), float(neg[f])) for f in top
                          if diff[f] != 0]
    return ranking


def contrast(model: object, tokenizer, positive: Sequence[str], negative: Sequence[str],
             saes: Mapping[int, QwenScopeSAE], *, batch_size: int = 16, progress: bool = False,
             **options) -> dict[int, list[FeatureScore]]:
    """Contrastive identification between two sets of texts, ranked per layer (one forward per batch).

    ``options`` are :class:`ContrastOptions` fields (``method``, ``pool``, ``rank_by``, ``exclude_first_token``,
    ``drop_common_prefix``, ``drop_shared_tokens``, ``top_k``).
    """
    opts = ContrastOptions(**options)
    pos = sharded_harvest(model, tokenizer, check_texts(positive, "positive texts"), saes, batch_size=batch_size,
                          progress=progress, desc="positive")
    neg = sharded_harvest(model, tokenizer, check_texts(negative, "negative texts"), saes, batch_size=batch_size,
                          progress=progress, desc="negative")
    return contrast_codes(pos, neg, {layer: sae.cfg.d_sae for layer, sae in saes.items()}, opts)


class Context(NamedTuple):
    activation: float
    text_index: int
    position: int
    snippet: str
    """The text around the token, with the token itself in [[double brackets]] (tokens as ``qscope_plugin.tokens``
    shows them)."""


def top_contexts(model: object, tokenizer, texts: Iterable[str], saes: Mapping[int, QwenScopeSAE],
                 features: Mapping[int, Sequence[int]], *, n_top: int = 10, window: int = 8, batch_size: int = 16,
                 exclude_first_token: bool = True, progress: bool = False) -> dict[tuple[int, int], list[Context]]:
    """The ``n_top`` strongest (text, token) occurrences of each ``(layer, feature)`` over a stream of texts.

    ``texts`` may be any iterable (e.g. a streamed HF ``datasets`` column), read once in chunks (see
    ``qscope_plugin.distributed``; under ``torchrun`` each rank harvests its share of the chunks); memory is one
    heap of ``n_top`` entries per feature plus one chunk's codes. ``text_index`` counts the non-empty texts.
    """
    keys = [(layer, f) for layer, fs in features.items() for f in fs]
    used = {layer: saes[layer] for layer in features}
    shown = progress and rank_and_world()[0] == 0

    def chunk_heaps(start: int, chunk: list[str]) -> dict[str, torch.Tensor]:
        heaps: dict[tuple[int, int], list[tuple[float, int, int, str]]] = {key: [] for key in keys}
        for offset, codes in enumerate(harvest(model, tokenizer, chunk, used, batch_size=batch_size)):
            ids = codes.token_ids
            for (layer, feature), heap in heaps.items():
                hits = (codes.indices[layer] == feature) & (codes.values[layer] > 0)
                for pos in hits.any(-1).nonzero().flatten().tolist():
                    if exclude_first_token and pos == 0:
                        continue
                    act = float(codes.values[layer][pos][hits[pos]].max())
                    if len(heap) < n_top or act > heap[0][0]:
                        first = max(0, pos - window)
                        pieces = token_texts(tokenizer, ids[first : pos + 1 + window].tolist())
                        peak = pos - first
                        snippet = f"{''.join(pieces[:peak])}[[{pieces[peak]}]]{''.join(pieces[peak + 1:])}"
                        _offer(heap, (act, start + offset, pos, snippet), n_top)
        return _heaps_to_tensors([heaps[key] for key in keys])

    stream = (text for text in tqdm(texts, disable=not shown, desc="contexts", unit="text") if text and text.strip())
    parts = run_chunks(stream, chunk_heaps, name="top contexts",
                       settings=harvest_settings(model, tokenizer, used, features={str(n): list(fs) for n, fs in
                                                 features.items()}, n_top=n_top, window=window, batch_size=batch_size,
                                                 exclude_first_token=exclude_first_token))
    heaps: dict[tuple[int, int], list[tuple[float, int, int, str]]] = {key: [] for key in keys}
    for part in parts:  # each chunk's strongest, offered in input order: the heap a single pass would build
        for key, found in zip(keys, _heaps_from_tensors(part, len(keys)), strict=True):
            for item in found:
                if len(heaps[key]) < n_top or item[0] > heaps[key][0][0]:
                    _offer(heaps[key], item, n_top)
    return {key: [Context(*item) for item in sorted(heap, reverse=True)] for key, heap in heaps.items()}


def _offer(heap: list, item: tuple, n_top: int) -> None:
    (heapq.heappushpop if len(heap) >= n_top else heapq.heappush)(heap, item)


def _heaps_to_tensors(heaps: list[list[tuple[float, int, int, str]]]) -> dict[str, torch.Tensor]:
    """A chunk's heaps, one after another, in their heap order; snippets as UTF-8 bytes."""
    items = [item for heap in heaps for item in heap]
    snippets = [item[3].encode() for item in items]
    return {"counts": torch.tensor([len(h) for h in heaps], dtype=torch.long),
            "activations": torch.tensor([item[0] for item in items], dtype=torch.float64),
            "places": torch.tensor([item[1:3] for item in items], dtype=torch.long).reshape(-1, 2),
            "snippet_bytes": torch.tensor([len(b) for b in snippets], dtype=torch.long),
            "snippets": torch.frombuffer(bytearray(b"".join(snippets)) or bytearray(1), dtype=torch.uint8)}


def _heaps_from_tensors(part: dict[str, torch.Tensor], n_keys: int) -> list[list[tuple[float, int, int, str]]]:
    text = part["snippets"].numpy().tobytes()
    ends = part["snippet_bytes"].cumsum(0).tolist()
    items = [(act, place[0], place[1], text[end - size : end].decode())
             for act, place, size, end in zip(part["activations"].tolist(), part["places"].tolist(),
                                              part["snippet_bytes"].tolist(), ends, strict=True)]
    bounds = [0, *part["counts"].cumsum(0).tolist()]
    return [items[bounds[i] : bounds[i + 1]] for i in range(n_keys)]
