from __future__ import annotations

import pytest
import torch
from qscope_testing import qwen3_tokenizer, tiny_qwen3, tiny_saes

from qscope_plugin.hooks import add_to_residual, capture_residual
from qscope_plugin.recipes._harvest import EmptyInputError, dense_codes, harvest
from qscope_plugin.recipes.discovery import (
    ContrastError,
    ContrastOptions,
    analyze,
    contrast,
    contrast_codes,
    top_contexts,
)

TEXTS = ["The cat sat on the mat.", "你好，世界", "a", "Interpretability with sparse autoencoders is fun!"]


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_qwen3(), qwen3_tokenizer()
    return model, tok, tiny_saes(model)


def test_codes_equal_the_sae_on_each_text_alone(setup):
    model, tok, saes = setup
    codes = harvest(model, tok, TEXTS, saes, batch_size=4)
    for text, c in zip(TEXTS, codes, strict=True):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with capture_residual(model, [0, 1]) as acts:
            model(ids)
        for layer in (0, 1):
            expected = saes[layer].encode(acts[layer][0])
            assert torch.allclose(dense_codes(c, layer, 128), expected, atol=1e-5)


def test_analyze_lists_top_features_per_token(setup):
    model, tok, saes = setup
    rows = analyze(model, tok, "你好 world", saes, top_n=3)
    n_tokens = len(tok("你好 world")["input_ids"])
    assert len(rows) == 2 * n_tokens and {r.layer for r in rows} == {0, 1}
    for r in rows:
        values = [v for _, v in r.features]
        assert len(values) <= 3 and values == sorted(values, reverse=True) and all(v > 0 for v in values)


def test_planted_direction_is_found_first(setup):
    """Add a known direction to the positive texts' residual; the SAE feature aligned with it must rank first."""
    model, tok, saes = setup
    sae = saes[1]
    planted = 77
    direction = sae.W_enc[planted] / sae.W_enc[planted].norm()
    positive = ["I like green apples.", "Rain falls on the roof.", "Numbers: 1, 2, 3."]
    negative = ["Birds sing in spring.", "The train was late.", "Code compiles fine."]
    with add_to_residual(model, 1, 6.0 * direction):
        pos = harvest(model, tok, positive, {1: sae})
    neg = harvest(model, tok, negative, {1: sae})
    ranking = contrast_codes(pos, neg, {1: 128}, ContrastOptions(method="mean"))
    assert ranking[1][0].feature == planted
    assert ranking[1][0].positive > ranking[1][0].negative
    # firing rates saturate at 1.0, so the planted feature ties for first there
    rates = contrast_codes(pos, neg, {1: 128}, ContrastOptions(method="rate", top_k=128))
    best = rates[1][0].score
    assert best == 1.0 and planted in {s.feature for s in rates[1] if s.score == best}


def test_contrast_through_the_model(setup):
    model, tok, saes = setup
    ranking = contrast(model, tok, ["你好世界", "我喜欢猫"], ["hello world", "I like cats"], saes, top_k=4,
                       rank_by="abs", method="rate")
    assert set(ranking) == {0, 1} and all(len(r) == 4 for r in ranking.values())
    scores = [abs(s.score) for s in ranking[0]]
    assert scores == sorted(scores, reverse=True)


def test_exclusions(setup):
    """Position 0, a shared template prefix and shared tokens can each be dropped."""
    model, tok, saes = setup
    pos = harvest(model, tok, ["Q: red apple", "Q: red car"], saes)
    neg = harvest(model, tok, ["Q: blue sky", "Q: blue sea"], saes)
    full = contrast_codes(pos, neg, {0: 128}, ContrastOptions(exclude_first_token=False, top_k=128))
    trimmed = contrast_codes(pos, neg, {0: 128}, ContrastOptions(drop_common_prefix=True, top_k=128))
    shared = contrast_codes(pos, neg, {0: 128}, ContrastOptions(drop_shared_tokens=True, top_k=128))
    assert {s.feature: s.score for s in full[0]} != {s.feature: s.score for s in trimmed[0]}
    assert {s.feature: s.score for s in trimmed[0]} == pytest.approx({s.feature: s.score for s in shared[0]})


def test_identical_sides_rank_no_feature(setup):
    """A difference of exactly 0 says nothing: such rows are left out rather than shown as top-K."""
    model, tok, saes = setup
    for method in ("rate", "mean"):
        ranking = contrast(model, tok, ["the cat sat"], ["the cat sat"], saes, method=method, rank_by="abs", top_k=3)
        assert ranking == {0: [], 1: []}


def test_a_side_with_every_position_excluded_is_refused(setup):
    """One-token texts minus the first token leave nothing: an error naming the side, not all-zero rates."""
    model, tok, saes = setup
    one_token = [t for t in ("a", "b", "x") if len(tok(t)["input_ids"]) == 1]
    assert one_token
    with pytest.raises(ContrastError, match=r"every position of the negative \(B\) texts was excluded .*first token"):
        contrast(model, tok, ["the cat sat on the mat"], one_token, saes)
    with pytest.raises(ContrastError, match=r"positive \(A\) texts .*tokens shared by both sides"):
        contrast(model, tok, ["the cat"], ["the cat sat"], saes, drop_shared_tokens=True)
    kept = contrast(model, tok, ["the cat sat on the mat"], one_token, saes, exclude_first_token=False, top_k=3)
    assert all(len(r) == 3 for r in kept.values())


def test_top_contexts_streams_with_bounded_heaps(setup):
    model, tok, saes = setup
    texts = (f"sample number {i} says hello" for i in range(30))  # a generator: streamed, not a list
    codes = harvest(model, tok, ["sample number 3 says hello"], saes)
    feature = int(codes[0].indices[1][2, codes[0].values[1][2].argmax()])
    contexts = top_contexts(model, tok, texts, saes, {1: [feature]}, n_top=5, window=3, batch_size=8)
    found = contexts[(1, feature)]
    assert 0 < len(found) <= 5
    assert [c.activation for c in found] == sorted((c.activation for c in found), reverse=True)
    assert all("[[" in c.snippet and c.position > 0 for c in found)


def test_empty_inputs_are_one_clear_error(setup):
    model, tok, saes = setup
    with pytest.raises(EmptyInputError, match="no positive texts"):
        contrast(model, tok, [], ["x"], saes)
    with pytest.raises(EmptyInputError):
        analyze(model, tok, "   ", saes)


@pytest.mark.parametrize(("options", "message"), [({"method": "median"}, "method='median'; expected one of 'mean'"),
                                                  ({"pool": "sum"}, "pool='sum'"), ({"rank_by": "up"}, "rank_by='up'"),
                                                  ({"top_k": 0}, "top_k=0; expected a whole number"),
                                                  ({"top_k": 2.5}, "top_k=2.5")])
def test_bad_contrast_options_are_refused_before_any_harvest(options, message):
    with pytest.raises(ContrastError, match=message):
        contrast(object(), None, ["a"], ["b"], {}, **options)  # never reaches the model
