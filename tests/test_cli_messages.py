"""Error messages a command prints name the command's own flags."""

from __future__ import annotations

import json

from qscope_plugin.cli import main


def test_classify_fit_on_a_small_folder_names_the_flags(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    rows = [{"text": f"text {i}", "toxic": i % 2} for i in range(8)]
    (tmp_path / "data" / "en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["classify", "fit", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "c.json")]) in (1, 2)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--n-discovery / --n-test" in err, err
