from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from qscope_testing import qwen3_tokenizer, tiny_qwen3, tiny_saes

from qscope_plugin.hooks import capture_residual
from qscope_plugin.recipes.classifiers import (
    ClassifierError,
    ORRuleClassifier,
    f1_grid,
    feature_deltas,
    jaccard,
    max_activations,
    predict_or,
    prf,
    select_layers,
    top_features,
)

# 4 examples x 5 features of max activations; examples 0, 1 are positive
ACTS = sp.csr_matrix(np.array([
    [0.0, 2.0, 0.5, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.2, 0.0],
    [0.0, 0.0, 0.5, 0.0, 3.0],
    [1.0, 0.0, 0.0, 0.0, 0.0],
]))
Y = [1, 1, 0, 0]


def test_deltas_by_hand():
    # fired (eps 0): f0 [0,0,0,1] f1 [1,1,0,0] f2 [1,0,1,0] f3 [0,1,0,0] f4 [0,0,1,0]
    assert feature_deltas(ACTS, Y).tolist() == [-0.5, 1.0, 0.0, 0.5, -0.5]
    # eps 0.4 drops f3's 0.2 but keeps 0.5s
    assert feature_deltas(ACTS, Y, eps=0.4).tolist() == [-0.5, 1.0, 0.0, 0.0, -0.5]


def test_ties_keep_the_lower_feature_id():
    assert top_features(np.array([0.5, 1.0, 0.5, 0.5]), 3) == [1, 0, 2]


def test_or_rule_by_hand():
    layered = {3: ACTS}
    assert predict_or(layered, {3: [1]}).tolist() == [True, True, False, False]
    assert predict_or(layered, {3: [1, 4]}).tolist() == [True, True, True, False]
    assert predict_or(layered, {3: [2]}, eps=0.5).tolist() == [False] * 4  # strictly greater than eps
    assert predict_or({3: ACTS, 5: ACTS}, {3: [0], 5: [3]}).tolist() == [False, True, False, True]  # (R20)


def test_layer_selection_and_jaccard():
    deltas = {0: np.array([0.1, 0.3]), 1: np.array([0.9, 0.0]), 2: np.array([0.5, 0.5])}
    assert select_layers(deltas) == [1] and select_layers(deltas, 2) == [1, 2]
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and jaccard([], []) == 1.0


def test_prf_matches_sklearn_definition():
    y, p = [1, 1, 0, 0, 1], [1, 0, 1, 0, 1]
    assert prf(y, p) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert prf([1, 0], [0, 0]).f1 == 0.0


def test_bad_labels():
    with pytest.raises(ClassifierError, match="only one class"):
        feature_deltas(ACTS, [1, 1, 1, 1])
    with pytest.raises(ClassifierError, match="3 labels for 4 examples"):
        feature_deltas(ACTS, [1, 0, 1])


def test_planted_signal_recovered_with_the_planted_separability():
    """Features 7 and 11 fire on 90% / 60% of positives and 5% of negatives; everything else is noise."""
    rng = np.random.default_rng(0)
    n, d = 2000, 64
    y = np.arange(n) < n // 2
    dense = (rng.random((n, d)) < 0.1) * rng.random((n, d))
    for f, rate in ((7, 0.9), (11, 0.6)):
        dense[:, f] = np.where(rng.random(n) < np.where(y, rate, 0.05), 1.0 + rng.random(n), 0.0)
    acts = {0: sp.csr_matrix(dense)}
    train, test = np.arange(n) % 2 == 0, np.arange(n) % 2 == 1
    split = {0: acts[0][train]}
    delta = feature_deltas(split[0], y[train])
    assert top_features(delta, 2) == [7, 11]
    grid = f1_grid(split, y[train], {0: acts[0][test]}, y[test], ks=(1, 2))
    # expected F1 of feature 7 alone: recall 0.9, precision 0.9 / (0.9 + 0.05)
    expected = 2 * 0.9 * (0.9 / 0.95) / (0.9 + 0.9 / 0.95)
    assert grid[0][1].f1 == pytest.approx(expected, abs=0.03)


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_qwen3(n_layers=2), qwen3_tokenizer()
    return model, tok, tiny_saes(model)


def test_max_activations_equal_brute_force(setup):
    model, tok, saes = setup
    texts = ["hello there", "你好，世界", "x"]
    tok.padding_side = "left"
    acts = max_activations(model, tok, texts, saes, batch_size=3)
    tok.padding_side = "right"
    for i, text in enumerate(texts):
        with capture_residual(model, [0, 1]) as cap:
            model(tok(text, return_tensors="pt")["input_ids"])
        for layer in (0, 1):
            expected = saes[layer].encode(cap[layer][0]).max(0).values
            assert torch.allclose(torch.tensor(acts[layer][i].toarray()[0], dtype=torch.float32), expected, atol=1e-5)


def test_fit_predict_save_load_end_to_end(setup, tmp_path):
    """Real text through the real harvesting path: 'positive' = contains Chinese, a signal SAEs see easily."""
    model, tok, saes = setup
    pos = ["我喜欢猫", "今天天气很好", "你好世界", "我们去吃饭吧", "这本书很有意思", "明天见"]
    neg = ["I like cats", "The weather is nice", "Hello world", "Let's eat", "This book is fun", "See you"]
    texts, labels = pos + neg, [1] * 6 + [0] * 6
    clf = ORRuleClassifier(model, tok, saes, k_features=2).fit(texts, labels)
    assert len(clf.features) == 1 and len(next(iter(clf.features.values()))) == 2
    assert clf.score(texts, labels).f1 > 0.6
    path = tmp_path / "clf.json"
    clf.save(path)
    again = ORRuleClassifier.load(path, model, tok, saes)
    assert again.features == clf.features
    assert (again.predict(texts) == clf.predict(texts)).all()
    multi = ORRuleClassifier(model, tok, saes, m_layers=2).fit(texts, labels)
    assert sorted(multi.features) == [0, 1] and all(len(f) == 1 for f in multi.features.values())


def test_load_rejects_other_files(setup, tmp_path):
    model, tok, saes = setup
    (tmp_path / "x.json").write_text('{"k": 1}')
    with pytest.raises(ClassifierError, match="not a saved qscope OR-rule classifier"):
        ORRuleClassifier.load(tmp_path / "x.json", model, tok, saes)
