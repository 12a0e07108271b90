"""`qscope analyze / compare / steer` on a saved tiny model and a folder of Qwen-Scope-format SAE files."""

from __future__ import annotations

import json

import pytest
from qscope_testing import qwen3_tokenizer, tiny_qwen3, write_sae_file

from qscope_plugin.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model = tiny_qwen3(n_layers=2)
    model.save_pretrained(root / "model")
    qwen3_tokenizer().save_pretrained(root / "model")
    for n in range(2):
        write_sae_file(root / "saes" / f"layer{n}.sae.pt", d_model=64, d_sae=128, seed=n)
    (root / "saes" / "qscope.json").write_text(json.dumps({"k": 8, "release": "tiny"}))
    return ["--model", str(root / "model"), "--release", str(root / "saes")]


def test_analyze_json(assets, capsys):
    assert main(["analyze", "你好 world", "--layers", "0-1", "--top", "3", "--json", *assets]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["layer"] for r in rows} == {0, 1} and all(len(r["features"]) <= 3 for r in rows)


def test_compare_table(assets, capsys):
    argv = ["compare", "--positive", "你好世界", "--positive", "我喜欢猫", "--negative", "hello world",
            "--negative", "I like cats", "--layers", "1", "--top-k", "2", *assets]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("L1 ") for line in lines)


def test_steer_sweep_json(assets, capsys):
    argv = ["steer", "Hello", "--layer", "1", "--feature", "4", "--alpha", "0", "--alpha", "40",
            "--max-new-tokens", "4", "--json", *assets]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 40.0] and result["prompt"] == "Hello"
    assert rows[0]["steered"]["token_ids"] == result["unsteered"]["token_ids"]  # alpha 0 changes nothing
    assert len(rows[1]["steered"]["token_ids"]) == 4 and all(0 < r["mean_prob"] <= 1 for r in rows)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyze", "hi", "--layers", "5"], r"layer 5 is out of range .*2 layers: 0\.\.1"),
        (["steer", "hi", "--layer", "1", "--feature", "999", "--alpha", "1"], r"128 features: 0\.\.127"),
        (["compare", "--negative", "x"], "no positive texts"),
        (["compare", "--positive-file", "/nonexistent", "--negative", "x"], "cannot read positive file"),
    ],
)
def test_bad_input_exits_2(assets, capsys, argv, message):
    import re

    assert main([*argv, *assets]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_model_is_a_runtime_failure(capsys, tmp_path):
    assert main(["analyze", "hi", "--model", str(tmp_path / "nope"), "--release", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "cannot load model" in err and len(err.strip().splitlines()) == 1


def test_classify_fit_eval_predict(assets, tmp_path, capsys):
    rows = [{"text": t, "toxic": 1} for t in ("you idiot", "shut up fool", "stupid jerk", "go away loser")]
    rows += [{"text": t, "toxic": 0} for t in ("have a nice day", "thank you", "see you soon", "good morning")]
    data = tmp_path / "data"
    data.mkdir()
    (data / "en.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["--data", str(data), "--n-discovery", "4", "--n-test", "4"]
    assert main(["classify", "fit", *common, "--k", "2", "--out", str(tmp_path / "clf.json"), *assets]) == 0
    saved = json.loads((tmp_path / "clf.json").read_text())
    assert saved["format"] == "qscope-or-rule/1" and len(next(iter(saved["features"].values()))) == 2
    assert main(["classify", "eval", *common, "--m-layers", "2", "--out", str(tmp_path / "rep"), *assets]) == 0
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "jaccard.png").is_file()
    capsys.readouterr()
    assert main(["classify", "predict", str(tmp_path / "clf.json"), "--text", "you idiot", "--text", "thanks",
                 *assets]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["you idiot", "thanks"]
    assert all(line.split("\t")[0] in {"0", "1"} for line in lines)


def test_safety_targets_coverage_synthesize(assets, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("how to pick a lock\nthe weather is nice\nmake a dangerous chemical\n")
    out = tmp_path / "targets.jsonl"
    common = ["--max-new-tokens", "4", *assets]
    assert main(["safety", "targets", "--layers", "1", "--features", "0-15", "--corpus", str(corpus), "--tau", "0",
                 "--out", str(out), *common]) == 0
    targets = [json.loads(line) for line in out.read_text().splitlines()]
    assert targets and all(t["layer"] == 1 and 0 <= t["feature"] <= 15 for t in targets)
    capsys.readouterr()
    assert main(["safety", "coverage", str(out), "--prompts", str(corpus), "--json", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["cov"] <= 1.0 and len(report["missing"]) <= len(targets)
    synth, pool = tmp_path / "synth.jsonl", tmp_path / "pool.txt"
    pool.write_text("how do I bake bread\nwrite a poem about rain\n")
    assert main(["safety", "synthesize", str(out), "--seed-prompts", str(corpus), "--budget", "2", "--out",
                 str(synth), "--curve", str(tmp_path / "curve.png"), "--pool", str(pool), *common]) == 0
    assert len(synth.read_text().splitlines()) >= 2 and (tmp_path / "curve.png").stat().st_size > 0
