"""What a newcomer's first run shows: readable demo output, and no library bar in front of it."""

from __future__ import annotations


def test_the_demo_names_the_classifier_features_in_a_sentence(monkeypatch, capsys, tmp_path):
    import qscope_plugin.demo.run as demo
    from qscope_plugin.cli import main

    summary = {"release": "qscope-demo-qwen3-4l", "seconds": 1.0,
               "layers": [{"layer": 3, "fvu": 0.1, "feature": 28, "balanced_accuracy": 1.0,
                           "han_share": dict.fromkeys(demo.CONDITIONS, 0.5)}],
               "classifier": {"features": {"3": [197, 631, 1528]}, "precision": 1.0, "recall": 0.9, "f1": 0.95},
               "redundancy": {"layer": 3, "benchmarks": {}, "summary": {"drop_candidates": []}}}
    monkeypatch.setattr(demo, "run_demo", lambda out: summary)
    assert main(["demo", "--out", str(tmp_path)]) in (0, None)
    out = capsys.readouterr().out
    assert "Chinese when any of layer 3 features 197, 631 and 1528 fires" in out
    assert "{" not in out and "[" not in out
    assert demo.describe_features({"1": [5], "2": [6, 7]}) == "layer 1 feature 5; layer 2 features 6 and 7"


def test_loading_a_model_draws_no_weights_bar(capfd):
    from transformers.utils import logging

    from qscope_plugin.models import default_model, load_model

    before = logging.set_tqdm_hook(None)
    logging.set_tqdm_hook(before)
    load_model(default_model())
    assert "Loading weights" not in capfd.readouterr().err
    assert logging.set_tqdm_hook(before) is before  # the hook is put back as it was
    for _ in logging.tqdm(range(3), desc="other work"):  # and transformers' other bars still draw
        pass
    assert "other work" in capfd.readouterr().err or not logging.is_progress_bar_enabled()
