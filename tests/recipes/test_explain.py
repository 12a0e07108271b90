"""Explanations and their scores (recipes/explain.py) on planted features, with scripted LLMs.

The corpus is built by hand: words are tokens, and feature 1 fires exactly on animal words, feature 2 on digits.
A scripted "oracle" scorer reads each explanation literally (an explanation naming animals makes it answer by
whether an excerpt has an animal, and so on), so a correct explanation must score high, a wrong one near chance.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import bootstrap

from qscope_plugin.llm import LLM, ResponseCache
from qscope_plugin.recipes._harvest import TextCodes
from qscope_plugin.recipes.explain import (
    ExplainError,
    FeatureExplanation,
    Sampling,
    detection_prompt,
    explain_features,
    explain_prompt,
    mark,
    parse_explanation,
    parse_labels,
    read_explanations,
    score_labels,
    write_explanations,
)
from qscope_plugin.recipes.inspection import Context, Corpus

ANIMALS = ["cat", "dog", "horse", "cow", "owl", "fox", "bee", "eel"]
FILLER = ["the", "a", "sat", "on", "mat", "and", "then", "ran", "far", "away", "with", "blue", "red", "hat"]
DIGITS = [str(d) for d in range(10)]


class WordTokenizer:
    """Token id i is the word VOCAB[i] with a leading space (decoded alone, as the cards decode tokens)."""

    vocab = FILLER + ANIMALS + DIGITS

    def decode(self, ids):
        return " " + self.vocab[ids[0]]

    def batch_decode(self, ids):
        return [self.decode(i) for i in ids]


def planted_corpus(n_texts: int = 300, seed: int = 0) -> Corpus:
    """Texts of 24 words; feature 1 fires on animals (strength varies), feature 2 on digits, feature 0 on nothing;
    feature 3 fires at random on filler words (no meaning to find). Two of every three texts have no animal."""
    rng = np.random.default_rng(seed)
    tok = WordTokenizer()
    codes = []
    for t in range(n_texts):
        words = list(rng.choice(FILLER, 24))
        if t % 3 == 0:
            for pos in rng.choice(np.arange(1, 24), 2, replace=False):
                words[pos] = str(rng.choice(ANIMALS))
        if t % 4 == 0:
            words[int(rng.integers(1, 24))] = str(rng.choice(DIGITS))
        ids = torch.tensor([tok.vocab.index(w) for w in words])
        values, indices = torch.zeros(24, 2), torch.zeros(24, 2, dtype=torch.long)
        indices[:, 1] = 3
        for pos, w in enumerate(words):
            if w in ANIMALS:
                values[pos, 0], indices[pos, 0] = 1.0 + rng.random() * 4, 1
            elif w in DIGITS:
                values[pos, 0], indices[pos, 0] = 2.0, 2
            elif rng.random() < 0.05:
                values[pos, 1] = 1.0
        codes.append(TextCodes(ids, {5: values}, {5: indices}))
    return Corpus.concat(codes, 5, 8, exclude_first_token=True)


def _excerpts(prompt: str) -> list[str]:
    return re.findall(r"^Excerpt \d+: (.*)$", prompt, flags=re.MULTILINE)


class Oracle(LLM):
    """Scripted LLM. Explains by naming what the marked tokens are (animals, digits, or "unclear"), or always
    gives ``explanation``; scores by reading the explanation literally: "animal" → does the excerpt (or its marked
    tokens, for fuzzing) hold an animal word, "digit" → a digit, anything else → a coin flip per excerpt."""

    name = "oracle"

    def __init__(self, explanation: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.explanation, self.rng, self.prompts = explanation, np.random.default_rng(seed), []

    def _complete(self, prompt: str, sample_seed: int | None) -> str:
        self.prompts.append(prompt)
        if prompt.startswith("We are studying"):
            if self.explanation is not None:
                return f"Explanation: {self.explanation}"
            marked = " ".join(re.findall(r"<<(.*?)>>", prompt)).split()
            if sum(w in ANIMALS for w in marked) > len(marked) / 2:
                return "<think>they are all animals</think>Explanation: names of animals."
            if sum(w in DIGITS for w in marked) > len(marked) / 2:
                return "Explanation: single digits."
            return "Explanation: unclear."
        explanation = re.search(r'described as: "(.*)"', prompt)[1]
        words = ANIMALS if "animal" in explanation else DIGITS if "digit" in explanation else None
        labels = []
        for text in _excerpts(prompt):
            seen = " ".join(re.findall(r"<<(.*?)>>", text)) if "marked" in prompt.split("\n")[2] else text
            if words is None:
                labels.append(int(self.rng.integers(2)))
            else:
                labels.append(int(any(w in words for w in seen.split())))
        return str(labels)


SMALL = Sampling(n_train=20, n_test=30, n_non_activating=30, window=6, n_promoted=0)


def test_correct_explanation_outscores_wrong_and_random_scores_at_chance():
    corpus, tok = planted_corpus(), WordTokenizer()
    right = explain_features(Oracle(), corpus, tok, [1, 2], sampling=SMALL, release="planted", progress=False)
    assert [r.explanation for r in right] == ["names of animals.", "single digits."]
    wrong = explain_features(Oracle("single digits"), corpus, tok, [1], sampling=SMALL, progress=False)[0]
    coin = explain_features(Oracle("the colour of hats"), corpus, tok, [1], sampling=SMALL, progress=False)[0]
    animals = right[0]
    assert animals.detection.value == 1.0 and animals.fuzzing.value == 1.0
    assert animals.detection.n_positive == 30 and animals.detection.n_negative == 30
    assert animals.fuzzing.n_positive == animals.fuzzing.n_negative == 30
    assert wrong.detection.value <= 0.5 + 1e-9 and animals.detection.value - wrong.detection.value >= 0.4
    assert animals.fuzzing.value - wrong.fuzzing.value >= 0.4
    for score in (coin.detection, coin.fuzzing):  # coin flips: chance, inside the interval
        assert score.low <= 0.5 <= score.high and abs(score.value - 0.5) < 0.2
    assert animals.detection.high == 1.0 and coin.detection.high - coin.detection.low > 0.1


def test_prompts_mark_firing_tokens_and_hold_out_the_training_contexts():
    corpus, tok = planted_corpus(), WordTokenizer()
    llm = Oracle()
    explain_features(llm, corpus, tok, [1], sampling=SMALL, progress=False)
    shown = _excerpts(llm.prompts[0])
    assert len(shown) == 20 and all("<<" in t for t in shown)
    marked = {w for t in shown for w in " ".join(re.findall(r"<<(.*?)>>", t)).split()}
    assert marked <= set(ANIMALS)
    scored = {t for p in llm.prompts[1:] if "marked <<" not in p for t in _excerpts(p)}
    assert not scored & {t.replace("<<", "").replace(">>", "") for t in shown}  # held out
    assert "(10)" in llm.prompts[0]  # the strongest token of the set is at 10 on the 0-10 scale


def test_a_silent_feature_is_not_explained_and_sampling_is_checked():
    rows = explain_features(Oracle(), planted_corpus(30), WordTokenizer(), [0], sampling=SMALL, progress=False)
    assert rows[0].explanation == "" and rows[0].detection is None and rows[0].n_activating == 0
    with pytest.raises(ExplainError, match="n_train=0"):
        Sampling(n_train=0)
    with pytest.raises(ExplainError, match="train='best'"):
        Sampling(train="best")


def test_mark_and_parsers():
    c = Context(0, 0, 1, [" the", " big", " cat", " sat"], [0.0, 1.0, 2.0, 0.0])
    assert mark(c) == " the <<big cat>> sat"
    assert mark(c, [True, False, False, True]) == " <<the>> big cat <<sat>>"
    assert "big (5), cat (10)" in explain_prompt([c])
    assert parse_explanation("<think>hmm</think>\nExplanation: \"Animal names.\"") == "Animal names."
    assert parse_explanation("Animal names\nmore") == "Animal names"
    assert parse_labels("sure: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_labels("1 0 1", 3) == [1, 0, 1] and parse_labels("[1, 0]", 3) is None
    assert parse_labels("Excerpt 1: 1, excerpt 2: 0", 2) is None  # ambiguous numbering is not read
    assert "Excerpt 2: b" in detection_prompt("x", ["a", "b"])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 1), min_size=2, max_size=60), st.integers(0, 2**16))
def test_score_is_balanced_accuracy_with_a_stratified_bootstrap_interval(truth, seed):
    rng = np.random.default_rng(seed)
    answered = rng.integers(0, 2, len(truth))
    score = score_labels(truth, answered, seed=seed, n_resamples=500)
    truth = np.array(truth)
    if truth.min() == truth.max():
        assert score is None
        return
    tpr = answered[truth == 1].mean()
    tnr = 1 - answered[truth == 0].mean()
    assert score.value == pytest.approx((tpr + tnr) / 2) and score.low <= score.value + 1e-12 <= score.high + 2e-12
    assert score.n_positive == (truth == 1).sum() and score.low >= 0 and score.high <= 1


def test_interval_matches_a_brute_force_stratified_bootstrap():
    truth = [1] * 40 + [0] * 40
    answered = [1] * 30 + [0] * 10 + [0] * 25 + [1] * 15
    score = score_labels(truth, answered, seed=3, n_resamples=4000)
    rng = np.random.default_rng(7)
    pos, neg = np.array(answered[:40]), np.array(answered[40:])
    stats = [(rng.choice(pos, 40).mean() + 1 - rng.choice(neg, 40).mean()) / 2 for _ in range(4000)]
    low, high = np.percentile(stats, [2.5, 97.5])
    assert score.value == pytest.approx((0.75 + 25 / 40) / 2)
    assert score.low == pytest.approx(low, abs=0.02) and score.high == pytest.approx(high, abs=0.02)
    scipy_ci = bootstrap((pos, neg), lambda a, b, axis: (a.mean(axis) + 1 - b.mean(axis)) / 2, paired=False,
                         method="percentile", rng=np.random.default_rng(3), n_resamples=4000).confidence_interval
    assert score.low == pytest.approx(scipy_ci.low, abs=0.01)


def test_file_round_trip_and_cache_makes_a_rerun_free(tmp_path):
    corpus, tok = planted_corpus(), WordTokenizer()
    llm = Oracle().use_cache(tmp_path / "cache.jsonl")
    rows = explain_features(llm, corpus, tok, [1, 2], sampling=SMALL, release="planted", progress=False)
    calls = llm.calls
    again = Oracle().use_cache(ResponseCache(tmp_path / "cache.jsonl"))
    assert explain_features(again, corpus, tok, [1, 2], sampling=SMALL, release="planted", progress=False) == rows
    assert again.calls == 0 and again.cache.hits == calls
    other = Oracle().use_cache(tmp_path / "cache.jsonl")  # another release: other keys
    explain_features(other, corpus, tok, [1], sampling=SMALL, release="other", progress=False)
    assert other.calls > 0
    path = write_explanations(tmp_path / "e.jsonl", rows)
    assert read_explanations(path) == rows
    assert FeatureExplanation.from_json(rows[0].to_json()) == rows[0]
    path.write_text(path.read_text().replace('"value": 1.0', '"value": 1.5', 1))
    with pytest.raises(ExplainError, match="line 1"):
        read_explanations(path)


def test_cache_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = ResponseCache(path)
    cache.put("a", "1")
    with open(path, "a") as f:
        f.write('{"key": "b", "ans')  # killed mid-write
    cache = ResponseCache(path)
    assert cache.get("a") == "1" and cache.get("b") is None
    cache.put("c", "3")
    assert ResponseCache(path).get("c") == "3" and len(ResponseCache(path)) == 2


def test_cards_and_dashboard_carry_explanations_and_scores(tmp_path):
    from qscope_plugin.app.dashboard import card_html, render_dashboard
    from qscope_plugin.cli.dashboard import read_explanations as dashboard_explanations
    from qscope_plugin.recipes.inspection import FeatureCard, Histogram, LogitEffects

    corpus, tok = planted_corpus(), WordTokenizer()
    rows = explain_features(Oracle(), corpus, tok, [1, 2], sampling=SMALL, release="planted", progress=False)
    path = write_explanations(tmp_path / "planted.explanations.jsonl", rows)
    assert dashboard_explanations(str(path), layer=4) == {}
    given = dashboard_explanations(str(path), layer=5)
    assert given[1] == rows[0]
    from qscope_plugin.recipes.inspection import _explained

    explanation, scores = _explained(given[1])
    card = FeatureCard(5, 1, explanation, 10, 1, 0.1, 1.0, 1.0, [], Histogram([0, 1], [1]), LogitEffects([], []), [],
                       scores)
    assert FeatureCard.from_json(card.to_json()) == card
    shown = card_html(card)
    assert "names of animals." in shown and "detection 1.00 [1.00, 1.00] of 60" in shown
    page = render_dashboard([card])
    assert 'data-search="1 names of animals.' in page  # the dashboard's search box matches explanation words


def test_clients_check_their_options_and_map_keeps_order_under_concurrency(tmp_path):
    pytest.importorskip("openai")
    from qscope_plugin.llm import LLMError, OpenAIChat, open_llm

    with pytest.raises(LLMError, match="concurrency=0"):
        OpenAIChat("http://127.0.0.1:9/v1", "m", concurrency=0)
    with pytest.raises(LLMError, match="max_retries=99"):
        OpenAIChat("http://127.0.0.1:9/v1", "m", max_retries=99)
    assert isinstance(open_llm("http://127.0.0.1:9/v1", model="m"), OpenAIChat)

    class Echo(LLM):
        name, concurrency = "echo", 8

        def _complete(self, prompt, sample_seed):
            return prompt.upper()

    echo = Echo().use_cache(tmp_path / "c.jsonl")
    prompts = [f"p{i}" for i in range(50)]
    assert echo.map(prompts, scope=("r", 1, 2)) == [p.upper() for p in prompts] and echo.calls == 50
    assert echo.map(prompts, scope=("r", 1, 2)) == [p.upper() for p in prompts] and echo.calls == 50
    with pytest.raises(LLMError, match="2 scopes for 1 prompts"):
        echo.map(["a"], scopes=[(), ()])

    class Failing(Echo):
        def _complete(self, prompt, sample_seed):
            if prompt == "p3":
                raise OSError("server gone")
            return prompt

    failing = Failing().use_cache(tmp_path / "f.jsonl")
    with pytest.raises(OSError, match="server gone"):
        failing.map(prompts)
    assert len(ResponseCache(tmp_path / "f.jsonl")) == failing.calls  # every answer before the failure is kept


def test_cli_explain_usage_errors_exit_2_and_verify_flags_a_bad_file(tmp_path, capsys):
    from qscope_plugin.cli import main

    assert main(["explain", "--data", "x.jsonl", "--llm", "backbone", "--n-train", "0"]) == 2
    assert "n_train=0" in capsys.readouterr().err
    bad = tmp_path / "bad.explanations.jsonl"
    bad.write_text('{"format": "something else"}\n')
    assert main(["verify", str(bad)]) == 1
    assert "line 1 is not an explanation record" in capsys.readouterr().err


def test_app_search_ranks_by_detection_and_refuses_another_releases_file(tmp_path, capsys, demo_model):
    pytest.importorskip("gradio")
    from qscope_plugin.app.explorer import Explorer
    from qscope_plugin.cli import main
    from qscope_plugin.recipes.explain import Score
    from qscope_plugin.store import DEMO_RELEASE

    def row(layer, feature, text, value, release=DEMO_RELEASE):
        return FeatureExplanation(release, layer, feature, text, Score(value, 0.0, 1.0, 5, 5, 0.5, 0.5), None, 9, 4,
                                  "x", "x")

    rows = [row(3, 28, "Chinese characters", 0.6), row(3, 5, "Chinese punctuation", 0.9), row(2, 7, "the word the", 1)]
    explorer = Explorer(*demo_model, DEMO_RELEASE, explanations={(r.layer, r.feature): r for r in rows})
    assert [value for _, value in explorer.search("CHINESE")] == ["3:5", "3:28"]
    assert [value for _, value in explorer.search("chinese characters")] == ["3:28"]
    assert [value for _, value in explorer.search("7")] == ["2:7"] and explorer.search("  ") == []
    other = write_explanations(tmp_path / "other.jsonl", [row(3, 28, "x", 0.5, release="another-release")])
    assert main(["app", "--explanations", str(other)]) == 2
    assert "explains the SAEs of another-release" in capsys.readouterr().err


def test_scarce_contexts_are_shared_between_explainer_and_scorers():
    corpus, tok = planted_corpus(), WordTokenizer()  # feature 2 fires in 75 texts: fewer than 40 + 50
    (row,) = explain_features(Oracle(), corpus, tok, [2], sampling=Sampling(n_promoted=0), progress=False)
    assert row.n_activating == 75 and row.n_train == 75 * 40 // 90 and row.detection.n_positive == 75 - row.n_train
    assert row.detection.value == 1.0
