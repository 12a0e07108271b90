"""Feature explanations in words, and how far to trust them: delphi's explain-then-score loop (Paulo et al. 2024,
"Automatically interpreting millions of features in large language models") on the cards' harvest.

    >>> corpus = harvest_corpus(model, tok, texts, sae, layer=3)          # the one model pass, as for cards
    >>> rows = explain_features(llm, corpus, tok, [12, 40], model=model, sae=sae, release="qscope-demo-qwen3-4l")
    >>> rows[0].explanation, rows[0].detection.value, rows[0].detection.low, rows[0].fuzzing.value
    >>> write_explanations("explanations.jsonl", rows)                   # one JSON line per feature, with settings

For each feature the texts where it fires are ranked by their peak activation (one context per text, as on the
card). ``Sampling`` splits them: the explainer sees ``n_train`` contexts (by default drawn evenly from
``n_quantiles`` activation quantiles, delphi's default), with the tokens where the feature fires marked
``<<like this>>`` and each marked token's activation on a 0-10 scale, plus, optionally, the tokens its decoder
direction promotes. The held-out contexts score the explanation:

- **detection**: the scorer sees the explanation and unmarked contexts, ``n_test`` activating and
  ``n_non_activating`` random windows where the feature is silent, and says which activate it; the score is the
  balanced accuracy (mean of the true-positive and true-negative rates; 0.5 is chance, 1 perfect).
- **fuzzing**: the scorer sees each held-out activating context twice, once with the feature's tokens marked
  and once with as many other tokens marked, and says which markings fit the explanation; balanced accuracy again.

Each score carries its counts and a 95% bootstrap interval that resamples each class on its own
(``scipy.stats.bootstrap``, percentile). An answer that cannot be read counts as "no" for its contexts (so an
unreadable scorer scores at chance) and is counted in ``n_unparsed``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from qscope_plugin.errors import MalformedFileError, QScopeError, feature_out_of_range
from qscope_plugin.llm import LLM, strip_thinking
from qscope_plugin.recipes.inspection import Context, Corpus, _logit_effects, _peaks, _token_pieces, _window
from qscope_plugin.recipes.inspection import _contexts as _card_contexts
from qscope_plugin.tokens import Piece, lone_token_texts

__all__ = ["ExplainError", "FeatureExplanation", "Sampling", "Score", "balanced_accuracy", "densest_features",
           "detection_prompt",
           "explain_features", "explain_prompt", "fuzzing_prompt", "mark", "parse_explanation", "parse_labels",
           "read_explanations", "score_labels", "write_explanations"]

FORMAT = "qscope-explanations/1"
"""The ``format`` field of every line of an explanations file."""
MAX_CONTEXTS = 10_000
"""Activating contexts ranked per feature at most (delphi's ``max_examples``)."""


class ExplainError(QScopeError, ValueError):
    """Sampling settings, features or an explanations file that cannot be used."""


class ExplanationsFileError(ExplainError, MalformedFileError):
    """An explanations file that is truncated, damaged or not one (the message names the file and the line)."""


@dataclass(frozen=True)
class Sampling:
    """Which contexts the explainer and the scorers see. Defaults are delphi's (``ExperimentConfig``) except where
    noted."""

    train: Literal["top", "quantiles", "random"] = "quantiles"
    """How the explainer's contexts are drawn from the ranked activating ones: the strongest, evenly from each
    activation quantile (delphi's default; shows weak firings too), or uniformly."""
    n_train: int = 40
    """Contexts shown to the explainer (delphi: 40)."""
    n_quantiles: int = 10
    """Activation quantiles for ``train="quantiles"`` and for drawing the held-out set (delphi: 10)."""
    n_test: int = 50
    """Held-out activating contexts scored, drawn evenly from the quantiles of those left (delphi: 50)."""
    n_non_activating: int = 50
    """Random windows where the feature is silent, for detection (delphi: 50, source "random")."""
    window: int = 16
    """Tokens kept on each side of a context's peak: 33-token contexts (delphi: 32-token examples)."""
    batch: int = 10
    """Contexts per scoring prompt (the explainer sees all its contexts in one prompt)."""
    n_promoted: int = 10
    """Tokens the decoder direction promotes most (the card's logit effects) shown to the explainer; 0: none."""
    seed: int = 22
    """Seed of every random draw (delphi's)."""

    def __post_init__(self) -> None:
        if self.train not in ("top", "quantiles", "random"):
            raise ExplainError(f"train={self.train!r}; expected 'top', 'quantiles' or 'random'")
        for name, least, most in (("n_train", 1, 1000), ("n_quantiles", 1, 100), ("n_test", 0, 5000),
                                  ("n_non_activating", 0, 5000), ("window", 0, 256), ("batch", 1, 100),
                                  ("n_promoted", 0, 100), ("seed", 0, 2**32 - 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
                raise ExplainError(f"{name}={value!r}; expected an integer in {least}..{most}")


@dataclass(frozen=True)
class Score:
    """A balanced accuracy with what it rests on."""

    value: float
    """Mean of the true-positive and true-negative rates: 0.5 is chance, 1 perfect."""
    low: float
    high: float
    """95% bootstrap interval (percentile; each class resampled on its own)."""
    n_positive: int
    n_negative: int
    """Items of each class scored."""
    true_positive_rate: float
    true_negative_rate: float
    n_unparsed: int = 0
    """Items whose answer could not be read (counted as answered "no")."""


@dataclass(frozen=True)
class FeatureExplanation:
    """One feature's explanation and scores, with everything that made them (one line of an explanations file)."""

    release: str
    layer: int
    feature: int
    explanation: str
    detection: Score | None
    fuzzing: Score | None
    n_activating: int
    """Texts where the feature fires in the corpus (each gives at most one context)."""
    n_train: int
    """Contexts the explainer saw."""
    explainer: str
    scorer: str
    settings: dict = field(default_factory=dict)
    """The ``Sampling`` and both clients' settings."""
    format: str = FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> FeatureExplanation:
        scores = {k: None if data.get(k) is None else Score(**data[k]) for k in ("detection", "fuzzing")}
        return cls(**{**data, **scores})


# ---------------------------------------------------------------------------------------------------- prompts


def _text(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """Tokens joined, each run of marked tokens inside ``<<`` ``>>`` (leading spaces kept outside the marks)."""
    out, inside = [], False
    for token, on in zip(tokens, marked, strict=True):
        if on and not inside:
            stripped = token.lstrip()
            out.append(token[:len(token) - len(stripped)] + "<<" + stripped)
        elif not on and inside:
            out.append(">>" + token)
        else:
            out.append(token)
        inside = on
    return "".join(out) + (">>" if inside else "")


def mark(context: Context, marked: Sequence[bool] | None = None) -> str:
    """The context's text with the tokens where the feature fires (or ``marked``) between ``<<`` and ``>>``."""
    return _text(context.tokens, [a > 0 for a in context.activations] if marked is None else marked)


def _plain(context: Context) -> str:
    return "".join(context.tokens)


def explain_prompt(contexts: Sequence[Context], promoted: Sequence[str] = (), max_activation: float | None = None
                   ) -> str:
    """The explainer's prompt: the contexts marked, each followed by its marked tokens' activations on 0-10."""
    top = max_activation or max((max(c.activations, default=0.0) for c in contexts), default=0.0) or 1.0
    lines = ["We are studying one feature of a language model. Below are text excerpts where it is active; the "
             "tokens where it fires are marked <<like this>> (a run of consecutive tokens as <<one span>>). After "
             "each excerpt, the marked tokens' activation strengths from 0 to 10.", ""]
    for i, c in enumerate(contexts, 1):
        strengths = ", ".join(f"{t.strip() or repr(t)!s} ({round(10 * a / top)})"
                              for t, a in zip(c.tokens, c.activations, strict=True) if a > 0)
        lines += [f"Excerpt {i}: {mark(c)}", f"Activations: {strengths}", ""]
    if promoted:
        lines += ["Tokens the feature makes more likely next: " + ", ".join(repr(t) for t in promoted), ""]
    lines.append("In one short sentence, what does the feature detect? Answer with the line "
                 "'Explanation: <sentence>' and nothing else.")
    return "\n".join(lines)


def parse_explanation(answer: str) -> str:
    """The sentence after the last ``Explanation:`` (else the answer's first non-blank line), unquoted, at most
    300 characters; "" when the answer is empty."""
    text = strip_thinking(answer)
    found = re.findall(r"explanation\s*\]?\s*:\s*(.+)", text, flags=re.IGNORECASE)
    line = found[-1] if found else next((ln for ln in text.splitlines() if ln.strip()), "")
    return line.strip().strip("\"'`*").strip()[:300]


def detection_prompt(explanation: str, texts: Sequence[str]) -> str:
    """The detection scorer's prompt for one batch of unmarked excerpts."""
    return _scoring_prompt(explanation, texts, "numbered text excerpts. For each one, answer 1 if the feature is "
                           "active somewhere in it (the description fits it), else 0.")


def fuzzing_prompt(explanation: str, texts: Sequence[str]) -> str:
    """The fuzzing scorer's prompt for one batch of marked excerpts."""
    return _scoring_prompt(explanation, texts, "numbered text excerpts with some tokens marked <<like this>>. For "
                           "each one, answer 1 if the marked tokens are the ones the description is about, else 0.")


def _scoring_prompt(explanation: str, texts: Sequence[str], task: str) -> str:
    """Both scorers' prompt: the explanation, ``Below are N {task}``, the numbered excerpts, the answer format."""
    lines = [f'A feature of a language model is described as: "{explanation}"', "",
             f"Below are {len(texts)} {task}", ""]
    lines += [f"Excerpt {i}: {t}" for i, t in enumerate(texts, 1)]
    lines += ["", f"Answer with a list of exactly {len(texts)} digits, e.g. [1, 0, ...], and nothing else."]
    return "\n".join(lines)


def parse_labels(answer: str, n: int) -> list[int] | None:
    """The ``n`` 0/1 labels of a scorer's answer: the last bracketed list of ``n`` 0/1 digits, else the answer's
    0/1 numbers if there are exactly ``n``; None when neither reads."""
    text = strip_thinking(answer)
    for inside in reversed(re.findall(r"\[([^\[\]]*)\]", text)):
        digits = re.findall(r"(?<!\d)[01](?!\d)", inside)
        if len(digits) == n:
            return [int(d) for d in digits]
    digits = re.findall(r"(?<![\d.])[01](?![\d.])", text)
    return [int(d) for d in digits] if len(digits) == n else None


# ----------------------------------------------------------------------------------------------------- scores


def balanced_accuracy(positive: np.ndarray, negative: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean of the true-positive rate (answers 1 on positives) and true-negative rate (answers 0 on negatives)."""
    return (np.mean(positive, axis=axis) + 1 - np.mean(negative, axis=axis)) / 2


def score_labels(truth: Sequence[int], answered: Sequence[int], *, n_unparsed: int = 0, seed: int = 0,
                 n_resamples: int = 2000) -> Score | None:
    """Balanced accuracy of ``answered`` against ``truth`` (0/1 each) with its 95% interval; None without both
    classes, and the whole [0, 1] as interval when a class has a single item."""
    from scipy.stats import bootstrap

    truth, answered = np.asarray(truth, dtype=int), np.asarray(answered, dtype=float)
    positive, negative = answered[truth == 1], answered[truth == 0]
    if not len(positive) or not len(negative):
        return None
    value = float(balanced_accuracy(positive, negative))
    if min(len(positive), len(negative)) < 2:
        low, high = 0.0, 1.0  # one item of a class says nothing about its rate
    elif np.ptp(positive) == 0 and np.ptp(negative) == 0:
        low = high = value  # every resample is the same
    else:
        ci = bootstrap((positive, negative), balanced_accuracy, n_resamples=n_resamples, method="percentile",
                       vectorized=True, paired=False, rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return Score(value, low, high, len(positive), len(negative), float(positive.mean()),
                 float(1 - negative.mean()), n_unparsed)


# --------------------------------------------------------------------------------------------------- sampling


def _quantile_draw(n_ranked: int, n: int, n_quantiles: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into a ranked list: ``n`` drawn as evenly as possible from ``n_quantiles`` equal-count groups."""
    if n >= n_ranked:
        return np.arange(n_ranked)
    groups = [g for g in np.array_split(np.arange(n_ranked), min(n_quantiles, n_ranked)) if len(g)]
    wanted = np.full(len(groups), n // len(groups)) + (np.arange(len(groups)) < n % len(groups))
    return np.sort(np.concatenate([rng.choice(g, min(w, len(g)), replace=False) for g, w in
                                   zip(groups, wanted, strict=True)]))


def _split(n_ranked: int, sampling: Sampling, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into the ranked activating contexts, disjoint. With fewer contexts than
    ``n_train + n_test`` they are shared in that proportion (at least one to train), so that some are always
    held out for scoring."""
    n_train = sampling.n_train
    if n_ranked < sampling.n_train + sampling.n_test:
        n_train = max(1, n_ranked * sampling.n_train // (sampling.n_train + sampling.n_test))
    if sampling.train == "top":
        train = np.arange(min(n_train, n_ranked))
    elif sampling.train == "random":
        train = np.sort(rng.choice(n_ranked, min(n_train, n_ranked), replace=False))
    else:
        train = _quantile_draw(n_ranked, n_train, sampling.n_quantiles, rng)
    rest = np.setdiff1d(np.arange(n_ranked), train)
    test = rest[_quantile_draw(len(rest), sampling.n_test, sampling.n_quantiles, rng)] if len(rest) else rest
    return train, test


def _silent_centers(corpus: Corpus, feature: int, n: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` token rows, at most one per text, whose ±``window`` tokens (within the text) the feature does
    not fire on; ``20 n`` random rows are tried at most (a feature that fires nearly everywhere gives fewer)."""
    fires = np.zeros(len(corpus.text), dtype=bool)
    fires[corpus.firing(feature)[0]] = True
    near = np.convolve(fires, np.ones(2 * window + 1, dtype=int), mode="same") > 0
    found, seen_texts = [], set()
    for row in rng.integers(0, len(corpus.text), size=20 * n if n else 0):
        text = int(corpus.text[row])
        if near[row] and fires[max(corpus.starts[text], row - window):min(corpus.starts[text + 1],
                                                                         row + window + 1)].any():
            continue
        if text in seen_texts:
            continue
        seen_texts.add(text)
        found.append(int(row))
        if len(found) == n:
            break
    return np.array(found, dtype=np.int64)


@dataclass
class _Plan:
    """One feature's contexts and prompts."""

    feature: int
    n_activating: int
    train: list[Context]
    test: list[Context]
    silent: list[Context]
    promoted: list[str]
    max_activation: float


def _contexts(corpus: Corpus, feature: int, rows: np.ndarray, window: int, pieces: dict[int, Piece]
              ) -> list[Context]:
    """Contexts around ``rows`` built as the cards build theirs (tokens shown as ``qscope_plugin.tokens`` does)."""
    return _card_contexts(corpus, _window(corpus, feature, rows, window), pieces) if len(rows) else []


def _plans(corpus: Corpus, tokenizer, features: Sequence[int], sampling: Sampling, promoted: list[list[str]]
           ) -> list[_Plan]:
    chosen = []
    for f in features:
        rows, values = corpus.firing(f)
        rng = np.random.default_rng([sampling.seed, corpus.layer, f])
        peaks = _peaks(corpus.text, rows, values, MAX_CONTEXTS) if len(rows) else np.zeros(0, dtype=np.int64)
        train, test = _split(len(peaks), sampling, rng)
        silent = _silent_centers(corpus, f, sampling.n_non_activating, sampling.window, rng)
        chosen.append((f, len(peaks), peaks[train], peaks[test], silent, float(values.max()) if len(values) else 0.0))
    windows = [np.concatenate([c[2], c[3], c[4]]) for c in chosen]
    ids = np.concatenate([corpus.token_ids[np.clip(w[:, None] + np.arange(-sampling.window, sampling.window + 1), 0,
                                                   len(corpus.token_ids) - 1)].ravel() for w in windows]
                         + [np.zeros(0, dtype=np.int64)])
    pieces = _token_pieces(tokenizer, ids)
    return [_Plan(f, n, _contexts(corpus, f, train, sampling.window, pieces),
                  _contexts(corpus, f, test, sampling.window, pieces),
                  _contexts(corpus, f, silent, sampling.window, pieces), promoted[i], top)
            for i, (f, n, train, test, silent, top) in enumerate(chosen)]


def _fuzzed(context: Context, rng: np.random.Generator) -> list[bool] | None:
    """As many tokens marked as the feature fires on, all chosen among those it does not fire on; None if the
    window has too few."""
    firing = np.array([a > 0 for a in context.activations])
    quiet = np.flatnonzero(~firing)
    if len(quiet) < max(firing.sum(), 1):
        return None
    marked = np.zeros(len(firing), dtype=bool)
    marked[rng.choice(quiet, max(int(firing.sum()), 1), replace=False)] = True
    return marked.tolist()


def _items(plan: _Plan, sampling: Sampling, layer: int) -> dict[str, list[tuple[str, int]]]:
    """Detection and fuzzing items ``(text shown, truth)``, shuffled (seeded) so a batch's order tells nothing."""
    rng = np.random.default_rng([sampling.seed, layer, plan.feature, 1])
    detection = [(_plain(c), 1) for c in plan.test] + [(_plain(c), 0) for c in plan.silent]
    fuzzing = []
    for c in plan.test:
        wrong = _fuzzed(c, rng)
        if wrong is not None:
            fuzzing += [(mark(c), 1), (mark(c, wrong), 0)]
    return {name: [items[i] for i in rng.permutation(len(items))] for name, items in
            (("detection", detection), ("fuzzing", fuzzing))}


# ----------------------------------------------------------------------------------------------------- driver


def explain_features(llm: LLM, corpus: Corpus, tokenizer, features: Sequence[int], *, model: object = None,
                     sae=None, scorer: LLM | None = None, sampling: Sampling | None = None, release: str = "",
                     score: bool = True, progress: bool = True) -> list[FeatureExplanation]:
    """Explain ``features`` of ``corpus``'s layer with ``llm`` and score each explanation with ``scorer``
    (default: ``llm``).

    Args:
        llm: the explainer (``qscope_plugin.llm`` client); its cache makes a re-run or a resumed run free.
        scorer: the detection and fuzzing scorer, another client or the same.
        corpus: ``inspection.harvest_corpus`` of the texts, at the SAE's layer.
        model, sae: the backbone and the SAE, for the promoted tokens (skipped when either is None or
            ``sampling.n_promoted`` is 0).
        release: names the SAEs in the records and in every cache key.
        score: False explains only.

    A feature that never fires on the corpus gets an empty explanation and no scores (nothing to show).
    """
    sampling = sampling or Sampling()
    scorer = scorer or llm
    features = list(dict.fromkeys(int(f) for f in features))
    d_sae = corpus.by_feature.shape[1]
    for f in features:
        if not 0 <= f < d_sae:
            raise feature_out_of_range(f, d_sae)
    promoted: list[list[str]] = [[] for _ in features]
    if model is not None and sae is not None and sampling.n_promoted and features:
        from qscope_plugin.backends import as_backend

        top, _ = _logit_effects(as_backend(model), sae, features, sampling.n_promoted)
        promoted = [lone_token_texts(tokenizer, row) for row in top.indices.tolist()]
    plans = _plans(corpus, tokenizer, features, sampling, promoted)
    layer = corpus.layer
    explained = [p for p in plans if p.train]
    answers = llm.map([explain_prompt(p.train, p.promoted, p.max_activation) for p in explained],
                      scopes=[(release, layer, p.feature) for p in explained],
                      progress="explaining" if progress else None)
    explanation = {p.feature: parse_explanation(a) for p, a in zip(explained, answers, strict=True)}

    batches: list[tuple[int, str, list[tuple[str, int]]]] = []  # (feature, scorer kind, items)
    if score:
        for p in explained:
            for kind, items in _items(p, sampling, layer).items():
                batches += [(p.feature, kind, items[i:i + sampling.batch])
                            for i in range(0, len(items), sampling.batch)]
    prompt_of = {"detection": detection_prompt, "fuzzing": fuzzing_prompt}
    replies = scorer.map([prompt_of[kind](explanation[f], [t for t, _ in items]) for f, kind, items in batches],
                         scopes=[(release, layer, f) for f, _, _ in batches], progress="scoring" if progress else None)
    collected: dict[tuple[int, str], tuple[list[int], list[int], int]] = {}
    for (f, kind, items), reply in zip(batches, replies, strict=True):
        truth, answered, unparsed = collected.setdefault((f, kind), ([], [], 0))
        labels = parse_labels(reply, len(items))
        truth += [t for _, t in items]
        answered += labels if labels is not None else [0] * len(items)
        collected[f, kind] = (truth, answered, unparsed + (0 if labels is not None else len(items)))

    settings = {"sampling": asdict(sampling), "explainer": llm.settings(), "scorer": scorer.settings()}
    out = []
    for p in plans:
        scores = {}
        for kind in ("detection", "fuzzing"):
            truth, answered, unparsed = collected.get((p.feature, kind), ([], [], 0))
            scores[kind] = score_labels(truth, answered, n_unparsed=unparsed, seed=sampling.seed)
        out.append(FeatureExplanation(release, layer, p.feature, explanation.get(p.feature, ""),
                                      scores["detection"], scores["fuzzing"], p.n_activating, len(p.train),
                                      llm.name, scorer.name, settings))
    return out


def densest_features(corpus: Corpus, top: int) -> list[int]:
    """The ``top`` features of highest firing density in ``corpus`` among those that fire, densest first (the
    cards' ``top``)."""
    counts = np.diff(corpus.by_feature.indptr)
    densest = np.argsort(-counts, kind="stable")[:top]
    return densest[counts[densest] > 0].tolist()


def prompt_count(n_features: int, sampling: Sampling, score: bool = True) -> int:
    """LLM calls of ``explain_features`` for features with enough contexts (an upper bound): one explanation,
    then ``batch``-sized detection and fuzzing prompts."""
    if not score:
        return n_features
    detection = -(-(sampling.n_test + sampling.n_non_activating) // sampling.batch)
    fuzzing = -(-2 * sampling.n_test // sampling.batch)
    return n_features * (1 + detection + fuzzing)


# ------------------------------------------------------------------------------------------------------ files


def write_explanations(path: str | Path, rows: Iterable[FeatureExplanation]) -> Path:
    """One JSON line per feature (``FeatureExplanation.to_json``), written to a temporary file then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.to_json(), ensure_ascii=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def read_explanations(path: str | Path) -> list[FeatureExplanation]:
    """The rows of an explanations file, each checked (format, scores in [0, 1], interval around the value).

    Raises:
        ExplanationsFileError: a file that cannot be read or a line that is not a valid record (its line number).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ExplanationsFileError(f"cannot read explanations file {str(path)!r} ({e}); pass a `qscope explain` "
                                    "file") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            row = FeatureExplanation.from_json(data)
            for score in (row.detection, row.fuzzing):
                if score is not None and not (0 <= score.low <= score.value <= score.high <= 1):
                    raise ValueError(f"score {score.value} outside its interval [{score.low}, {score.high}] or [0, 1]")
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise ExplanationsFileError(f"{str(path)!r} line {number} is not an explanation record "
                                        f"({type(e).__name__}: {e}); write the file with `qscope explain`") from None
        rows.append(row)
    return rows
