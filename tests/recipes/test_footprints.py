"""Footprint harvesting (report §4, R3) on real tiny models: exact, padding-free, resumable, distributed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from qscope_testing import qwen3_tokenizer, tiny_model, tiny_saes

from qscope_plugin.distributed import DistributedError
from qscope_plugin.hooks import capture_residual
from qscope_plugin.recipes.data import load_table
from qscope_plugin.recipes.footprints import (
    FootprintError,
    Footprints,
    harvest_footprints,
)

TEXTS = ["What is 2 + 2?", "我今天很开心", "Translate to French: the cat sleeps on the warm mat all day long.",
         "def f(x):\n    return x", "A", "Which planet is the largest in the solar system, and why is it so big?",
         "长城有多长？", "List three prime numbers."]


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


@torch.no_grad()
def reference(model, tok, texts: list[str], saes) -> dict[int, list[set[int]]]:
    """One text at a time, full forward, dense SAE codes of the last token: the definition (R3), no batching."""
    out = {n: [] for n in saes}
    for text in texts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with capture_residual(model, list(saes)) as acts:
            model(input_ids=ids)
        for n, sae in saes.items():
            out[n].append(set(torch.nonzero(sae.encode(acts[n][0, -1])).flatten().tolist()))
    return out


def as_sets(fp: Footprints) -> dict[int, list[set[int]]]:
    return {n: [set(lf.sample(i).tolist()) for i in range(len(lf))] for n, lf in fp.layers.items()}


def test_datasets_rows_templates_and_provenance(tmp_path, tok):
    import datasets

    model = tiny_model("qwen3")
    saes = tiny_saes(model, d_sae=64, k=6)
    rows = [{"question": t, "answer": str(i)} for i, t in enumerate(TEXTS)]
    data = datasets.Dataset.from_list(rows)
    fp = harvest_footprints(model, tok, data, saes, template="Q: {question}\nA:", name="toy", progress=False)
    assert as_sets(fp) == reference(model, tok, [f"Q: {r['question']}\nA:" for r in rows], saes)
    assert fp.name == "toy" and fp.provenance["prompt_format"] == "template:Q: {question}\nA:"
    assert fp.provenance["layers"] == [0, 1, 2, 3] and fp.provenance["k"] == 6
    as_dicts = harvest_footprints(model, tok, rows, saes, template="Q: {question}\nA:", progress=False)
    assert as_sets(as_dicts) == as_sets(fp)  # a plain list of rows works like the Dataset
    path = tmp_path / "toy.jsonl"
    data.to_json(path)
    from_file = harvest_footprints(model, tok, load_table(str(path)), saes, column="question", progress=False)
    assert as_sets(from_file) == reference(model, tok, TEXTS, saes)
    with pytest.raises(FootprintError, match=r"field 'prompt'.*columns are \['question', 'answer'\]"):
        harvest_footprints(model, tok, data, saes, column="prompt", progress=False)
    with pytest.raises(FootprintError, match="exactly one of"):
        harvest_footprints(model, tok, data, saes, progress=False)


def test_provenance_works_from_an_uninstalled_source_tree(tok, monkeypatch):
    """No package metadata (a source checkout on sys.path): the version falls back as ``qscope_plugin`` does."""
    import importlib.metadata

    import qscope_plugin

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr(qscope_plugin, "__version__", "0+unknown")
    model = tiny_model("qwen3", n_layers=2)
    fp = harvest_footprints(model, tok, TEXTS[:2], tiny_saes(model, d_sae=64, k=6), progress=False)
    assert fp.provenance["qscope_plugin"] == "0+unknown"


def test_long_prompts_keep_their_last_tokens(tok):
    model = tiny_model("qwen3")
    saes = {1: tiny_saes(model, d_sae=64, k=6)[1]}
    long = "one two three four five six seven eight nine ten eleven twelve"
    tail = tok.decode(tok(long, add_special_tokens=False)["input_ids"][-4:])
    fp = harvest_footprints(model, tok, [long], saes, max_length=4, progress=False)
    assert as_sets(fp) == reference(model, tok, [tail], saes)


def test_save_load_round_trip_and_sparse_matrix(tmp_path, tok):
    model = tiny_model("qwen3")
    saes = tiny_saes(model, d_sae=64, k=6)
    fp = harvest_footprints(model, tok, TEXTS, saes, progress=False)
    path = fp.save(tmp_path / "fp.safetensors")
    back = Footprints.load(path)
    assert back.provenance == fp.provenance and as_sets(back) == as_sets(fp)
    matrix = back[2].matrix()
    assert matrix.shape == (len(TEXTS), 64)
    assert np.array_equal(np.asarray(matrix.sum(axis=0)).ravel(), back[2].support())
    with pytest.raises(FootprintError, match="has layers"):
        back[7]
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(FootprintError, match="not a footprint file"):
        Footprints.load(tmp_path / "other.safetensors")


_calls = {"fail_at": None}


def flaky_format(row: dict) -> str:
    """A formatter that dies at one row the first time, like a run killed mid-harvest."""
    if row["question"] == _calls["fail_at"]:
        _calls["fail_at"] = None
        raise RuntimeError("killed")
    return row["question"]


def test_interrupted_harvest_resumes_to_the_same_result(tmp_path, tok):
    import datasets

    model = tiny_model("qwen3")
    saes = tiny_saes(model, d_sae=64, k=6)
    data = datasets.Dataset.from_list([{"question": t} for t in TEXTS])
    out = tmp_path / "bench.safetensors"
    _calls["fail_at"] = TEXTS[5]
    with pytest.raises(RuntimeError, match="killed"):
        harvest_footprints(model, tok, data, saes, formatter=flaky_format, chunk_size=2, out=out, progress=False)
    partial = tmp_path / "bench.safetensors.partial"
    assert not out.exists() and len(list(partial.rglob("chunk-*.safetensors"))) == 2  # samples 0-3 are kept
    with pytest.raises(DistributedError, match="unfinished harvest with other settings"):
        harvest_footprints(model, tok, data, saes, column="question", chunk_size=2, out=out, progress=False)
    resumed = harvest_footprints(model, tok, data, saes, formatter=flaky_format, chunk_size=2, out=out,
                                 progress=False)
    assert not partial.exists() and out.exists()
    assert as_sets(resumed) == reference(model, tok, TEXTS, saes)
    assert as_sets(Footprints.load(out)) == as_sets(resumed)


def test_distributed_harvest_under_torchrun_equals_single_process(tmp_path):
    """Two gloo ranks through `qscope footprints` (demo model and SAEs) give the single-process file."""
    from qscope_plugin.models import DEMO_MODEL_DIR, load_model
    from qscope_plugin.store import DEMO_RELEASE, load_sae

    if not DEMO_MODEL_DIR.is_dir():
        pytest.skip("demo assets not built")
    import datasets

    lines = [f"{t} ({i})" for i, t in enumerate(TEXTS * 3)]
    data_file = tmp_path / "bench.jsonl"
    datasets.Dataset.from_list([{"text": t} for t in lines]).to_json(data_file)
    out = tmp_path / "dist.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qscope_plugin.cli", "footprints", str(data_file), "--column", "text", "--layers", "1,3",
           "--chunk-size", "5", "--batch-size", "4", "--name", "bench", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "bench layer 3: 24 samples" in run.stdout
    model, tok = load_model(str(DEMO_MODEL_DIR))
    saes = {n: load_sae(DEMO_RELEASE, n) for n in (1, 3)}
    single = harvest_footprints(model, tok, load_table(str(data_file)), saes, column="text", progress=False)
    distributed = Footprints.load(out)
    assert as_sets(distributed) == as_sets(single)
    assert distributed.provenance["n_samples"] == 24 and not Path(f"{out}.partial").exists()


def test_torchrun_group_outside_torchrun_changes_nothing(monkeypatch, tmp_path):
    import torch.distributed as dist

    from qscope_plugin.distributed import torchrun_group

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with torchrun_group("cpu") as (rank, device):
        assert (rank, device) == (0, "cpu") and not dist.is_initialized()
