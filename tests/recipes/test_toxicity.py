from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from qscope_testing import qwen3_tokenizer, tiny_qwen3, tiny_saes

from qscope_plugin.recipes.classifiers import feature_deltas, predict_or, prf, top_features
from qscope_plugin.recipes.data import DataError
from qscope_plugin.recipes.reports import write_report
from qscope_plugin.recipes.toxicity import Harvest, ToxicityReport, balanced_split, evaluate, load_splits


def test_balanced_split_is_disjoint_balanced_and_seeded():
    texts = [f"t{i}" for i in range(100)]
    labels = [i % 3 == 0 for i in range(100)]  # 34 positive
    s = balanced_split(texts, labels, 40, 20, seed=1)
    assert len(s.discovery_texts) == 40 and s.discovery_labels.sum() == 20
    assert len(s.test_texts) == 20 and s.test_labels.sum() == 10
    assert not set(s.discovery_texts) & set(s.test_texts)
    assert balanced_split(texts, labels, 40, 20, seed=1).test_texts == s.test_texts
    assert balanced_split(texts, labels, 40, 20, seed=2).test_texts != s.test_texts
    with pytest.raises(DataError, match="need 40 positive"):
        balanced_split(texts, labels, 60, 20, seed=0)


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")


def test_textdetox_layout_from_local_files(tmp_path):
    """One file per language with `text` and `toxic`, read through datasets.load_dataset."""
    for lang in ("en", "de"):
        _write_jsonl(tmp_path / f"{lang}.jsonl", [{"text": f"{lang} {i}", "toxic": i % 2} for i in range(20)])
    splits = load_splits(str(tmp_path), n_discovery=8, n_test=4)
    assert sorted(splits) == ["de", "en"]
    assert all(t.startswith("de ") for t in splits["de"].test_texts)
    with pytest.raises(DataError, match=r"languages \['fr'\] are not in"):
        load_splits(str(tmp_path), ["fr"], n_discovery=8, n_test=4)
    with pytest.raises(DataError, match=r"has splits \['de', 'en'\]; pass split="):  # one table per language column
        load_splits(str(tmp_path), language_column="lang", n_discovery=8, n_test=4)


def test_single_table_with_language_column(tmp_path):
    rows = [{"sentence": f"s{i}", "label": int(i % 4 == 0), "lang": "xx" if i < 40 else "yy"} for i in range(80)]
    _write_jsonl(tmp_path / "all.jsonl", rows)
    splits = load_splits(str(tmp_path / "all.jsonl"), text_column="sentence", label_column="label",
                         language_column="lang", n_discovery=10, n_test=4)
    assert sorted(splits) == ["xx", "yy"]
    with pytest.raises(DataError, match="no column 'text'"):
        load_splits(str(tmp_path / "all.jsonl"), language_column="lang", n_discovery=10, n_test=4)
    with pytest.raises(DataError, match="no column 'language'"):
        load_splits(str(tmp_path / "all.jsonl"), language_column="language", n_discovery=10, n_test=4)


def _synthetic_harvest(rng, signal_feature: int, n: int = 400, d: int = 32) -> Harvest:
    def half(n):
        y = np.arange(n) < n // 2
        dense = (rng.random((n, d)) < 0.05) * 1.0
        dense[:, signal_feature] = np.where(rng.random(n) < np.where(y, 0.95, 0.05), 2.0, 0.0)
        return {0: sp.csr_matrix(dense * 0.5), 1: sp.csr_matrix(dense)}, y

    disc, y_disc = half(n)
    test, y_test = half(n // 2)
    return Harvest(disc, y_disc, test, y_test)


def test_evaluate_on_planted_harvests(tmp_path):
    """Language a and b share the signal feature, c uses another: transfer and Jaccard must show it."""
    rng = np.random.default_rng(0)
    hv = {"a": _synthetic_harvest(rng, 3), "b": _synthetic_harvest(rng, 3), "c": _synthetic_harvest(rng, 9)}
    report = evaluate(None, None, {}, {}, harvests=hv, ks=(1, 2), m_layers=2, jaccard_k=1, repeats=2)
    for lang in hv:
        assert report.languages[lang].best_layer_f1 > 0.9
        assert report.jaccard[0][lang][lang] == 1.0
    assert report.transfer["a"]["b"].f1 > 0.9 and report.transfer["a"]["c"].f1 < 0.2
    assert report.jaccard[1]["a"]["b"] == 1.0 and report.jaccard[1]["a"]["c"] == 0.0
    assert report.data_efficiency[1.0].relative == 1.0
    assert 0.8 < report.data_efficiency[0.1].relative <= 1.05
    assert report.macro_best_f1 == pytest.approx(np.mean([report.languages[lang].best_layer_f1 for lang in hv]))
    files = write_report(report, tmp_path / "report")
    assert [f.name for f in files] == ["report.json", "report.md", "f1_by_layer.png", "jaccard.png"]
    assert all(f.stat().st_size > 0 for f in files)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| a | " in md
    # precision / recall / F1 per language, layer and K, and their macro averages, in the report and the markdown
    h = hv["c"]
    expected = prf(h.y_test, predict_or(h.test, {1: top_features(feature_deltas(h.discovery[1], h.y_discovery), 2)}))
    c = report.languages["c"]
    assert tuple(c.grid[1][2]) == pytest.approx(tuple(expected))
    assert c.selected_layer_scores[2].recall == pytest.approx(c.grid[c.selected_layer][2].recall)
    langs = list(report.languages.values())
    for metric in ("precision", "recall", "f1"):
        assert getattr(report.macro.grid[0][1], metric) == pytest.approx(
            np.mean([getattr(r.grid[0][1], metric) for r in langs]))
        assert getattr(report.macro.selected_layer[2], metric) == pytest.approx(
            np.mean([getattr(r.selected_layer_scores[2], metric) for r in langs]))
        assert getattr(report.macro.multi_layer, metric) == pytest.approx(
            np.mean([getattr(r.multi_layer, metric) for r in langs]))
    assert report.transfer_k == 1
    m = report.macro.grid[1][1]
    assert "| language | layer | K=1 P / R / F1 | K=2 P / R / F1 |" in md
    assert f"| macro | 1 | {m.precision:.3f} / {m.recall:.3f} / {m.f1:.3f} |" in md
    assert f"| c | 1 | {c.grid[1][1].precision:.3f} / {c.grid[1][1].recall:.3f} / {c.grid[1][1].f1:.3f} |" in md
    # report.json reads back to an equal report (numeric keys restored), which renders the same markdown
    again = ToxicityReport.from_json(json.loads((tmp_path / "report" / "report.json").read_text()))
    assert again == report and 0.1 in again.data_efficiency and 1 in again.jaccard and 2 in again.macro.grid[1]
    assert write_report(again, tmp_path / "again") and (tmp_path / "again" / "report.md").read_text() == md


def test_report_json_round_trip_restores_numbers():
    rng = np.random.default_rng(2)
    hv = {"a": _synthetic_harvest(rng, 3), "b": _synthetic_harvest(rng, 5)}
    report = evaluate(None, None, {}, {}, harvests=hv, ks=(1, 5), fractions=(0.25, 0.5), repeats=1)
    data = json.loads(json.dumps(report.to_json()))
    assert data == report.to_json()  # to_json is already plain JSON (string keys)
    again = ToxicityReport.from_json(data)
    assert again == report
    assert list(again.languages["a"].grid) == [0, 1] and list(again.macro.selected_layer) == [1, 5]
    assert list(again.data_efficiency) == [0.25, 0.5, 1.0] and list(again.languages["b"].top1_diff) == [0, 1]
    assert ToxicityReport.from_json({**data, "ks": [1]}) != report  # equality is not vacuous


def test_a_nan_relative_efficiency_survives_strict_json(tmp_path):
    """relative is NaN when the full split's F1 is 0; report.json writes null (valid JSON) and reads NaN back."""
    import dataclasses
    import math

    from qscope_plugin.recipes.toxicity import Efficiency

    rng = np.random.default_rng(2)
    report = evaluate(None, None, {}, {}, harvests={"a": _synthetic_harvest(rng, 3)}, ks=(1,), fractions=(0.5,),
                      repeats=1)
    report = dataclasses.replace(report, data_efficiency={0.5: Efficiency(0.0, math.nan), 1.0: Efficiency(0.0, 1.0)})
    write_report(report, tmp_path)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    again = ToxicityReport.from_json(json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse))
    assert math.isnan(again.data_efficiency[0.5].relative) and again.data_efficiency[1.0].relative == 1.0


def test_transfer_k_is_a_parameter():
    """With every feature in the transfer set, a's rule fires on c's noise too: recall 1, precision about 1/2."""
    rng = np.random.default_rng(1)
    hv = {"a": _synthetic_harvest(rng, 3), "c": _synthetic_harvest(rng, 9)}
    default = evaluate(None, None, {}, {}, harvests=hv, ks=(1, 2), fractions=(), repeats=1)
    wide = evaluate(None, None, {}, {}, harvests=hv, ks=(1, 2), fractions=(), repeats=1, transfer_k=32)
    assert default.transfer_k == 1 and wide.transfer_k == 32
    assert default.transfer["a"]["c"].recall < 0.2
    assert wide.transfer["a"]["c"].recall == 1.0 and wide.transfer["a"]["c"].precision < 0.6


def test_evaluate_end_to_end_on_a_tiny_model(tmp_path):
    model, tok = tiny_qwen3(n_layers=2), qwen3_tokenizer()
    rows = [{"text": t, "toxic": 1} for t in ("you idiot", "shut up fool", "stupid jerk", "go away loser")]
    rows += [{"text": t, "toxic": 0} for t in ("have a nice day", "thank you", "see you soon", "good morning")]
    _write_jsonl(tmp_path / "en.jsonl", rows)
    splits = load_splits(str(tmp_path), n_discovery=4, n_test=4, split_seed=0)
    report = evaluate(model, tok, tiny_saes(model), splits, ks=(1, 2), m_layers=2, fractions=(0.5,), repeats=1)
    assert set(report.languages["en"].grid) == {0, 1}
    assert set(report.macro.grid[1]) == {1, 2} and set(report.languages["en"].grid[0]) == {1, 2}
    assert 0.0 <= report.languages["en"].best_layer_f1 <= 1.0


def test_pool_splits_keeps_every_language_and_split_apart():
    from qscope_plugin.recipes.toxicity import Split, pool_splits

    splits = {"en": Split(["a", "b"], np.array([True, False]), ["c"], np.array([True])),
              "ru": Split(["д"], np.array([False]), ["е", "ж"], np.array([False, True]))}
    pooled = pool_splits(splits)
    assert pooled.discovery_texts == ["a", "b", "д"] and pooled.discovery_labels.tolist() == [True, False, False]
    assert pooled.test_texts == ["c", "е", "ж"] and pooled.test_labels.tolist() == [True, False, True]
    with pytest.raises(DataError, match="no splits"):
        pool_splits({})
