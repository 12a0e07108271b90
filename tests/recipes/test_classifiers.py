from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from qscope_testing import qwen3_tokenizer, tiny_qwen3, tiny_saes

from qscope_plugin.errors import QScopeWarning
from qscope_plugin.recipes.classifiers import (
    ClassifierError,
    ORRuleClassifier,
    f1_grid,
    feature_deltas,
    jaccard,
    predict_or,
    prf,
    select_layers,
    top_features,
)
from qscope_plugin.sae import SAE_KEYS, QScopeSAEConfig, QwenScopeSAE

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
    saved = json.loads(path.read_text())
    (layer,) = clf.features
    assert saved["layers"] == [layer] and saved["eps"] == 0.0 and saved["k_features"] == 2
    assert saved["thresholds"] == {str(layer): [0.0, 0.0]}
    assert saved["saes"] == {str(layer): {"release": None, "d_model": 64, "d_sae": 128, "k": 8}}
    assert saved["provenance"]["n_examples"] == 12 and saved["provenance"]["n_positive"] == 6
    assert saved["provenance"]["searched_layers"] == [0, 1] and "torch" in saved["provenance"]
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


def _renamed(sae: QwenScopeSAE, **changes) -> QwenScopeSAE:
    return QwenScopeSAE({key: getattr(sae, key) for key in SAE_KEYS}, dataclasses.replace(sae.cfg, **changes))


class _Named(torch.nn.Module):
    """A stand-in backbone with a ``name_or_path`` (load never runs it)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name_or_path = name
        self.w = torch.nn.Linear(1, 1)


def test_saved_model_and_release_are_recorded_and_checked_on_load(tmp_path):
    """No forward pass: a hand-set classifier saved with release 'rel-a' (d_sae 16, k 4) on layer 2."""
    sae = QwenScopeSAE({"W_enc": torch.zeros(16, 8), "W_dec": torch.zeros(8, 16), "b_enc": torch.zeros(16),
                        "b_dec": torch.zeros(8)}, QScopeSAEConfig(8, 16, 4, 2, "rel-a"))
    clf = ORRuleClassifier(_Named("org/backbone"), None, {2: sae}, eps=0.5, features={2: [3, 1]},
                           top1_diff={2: 0.7})
    clf.model_id, clf.release = "org/backbone", "rel-a"
    path = tmp_path / "clf.json"
    clf.save(path)
    saved = json.loads(path.read_text())
    assert (saved["model_id"], saved["release"], saved["layers"]) == ("org/backbone", "rel-a", [2])
    assert saved["thresholds"] == {"2": [0.5, 0.5]}
    again = ORRuleClassifier.load(path, _Named("org/backbone"), None, {2: sae})
    assert (again.release, again.model_id, again.features, again.eps) == ("rel-a", "org/backbone", {2: [3, 1]}, 0.5)
    for other, what in ((_renamed(sae, release="rel-b"), "'rel-b'"), (_renamed(sae, k=5), "k=5")):
        match = rf"layer 2: .*fitted on SAEs of release 'rel-a' .*k=4.* got .*{what}"
        with pytest.raises(ClassifierError, match=match):
            ORRuleClassifier.load(path, _Named("org/backbone"), None, {2: other})
    # a folder without qscope.json gives SAEs without a release name: the geometry is still checked
    assert ORRuleClassifier.load(path, None, None, {2: _renamed(sae, release=None)}).features == {2: [3, 1]}
    with pytest.raises(ClassifierError, match=r"uses layers \[2\]; pass SAEs for them \(release 'rel-a'\)"):
        ORRuleClassifier.load(path, None, None, {1: sae})
    with pytest.warns(QScopeWarning, match="fitted on model 'org/backbone'; running it on 'org/other'"):
        ORRuleClassifier.load(path, _Named("org/other"), None, {2: sae})
    saved["thresholds"]["2"] = [0.5, 0.9]
    path.write_text(json.dumps(saved))
    with pytest.raises(ClassifierError, match="per-feature thresholds"):
        ORRuleClassifier.load(path, None, None, {2: sae})


def test_fit_fills_model_id_and_release_from_the_backbone_and_saes(setup):
    model, tok, saes = setup
    named = {n: _renamed(s, release="tiny-rel") for n, s in saes.items()}
    old = model.name_or_path
    model.name_or_path = "org/tiny"
    try:
        clf = ORRuleClassifier(model, tok, named, k_features=1).fit(["你好", "hello", "再见", "bye"], [1, 0, 1, 0])
    finally:
        model.name_or_path = old
    assert (clf.model_id, clf.release) == ("org/tiny", "tiny-rel")
    assert clf.provenance["model"] == "org/tiny" and clf.provenance["release"] == "tiny-rel"
    explicit = ORRuleClassifier(model, tok, named, k_features=1, release="/saes/folder").fit(
        ["你好", "hello", "再见", "bye"], [1, 0, 1, 0])
    assert explicit.release == "/saes/folder"


def test_old_files_without_the_new_keys_still_load(setup, tmp_path):
    model, tok, saes = setup
    old = {"format": "qscope-or-rule/1", "k_features": 1, "m_layers": 1, "eps": 0.0, "exclude_first_token": False,
           "features": {"1": [5]}, "top1_diff": {"1": 0.5}, "provenance": {}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert ORRuleClassifier.load(tmp_path / "old.json", model, tok, saes).features == {1: [5]}
