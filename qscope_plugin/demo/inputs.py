"""Example input files for the commands in the README, made from the demo's hand-written sentences (CC0).

``python -m qscope_plugin.demo.inputs [FOLDER]`` writes them (default: the working directory), so that every
command shown in the README and docs/ runs on the embedded demo from a fresh clone, as written:

- ``texts.jsonl`` (``{"text": ...}``), ``zh.txt``, ``en.txt``, ``prompts.txt`` (mixed zh / en starts), ``langs.json``
  (``{"zh": [...], "en": [...]}``): texts for evaluate, compare, dashboard, steer, sasft and repetition;
- ``chinese.jsonl``, ``english.jsonl``, ``mixed.jsonl`` (a ``question`` column): three toy benchmarks, with
  ``*_scores.csv`` made-up per-sample correctness of 6 models (seeded), for footprints and redundancy;
- ``zh_en/all.jsonl``: a labelled table (``text``, ``chinese``) for the OR-rule classifier commands;
- ``sft.jsonl`` (``prompt``, ``response``, ``language``): SASFT training rows.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from qscope_plugin.demo.run import SENTENCES

N_MODELS = 6


def _lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_inputs(folder: str | Path = ".") -> list[Path]:
    """Write the example inputs into ``folder``; returns the paths written."""
    out = Path(folder)
    (out / "zh_en").mkdir(parents=True, exist_ok=True)
    zh, en, mixed = SENTENCES["zh"], SENTENCES["en"], SENTENCES["mixed_prompts"]
    _jsonl(out / "texts.jsonl", [{"text": t} for t in zh + en])
    _lines(out / "zh.txt", zh)
    _lines(out / "en.txt", en)
    _lines(out / "prompts.txt", mixed)
    (out / "langs.json").write_text(json.dumps({"zh": zh, "en": en}, ensure_ascii=False), encoding="utf-8")
    rng = np.random.default_rng(0)
    ability = np.linspace(0.2, 0.9, N_MODELS)
    for name, texts in (("chinese", zh), ("english", en), ("mixed", mixed)):
        _jsonl(out / f"{name}.jsonl", [{"question": t} for t in texts])
        scores = (rng.random((N_MODELS, len(texts))) < ability[:, None]).astype(int)
        with open(out / f"{name}_scores.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["model", *range(len(texts))])
            writer.writerows([f"model{m}", *row] for m, row in enumerate(scores.tolist()))
    labelled = [{"text": t, "chinese": 1} for t in zh] + [{"text": t, "chinese": 0} for t in en]
    _jsonl(out / "zh_en" / "all.jsonl", labelled)
    halves = [(t[: len(t) // 2], t[len(t) // 2:]) for t in en]
    _jsonl(out / "sft.jsonl", [{"prompt": p, "response": r, "language": "en"} for p, r in halves])
    names = ["texts.jsonl", "zh.txt", "en.txt", "prompts.txt", "langs.json", "zh_en/all.jsonl", "sft.jsonl"]
    names += [f"{b}{suffix}" for b in ("chinese", "english", "mixed") for suffix in (".jsonl", "_scores.csv")]
    return [out / name for name in names]


if __name__ == "__main__":
    for path in write_inputs(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(path)
