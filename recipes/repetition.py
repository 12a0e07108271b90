"""Repetition features and repetition-steered rollouts for GRPO / DAPO (report §8, docs/method.md R32–R33).

    >>> spans = find_repeats(ids)                                   # non-overlapping spans, for display and (R32)
    >>> repeating_suffix(ids)                                       # the loop it ends in, or None (the detector)
    >>> repeat_ratio(completions)                                   # share of completions stuck in a loop
    >>> found = repetition_features(model, tok, texts, saes)        # (R32), ranked per layer
    >>> spec = repetition_spec(found, alpha=8.0, n_features=2)      # (R33) on the top features
    >>> groups = rollout_groups(model, [prompt_ids], spec, saes, group_size=8, max_new_tokens=64)
    >>> groups[0].steered, groups[0].logprobs                       # [F, ..., F, T], unsteered old log-probs

RL rarely samples endless repetition, so it never learns to avoid it. Per prompt, G−1 normal samples and one
sampled with the repetition features amplified give the group a rare negative, which a reward **that penalises
repetition** (``repetition_reward``, or your task reward minus it) turns into a negative advantage. The old-policy
log-probs of every completion, the steered one included, come from an **unsteered** forward: the steered sample is
treated as if the unsteered policy had produced it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from qscope_plugin.backends import Backend, as_backend
from qscope_plugin.errors import MalformedFileError, QScopeError
from qscope_plugin.recipes._harvest import check_texts, pad, sharded_harvest
from qscope_plugin.recipes._json import is_index, is_layer_map, is_list_of, is_number, read_json
from qscope_plugin.recipes.steering import SteeringSpec, Term, steering_vectors
from qscope_plugin.sae import QwenScopeSAE

RepAgg = Literal["mean", "pooled"]
"""How (R32) is aggregated: ``mean`` = mean over a text's repeated tokens, then over texts; ``pooled`` = one mean
over every repeated token of every text (long loops weigh more)."""


class RepetitionError(QScopeError, ValueError):
    """Repetition options or inputs that cannot be used."""


class RepetitionFeaturesFileError(RepetitionError, MalformedFileError):
    """A saved ``RepetitionFeatures`` file that is truncated, damaged or not one (the message names the file)."""


FEATURES_FILE = "the JSON written by RepetitionFeatures.to_json / `qscope repetition features`"


@dataclass(frozen=True)
class RepeatSpan:
    """``ids[start:end]`` is ``copies`` (possibly ending in a partial copy) of a unit of ``period`` tokens."""

    start: int
    end: int
    period: int

    @property
    def copies(self) -> float:
        return (self.end - self.start) / self.period

    def occurrences(self) -> list[tuple[int, int]]:
        """``(t_first, t_last)`` of each token of the unit: its first and its last position inside the span."""
        return [(t, t + self.period * ((self.end - 1 - t) // self.period))
                for t in range(self.start, self.start + self.period)]


def _check_params(ngram: int, min_repeats: int, max_period: int) -> None:
    for name, value, low in (("ngram", ngram, 1), ("min_repeats", min_repeats, 2), ("max_period", max_period, ngram)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RepetitionError(f"{name}={value!r}; expected an integer >= {low}")


def _periodic_runs(ids: Sequence[int], ngram: int, min_repeats: int, max_period: int) -> list[RepeatSpan]:
    """Every maximal run of every unit length: for ``p`` in ``ngram..max_period`` (ascending), each maximal ``[s, e)``
    with ``ids[i] == ids[i - p]`` for all ``i`` in ``[s + p, e)`` and ``e - s >= min_repeats * p``, by start.

    These are all the loops the definition knows, overlaps included; ``find_repeats`` chooses among them for display,
    the detector and the repeated share read them all. One vectorised pass of O(n) per period: O(n · max_period).
    """
    tokens = np.asarray(ids, dtype=np.int64)
    runs: list[RepeatSpan] = []
    for p in range(ngram, min(max_period, len(tokens) // min_repeats) + 1):
        same = np.concatenate(([False], tokens[p:] == tokens[:-p], [False]))  # same[j + 1]: ids[j + p] == ids[j]
        edges = np.flatnonzero(np.diff(same))  # rises and falls alternate: runs [rise, fall) of equal pairs
        rises, falls = edges[::2], edges[1::2]
        long_enough = falls - rises >= (min_repeats - 1) * p
        runs += [RepeatSpan(int(a), int(b) + p, p) for a, b in zip(rises[long_enough], falls[long_enough], strict=True)]
    return runs


def find_repeats(ids: Sequence[int], *, ngram: int = 1, min_repeats: int = 3, max_period: int = 32) -> list[RepeatSpan]:
    """Non-overlapping repeating spans of ``ids`` for display and for the (R32) occurrence pairs, sorted by start.

    The candidates are the maximal runs: for a unit length ``p`` (``ngram <= p <= max_period``), an interval
    ``[s, e)`` with ``ids[i] == ids[i - p]`` for every ``i`` in ``[s + p, e)``, not extendable either way, and
    ``e - s >= min_repeats * p``. They are visited by ascending ``p``, and for one ``p`` from left to right; a run
    is kept unless it shares a token with a run already kept, i.e. one of a **shorter unit, or of the same unit
    further left** (two maximal runs of one period can share up to ``p − 1`` tokens). So ``aaaa`` is period 1, not
    2; in ``1 2 1 2 1 2 1 3 1 3 1 3`` only ``[0, 7)`` is kept, since ``[6, 12)`` shares token 6 with it; in
    ``7 7 7 9 7 7 7 9 7 7 7 9`` the three ``7 7 7`` runs are kept and the period-4 run over everything is not.

    The spans are therefore not the detector: whether a completion loops to its end is ``repeating_suffix`` /
    ``is_repetitive``, and the repeated share is ``repeated_fraction``, both over every run.
    """
    _check_params(ngram, min_repeats, max_period)
    kept: list[RepeatSpan] = []
    for run in _periodic_runs(ids, ngram, min_repeats, max_period):
        if not any(k.start < run.end and run.start < k.end for k in kept):
            kept.append(run)
    return sorted(kept, key=lambda s: s.start)


def repeating_suffix(ids: Sequence[int], *, ngram: int = 1, min_repeats: int = 3,
                     max_period: int = 32) -> RepeatSpan | None:
    """The endless loop: the longest suffix of ``ids`` that is a unit of ``ngram..max_period`` tokens repeated
    ``min_repeats`` times or more (whole copies, up to the last token); ``None`` if there is none.

    Of equally long suffixes the shortest unit is returned (``a a a a`` is ``a`` x4, not ``a a`` x2). The span is
    ``copies`` whole copies of ``ids[start:start + period]``. The definition, read directly: a suffix ``u^k`` with
    ``|u| = p`` exists iff the last ``min_repeats · p`` tokens have period ``p``, so each unit length costs
    ``O(min_repeats · p)`` to rule out and ``O(n)`` to measure when it loops: ``O(n · max_period)`` in all.
    """
    _check_params(ngram, min_repeats, max_period)
    ids = list(ids)
    n, best, tokens = len(ids), None, None
    for p in range(ngram, min(max_period, n // min_repeats) + 1):
        tail = ids[n - min_repeats * p :]
        if tail[p:] != tail[:-p]:
            continue
        if tokens is None:
            tokens = np.asarray(ids, dtype=np.int64)
        breaks = np.flatnonzero(tokens[p:] != tokens[:-p])  # j: ids[j + p] != ids[j]
        periodic = n - 1 - int(breaks[-1]) if breaks.size else n  # the longest suffix of period p
        length = periodic // p * p
        if best is None or length > best.end - best.start:
            best = RepeatSpan(n - length, n, p)
    return best


def repeated_fraction(ids: Sequence[int], *, ngram: int = 1, min_repeats: int = 3, max_period: int = 32) -> float:
    """The repeated share: the fraction of tokens that repeat the token one unit earlier inside a run of
    ``min_repeats`` or more copies (of any unit length, overlapping runs counted once); 0 if ``ids`` is empty.

    Every run counts, not only the spans ``find_repeats`` keeps: in ``7 7 7 9`` x3 the second and third copies of
    the period-4 loop are repeated tokens as well as the 7s that repeat the 7 before them (10 of 12).
    """
    _check_params(ngram, min_repeats, max_period)
    repeated = np.zeros(len(ids), dtype=bool)
    for run in _periodic_runs(ids, ngram, min_repeats, max_period):
        repeated[run.start + run.period : run.end] = True
    return float(repeated.mean()) if len(ids) else 0.0


def is_repetitive(ids: Sequence[int], *, endless: bool = True, ngram: int = 1, min_repeats: int = 3,
                  max_period: int = 32) -> bool:
    """Whether ``ids`` ends in a loop (``repeating_suffix``: a unit repeated ``min_repeats`` times or more up to the
    last token, the report's endless repetition); with ``endless=False``, whether it holds such a run anywhere."""
    if endless:
        return repeating_suffix(ids, ngram=ngram, min_repeats=min_repeats, max_period=max_period) is not None
    _check_params(ngram, min_repeats, max_period)
    return bool(_periodic_runs(ids, ngram, min_repeats, max_period))


def repeat_ratio(completions: Sequence[Sequence[int]], *, endless: bool = True, **params: int) -> float:
    """Repeat ratio: the share of completions that are ``is_repetitive``.

    Pass each completion's token ids as generated, cut after its EOS: one that stopped never counts as endless.
    """
    if not completions:
        raise RepetitionError("no completions given; pass at least one list of token ids")
    return sum(is_repetitive(c, endless=endless, **params) for c in completions) / len(completions)


@dataclass(frozen=True)
class RepetitionFeatures:
    """(R32) per layer: the features whose activation rises most from first to last repeated occurrence."""

    features: dict[int, list[int]]
    scores: dict[int, list[float]]
    """Aggregated Δ^rep of each feature in ``features``, descending."""
    n_texts: int
    """Texts that held at least one repeated token (the others do not count in the mean)."""
    n_tokens: int
    """Repeated-token pairs (t_first, t_last) over all texts."""
    rep_agg: RepAgg

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RepetitionFeatures:
        return cls._from_data(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> RepetitionFeatures:
        """Read ``to_json``'s file (``qscope repetition features --out``).

        Raises:
            RepetitionFeaturesFileError: a missing, truncated or foreign file (it is named, with what is wrong).
        """
        data = read_json(path, RepetitionFeaturesFileError, FEATURES_FILE)
        shape = {"features": lambda v: is_layer_map(v, lambda f: is_list_of(f, is_index)),
                 "scores": lambda v: is_layer_map(v, lambda s: is_list_of(s, is_number)),
                 "n_texts": is_index, "n_tokens": is_index, "rep_agg": lambda v: v in get_args(RepAgg)}
        wrong = list(shape) if not isinstance(data, dict) else [k for k, ok in shape.items() if not ok(data.get(k))]
        if wrong or set(data) != set(shape):
            raise RepetitionFeaturesFileError(f"{str(path)!r} is not saved repetition features (missing or malformed: "
                                              f"{', '.join(wrong or sorted(set(data) ^ set(shape)))}); expected "
                                              f"{FEATURES_FILE}")
        return cls._from_data(data)

    @classmethod
    def _from_data(cls, data: dict) -> RepetitionFeatures:
        return cls(**{**data, "features": {int(n): f for n, f in data["features"].items()},
                      "scores": {int(n): s for n, s in data["scores"].items()}})


def _rows(values: torch.Tensor, indices: torch.Tensor, rows: list[int], d_sae: int) -> torch.Tensor:
    """Dense codes ``(len(rows), d_sae)`` of a few token rows of a sparse ``(T, k)`` code."""
    return torch.zeros(len(rows), d_sae).scatter_(-1, indices[rows], values[rows].float())


def repetition_features(model: object, tokenizer, texts: Sequence[str], saes: Mapping[int, QwenScopeSAE], *,
                        n_features: int = 8, rep_agg: RepAgg = "mean", ngram: int = 1, min_repeats: int = 3,
                        max_period: int = 32, max_length: int | None = 512, batch_size: int = 16,
                        progress: bool = False) -> RepetitionFeatures:
    """(R32) Δ^rep_f = z_f(x_t_last) − z_f(x_t_first) over the repeated tokens of ``texts``, ranked per layer.

    Texts are harvested (no special tokens, as every recipe) and the repeats found on their own tokens, so pass
    decoded completions that looped (or any text with copied spans). Raises when no text repeats anything.
    """
    if rep_agg not in ("mean", "pooled"):
        raise RepetitionError(f"rep_agg={rep_agg!r}; expected 'mean' (per text, then texts) or 'pooled'")
    if n_features < 1:
        raise RepetitionError(f"n_features={n_features}; expected an integer >= 1")
    texts = check_texts(texts)
    _check_params(ngram, min_repeats, max_period)
    codes = sharded_harvest(model, tokenizer, texts, saes, max_length=max_length, batch_size=batch_size,
                            progress=progress, desc="repetition features")
    sums = {n: torch.zeros(saes[n].cfg.d_sae, dtype=torch.float64) for n in saes}
    n_texts = n_tokens = 0
    for text in codes:
        pairs = [p for s in find_repeats(text.token_ids.tolist(), ngram=ngram, min_repeats=min_repeats,
                                         max_period=max_period) for p in s.occurrences()]
        if not pairs:
            continue
        n_texts, n_tokens = n_texts + 1, n_tokens + len(pairs)
        first, last = [a for a, _ in pairs], [b for _, b in pairs]
        for n, total in sums.items():
            d_sae = saes[n].cfg.d_sae
            delta = (_rows(text.values[n], text.indices[n], last, d_sae)
                     - _rows(text.values[n], text.indices[n], first, d_sae)).double()
            total += delta.mean(0) if rep_agg == "mean" else delta.sum(0)
    if not n_texts:
        raise RepetitionError(f"no repeated tokens in the {len(texts)} discovery text(s) (min_repeats={min_repeats}, "
                              f"ngram={ngram}, max_period={max_period}); pass completions that loop, e.g. greedy "
                              "continuations that end in a repeated phrase")
    features, scores = {}, {}
    for n, total in sums.items():
        top = (total / (n_texts if rep_agg == "mean" else n_tokens)).topk(min(n_features, total.numel()))
        features[n], scores[n] = top.indices.tolist(), top.values.tolist()
    return RepetitionFeatures(features, scores, n_texts, n_tokens, rep_agg)


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise RepetitionError(f"alpha={alpha!r} is not a finite number; pass e.g. alpha=8.0 (larger: more repetition)")
    return float(alpha)


def repetition_spec(found: RepetitionFeatures | Mapping[int, Sequence[int]], alpha: float, *,
                    layers: Sequence[int] | None = None, n_features: int = 1,
                    direction_norm: Literal["raw", "unit"] = "raw") -> SteeringSpec:
    """(R33) h' = h + α · Σ d_f over the top ``n_features`` repetition features of each of ``layers`` (default: all),
    on generated positions only (the decode steps)."""
    check_alpha(alpha)
    if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
        raise RepetitionError(f"n_features={n_features!r}; expected an integer >= 1 (features steered per layer)")
    features = found.features if isinstance(found, RepetitionFeatures) else dict(found)
    layers = sorted(features) if layers is None else list(layers)
    missing = [n for n in layers if n not in features]
    if missing:
        raise RepetitionError(f"no repetition features for layer(s) {missing}; found layers {sorted(features)}")
    terms = tuple(Term(n, int(f), alpha) for n in layers for f in list(features[n])[:n_features])
    return SteeringSpec(terms, direction_norm=direction_norm, positions="generated")


@contextmanager
def _add_at_decode(backend: Backend, vectors: Mapping[int, torch.Tensor], prompt_lengths: torch.Tensor,
                   rows: torch.Tensor | None = None) -> Iterator[None]:
    """Add ``vectors[n]`` to block n's output at generated positions (``position_ids >= prompt_lengths[row]``),
    only on ``rows`` (a bool mask over the batch; default all): one batched generate steers some rows only."""
    cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def edit(hidden: torch.Tensor, layer: int, kwargs: dict) -> torch.Tensor:
        pos = kwargs.get("position_ids")
        if pos is None:
            raise RepetitionError("this model's decoder layers receive no position_ids; decode steps cannot be found")
        pos = (pos[0] if pos.ndim == 3 else pos).expand(hidden.shape[0], -1).to(hidden.device)
        key = (layer, hidden.device)
        if key not in cache:
            keep = torch.ones(hidden.shape[0], dtype=torch.bool) if rows is None else rows
            cache[key] = (vectors[layer].to(hidden.device), prompt_lengths.to(hidden.device).reshape(-1, 1),
                          keep.to(hidden.device).reshape(-1, 1))
        vector, plen, keep = cache[key]
        mask = ((pos >= plen) & keep).unsqueeze(-1)
        return (hidden.float() + mask * vector).to(hidden.dtype)

    with backend.edit(dict.fromkeys(vectors, edit)):
        yield


@dataclass(frozen=True)
class RolloutGroup:
    """G completions of one prompt; ``logprobs[i][t]`` = log π_old(token t of completion i), unsteered."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    steered: list[bool]


def _cut(row: list[int], eos: int | None) -> list[int]:
    return row[: row.index(eos) + 1] if eos is not None and eos in row else row


@torch.no_grad()
def old_logprobs(model: object, prompt_ids: Sequence[int], completions: Sequence[Sequence[int]], *,
                 temperature: float = 1.0, pad_token_id: int = 0) -> list[list[float]]:
    """log-probs of each completion's tokens after the prompt, in one forward of the model as it is (no edit).

    Logits are divided by ``temperature`` first, as TRL's GRPO does for its own log-probs.
    """
    backend = as_backend(model)
    plen = len(prompt_ids)
    ids, mask, _ = pad([[*prompt_ids, *c] for c in completions], pad_token_id)  # right padding: positions agree
    logits = backend.logits(ids, mask, last=ids.shape[1] - plen + 1)[:, :-1].float() / temperature
    picked = logits.log_softmax(-1).gather(-1, ids[:, plen:, None].to(logits.device))[..., 0].cpu()
    return [picked[row, : len(c)].tolist() for row, c in enumerate(completions)]


def rollout_groups(model: object, prompts: Sequence[Sequence[int]], spec: SteeringSpec,
                   saes: Mapping[int, QwenScopeSAE], *, group_size: int, max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | None = None,
                   pad_token_id: int | None = None, groups_per_batch: int = 8,
                   progress: bool = False) -> list[RolloutGroup]:
    """Per prompt (token ids), G−1 normal samples and one steered by ``spec`` (R33, decode steps), flagged.

    ``groups_per_batch`` groups are sampled by one left-padded ``generate`` in which only each group's last row
    is steered (the other rows sample exactly as without the hook); then one unsteered forward per group gives
    the old log-probs of its G completions.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise RepetitionError(f"group_size={group_size!r}; a group needs G >= 2 (G-1 normal samples + 1 steered)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RepetitionError("every prompt needs at least one token id; got an empty prompt or no prompts")
    if groups_per_batch < 1:
        raise RepetitionError(f"groups_per_batch={groups_per_batch!r}; expected an integer >= 1")
    for term in spec.terms:
        check_alpha(term.alpha)
    backend = as_backend(model)
    backend.check_layers(spec.layers)
    if any(t.clamp is not None for t in spec.terms):
        raise RepetitionError("rollout steering adds feature directions (R33); clamp terms are not supported here")
    backend.check_generation(max(len(p) for p in prompts), max_new_tokens)
    vectors = steering_vectors(spec, saes)
    flags = [row == group_size - 1 for row in range(group_size)]
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    prompts = [list(p) for p in prompts]
    groups = []
    batches = [prompts[i : i + groups_per_batch] for i in range(0, len(prompts), groups_per_batch)]
    for batch in tqdm(batches, disable=not progress, desc="rollout groups", unit="batch"):
        rows = [p for p in batch for _ in range(group_size)]
        width = max(len(p) for p in rows)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], dtype=torch.long)
        with _add_at_decode(backend, vectors, torch.tensor([len(p) for p in rows]), torch.tensor(flags * len(batch))):
            new = backend.generate(ids, mask, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                   top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad).tolist()
        for g, prompt in enumerate(batch):
            completions = [_cut(row, eos_token_id) for row in new[g * group_size : (g + 1) * group_size]]
            logprobs = old_logprobs(backend, prompt, completions, temperature=temperature, pad_token_id=pad)
            groups.append(RolloutGroup(prompt, completions, logprobs, list(flags)))
    return groups


def repetition_reward(completion_ids: Sequence[Sequence[int]], *, endless_penalty: float = 1.0,
                      **params: int) -> list[float]:
    """A reward that penalises repetition: −(repeated fraction) − ``endless_penalty`` if the loop runs to the end.

    Steered negatives only teach anything if the reward penalises repetition; add this to the task reward.
    """
    return [-repeated_fraction(c, **params) - endless_penalty * is_repetitive(c, endless=True, **params)
            for c in completion_ids]


@dataclass(frozen=True)
class CausalRow:
    alpha: float
    features: float
    """Repeat ratio with the repetition features steered by α."""
    random: float
    """Repeat ratio with a random direction of the same norm per layer, same α."""


@dataclass(frozen=True)
class CausalCheck:
    """(R33) sweep: repeat ratio of greedy completions against α, repetition features vs a random direction."""

    prompts: int
    max_new_tokens: int
    rows: list[CausalRow]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@torch.no_grad()
def continuations(model: object, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
                  vectors: Mapping[int, torch.Tensor] | None = None) -> list[list[int]]:
    """Greedy continuations of ``prompts`` in one left-padded batch, cut after EOS; ``vectors[n]`` (if given) is
    added to block n's output at every decode step (R33)."""
    prompts = check_texts(prompts, "prompts")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise RepetitionError(f"max_new_tokens={max_new_tokens!r}; expected an integer >= 1")
    backend = as_backend(model)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if not all(encoded):
        raise RepetitionError(f"{sum(not e for e in encoded)} prompt(s) tokenize to nothing; pass non-empty prompts")
    width, eos = max(len(e) for e in encoded), tokenizer.eos_token_id
    backend.check_generation(width, max_new_tokens)  # one left-padded batch: the longest prompt counts
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with _add_at_decode(backend, vectors or {}, torch.tensor([len(e) for e in encoded])):
        new = backend.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    return [_cut(row, eos) for row in new.tolist()]


def extend(model: object, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48) -> list[str]:
    """Each prompt followed by its decoded greedy continuation: discovery texts from the model's own loops."""
    new = continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return [p + tokenizer.decode(ids, skip_special_tokens=True) for p, ids in zip(prompts, new, strict=True)]


def causal_check(model: object, tokenizer, prompts: Sequence[str], spec: SteeringSpec,
                 saes: Mapping[int, QwenScopeSAE], alphas: Sequence[float], *, max_new_tokens: int = 32,
                 seed: int = 0, progress: bool = False, **params: int) -> CausalCheck:
    """Repeat ratio of greedy continuations with ``spec``'s directions scaled to each α (α < 0 suppresses),
    beside a random direction of the same norm per layer (seeded): the check that the features are causal."""
    if not alphas:
        raise RepetitionError("no strengths to sweep; pass alphas, e.g. [-8.0, 0.0, 8.0]")
    alphas = [check_alpha(a) for a in alphas]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise RepetitionError(f"seed={seed!r}; expected an integer in 0..2**63-1")
    unit = steering_vectors(SteeringSpec(tuple(Term(t.layer, t.feature, 1.0) for t in spec.terms),
                                         direction_norm=spec.direction_norm), saes)
    g = torch.Generator().manual_seed(seed)
    random = {n: (r := torch.randn(v.shape, generator=g)) * (v.norm() / r.norm()) for n, v in unit.items()}

    def ratio(vectors: Mapping[int, torch.Tensor], alpha: float) -> float:
        scaled = {n: alpha * v for n, v in vectors.items()}
        return repeat_ratio(continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens, vectors=scaled),
                            **params)

    rows = []
    for a in tqdm(alphas, disable=not progress, desc="alpha"):
        steered = ratio(unit, a)
        rows.append(CausalRow(a, steered, steered if a == 0 else ratio(random, a)))  # α = 0: both add nothing
    return CausalCheck(len(prompts), max_new_tokens, rows)
