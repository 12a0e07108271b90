"""The demo's scientific claims, pinned with margins, through `qscope demo` on the shipped assets."""

from __future__ import annotations

import json

import pytest

from qscope_plugin.cli import main
from qscope_plugin.models import DEMO_MODEL_DIR

pytestmark = pytest.mark.skipif(not DEMO_MODEL_DIR.is_dir(), reason="demo assets not built (scripts/build_demo.py)")


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    for name in ("report.md", "summary.json", "steering.png", "mixed_sentence.png"):
        assert (out / name).stat().st_size > 0
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_saes_explain_at_least_85_percent_of_variance(summary):
    assert all(layer["fvu"] <= 0.15 for layer in summary["layers"]), [r["fvu"] for r in summary["layers"]]


def test_one_feature_per_layer_separates_chinese_from_english(summary):
    accuracies = [layer["balanced_accuracy"] for layer in summary["layers"]]
    assert all(acc >= 0.85 for acc in accuracies), accuracies


def test_steering_beats_a_random_direction_of_the_same_norm(summary):
    best = next(r for r in summary["layers"] if r["layer"] == summary["best_steering_layer"])
    s = best["han_share"]
    random_effect = max(abs(s["random_minus"] - s["baseline"]), abs(s["random_plus"] - s["baseline"]))
    assert s["baseline"] - s["suppress"] > random_effect, s
    assert s["amplify"] - s["baseline"] > random_effect, s
