"""recipes.data: every source kind and every error, through the real ``datasets`` (offline)."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest

from qscope_plugin.errors import QScopeWarning
from qscope_plugin.recipes.data import DataError, load_table, load_tables, load_texts

ROWS = [{"question": f"q{i}", "answer": i} for i in range(5)]


def write_jsonl(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_a_local_file_is_one_table_named_by_its_stem(tmp_path, suffix, capsys):
    path = tmp_path / f"bench{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=suffix == ".jsonl")
    tables = load_tables(path)
    assert list(tables) == ["bench"] and tables["bench"].to_list() == ROWS
    assert load_table(str(path))["question"] == [r["question"] for r in ROWS]
    assert "Generating" not in capsys.readouterr().err  # no progress bars for a local file


def test_a_folder_is_one_table_per_file_and_ignores_other_files(tmp_path):
    write_jsonl(tmp_path / "en.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "de.jsonl", ROWS[3:])
    write_jsonl(tmp_path / "all.jsonl", ROWS)  # stems that datasets refuses as split names still work
    write_jsonl(tmp_path / "zh-hans.jsonl", ROWS)
    (tmp_path / "README.md").write_text("not data")
    tables = load_tables(tmp_path)
    assert sorted(tables) == ["all", "de", "en", "zh-hans"] and len(tables["en"]) == 3 and len(tables["all"]) == 5
    assert load_table(tmp_path, split="de")["answer"] == [3, 4]
    with pytest.raises(DataError, match=r"has no split 'fr'; it has \['all', 'de', 'en', 'zh-hans'\]"):
        load_table(tmp_path, split="fr")
    with pytest.raises(DataError, match=r"has splits \['all', 'de', 'en', 'zh-hans'\]; pass split= one of them"):
        load_table(tmp_path)


def test_in_memory_lists():
    assert load_table(["a", "b"]).to_dict() == {"text": ["a", "b"]}
    assert load_tables(ROWS)["data"].to_list() == ROWS
    with pytest.raises(DataError, match="empty"):
        load_table([])
    with pytest.raises(DataError, match=r"holds \['dict', 'str'\]"):
        load_table(["a", {"text": "b"}])
    with pytest.raises(DataError, match="the list of examples has no split 'test'"):
        load_table(["a"], split="test")


def test_unknown_suffix_is_refused_not_read_as_json(tmp_path):
    path = tmp_path / "bench.txt"
    path.write_text(json.dumps(ROWS[0]) + "\n")  # valid JSON lines: the old loader read it silently
    with pytest.raises(DataError, match=r"suffix '\.txt' is not one of"):
        load_tables(path)


def test_bad_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no .*files in"):
        load_tables(tmp_path)
    write_jsonl(tmp_path / "en.jsonl")
    pd.DataFrame(ROWS).to_csv(tmp_path / "de.csv", index=False)
    with pytest.raises(DataError, match=r"mixes \['csv', 'json'\] files"):
        load_tables(tmp_path)
    (tmp_path / "de.csv").unlink()
    write_jsonl(tmp_path / "en.json")
    with pytest.raises(DataError, match=r"several files for split\(s\) \['en'\]"):
        load_tables(tmp_path)


def test_a_malformed_file_is_one_error(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"cannot read .*bench\.jsonl.*expected valid json"):
        load_tables(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_an_empty_file_is_one_error(tmp_path, suffix):
    (tmp_path / f"bench{suffix}").touch()
    with pytest.raises(DataError, match=r"bench\.\w+' is empty; pass a file with at least one"):
        load_tables(tmp_path / f"bench{suffix}")
    with pytest.raises(DataError, match="is empty"):
        load_tables(tmp_path)


def test_an_unreachable_hub_dataset_is_one_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"cannot load dataset 'nobody/no-such-dataset' .*HF_HUB_OFFLINE=1") as e:
        load_table("nobody/no-such-dataset", split="test")
    assert e.value.__cause__ is None and isinstance(e.value, ValueError)


def test_hub_ids_pass_config_and_revision_and_pick_the_split(monkeypatch):
    """A cached hub dataset cannot be built offline, so datasets.load_dataset returns a real DatasetDict here."""
    calls = []

    def fake_load(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                                     "test": datasets.Dataset.from_list(ROWS[2:])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_table("openai/gsm8k", config="main", split="test", revision="abc")["answer"] == [2, 3, 4]
    assert calls == [("openai/gsm8k", "main", {"revision": "abc"})]
    with pytest.raises(DataError, match=r"'openai/gsm8k' has no split 'validation'; it has \['test', 'train'\]"):
        load_table("openai/gsm8k", split="validation")


def test_limit_keeps_the_first_rows(tmp_path):
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("".join(f'{{"text": "t{i}"}}\n' for i in range(5)))
    assert load_table(str(data_file), limit=2)["text"] == ["t0", "t1"]
    assert len(load_table(str(data_file), limit=50)) == 5
    with pytest.raises(DataError, match="limit=0"):
        load_table(str(data_file), limit=0)


def test_texts_of_a_column_are_checked_strings(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"body": "one", "n": 1}, {"body": "", "n": 2}, {"body": "three", "n": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.warns(QScopeWarning, match=r"dropped 1 blank of the 3 rows read from column 'body' of '.*t\.jsonl' "
                                            r"\(a blank text has no tokens\); kept 2"):
        assert load_texts(str(path), column="body") == ["one", "three"]
    assert load_texts(str(path), column="body", limit=1) == ["one"]
    with pytest.warns(QScopeWarning, match="dropped 1 blank of the 3 rows"):
        assert load_texts(str(path), column="body", limit=2) == ["one", "three"]  # limit counts texts, not rows
    with pytest.warns(QScopeWarning, match=r"dropped 2 blank of the 3 rows .* the list of examples .* kept 1"):
        assert load_texts([" ", "x", "\n\t"]) == ["x"]
    with pytest.raises(DataError, match="limit=0; give a positive number of texts"):
        load_texts(["a"], limit=0)
    assert load_texts(["a", "b"]) == ["a", "b"]
    with pytest.raises(DataError, match=r"has no column 'text'; pass one of \['body', 'n'\]"):
        load_texts(str(path))
    with pytest.raises(DataError, match=r"column 'n' of .* holds int 1 in row 0, not text"):
        load_texts(str(path), column="n")
    with pytest.raises(DataError, match=r"holds NoneType None in row 1"):
        load_texts([{"text": "x"}, {"text": None}])  # not str()-ed to "None"
    with pytest.raises(DataError, match="holds no text, only blank strings"):
        load_texts(["", "  "])
