"""`qscope footprints` and `qscope redundancy` end to end on the demo model (real text, real harvest path)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from qscope_plugin.cli import main
from qscope_plugin.demo.run import SENTENCES
from qscope_plugin.models import DEMO_MODEL_DIR
from qscope_plugin.recipes.footprints import Footprints

pytestmark = pytest.mark.skipif(not DEMO_MODEL_DIR.is_dir(), reason="demo assets not built")


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"question": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def test_footprints_then_redundancy(tmp_path, capsys):
    zh, en = SENTENCES["zh"], SENTENCES["en"]
    suites = {"zh": zh, "zh_half": zh[:20], "en": en}
    for name, texts in suites.items():
        data = write_jsonl(tmp_path / f"{name}.jsonl", texts)
        assert main(["footprints", str(data), "--template", "Q: {question}\\nA:", "--layers", "3",
                     "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    fp = Footprints.load(tmp_path / "zh_half.safetensors")
    assert fp.name == "zh_half" and fp.provenance["prompt_format"] == "template:Q: {question}\nA:"
    rng = np.random.default_rng(0)
    ability = np.linspace(0.2, 0.9, 6)
    args = []
    for name, texts in suites.items():
        scores = (rng.random((6, len(texts))) < ability[:, None]).astype(int)
        pd.DataFrame(scores, index=[f"model{i}" for i in range(6)]).to_csv(tmp_path / f"{name}.csv")
        args += ["--correctness", f"{name}={tmp_path / f'{name}.csv'}"]
    capsys.readouterr()
    out = tmp_path / "report"
    files = [str(tmp_path / f"{name}.safetensors") for name in suites]
    assert main(["redundancy", *files, *args, "--n-draws", "50", "--reference", "en", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    overlap = dict(zip(report["overlap"]["names"], report["overlap"]["values"], strict=True))
    names = report["overlap"]["names"]
    assert overlap["zh_half"][names.index("zh")] == 1.0  # a subset is fully covered
    assert "drop candidate: zh_half (100% of its footprint is in zh)" in printed
    assert "drop candidate: zh " not in printed  # the superset stays: dropping both would lose what they share
    assert set(report["benchmarks"]) == set(suites) and "partial_pearson" in report
    assert (out / "overlap.png").is_file() and (out / "report.md").is_file()


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ["a question"])
    assert main(["footprints", str(data), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pass --column (one of ['question'])" in err and "\n" not in err
    assert main(["redundancy", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "cannot read footprint file" in capsys.readouterr().err
