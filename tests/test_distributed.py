"""The data-parallel harvest: chunked results equal per-chunk harvests bit for bit, a killed run resumes without
recomputing finished chunks, and every harvest command under ``torchrun --nproc-per-node 2`` (gloo, CPU) writes
the same output as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from qscope_testing import qwen3_tokenizer, tiny_model, tiny_saes

from qscope_plugin.distributed import ChunkFileError, DistributedError, checkpoints, run_chunks
from qscope_plugin.recipes import _harvest
from qscope_plugin.recipes._harvest import harvest, sharded_harvest

TEXTS = ["What is 2 + 2?", "我今天很开心", "Translate to French: the cat sleeps on the warm mat all day long.",
         "def f(x):\n    return x", "A", "", "Which planet is the largest in the solar system, and why is it so big?",
         "长城有多长？", "List three prime numbers."]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("qwen3")
    saes = {n: s for n, s in tiny_saes(model, d_sae=64, k=6).items() if n in (1, 3)}
    return model, qwen3_tokenizer(), saes


def per_chunk(model, tok, texts, saes, size, **options):
    """What the chunked harvest must equal: ``harvest`` of each chunk alone, concatenated."""
    return [harvest(model, tok, texts[s : s + size], saes, **options) for s in range(0, len(texts), size)]


def test_every_pooling_equals_the_harvest_of_each_chunk_bit_for_bit(setup, tmp_path):
    model, tok, saes = setup
    with checkpoints(tmp_path / "work", chunk_size=4):
        codes = sharded_harvest(model, tok, TEXTS, saes, batch_size=3)
        maxes = sharded_harvest(model, tok, TEXTS, saes, pooling="max", batch_size=3, exclude_first_token=True)
        last = sharded_harvest(model, tok, [t for t in TEXTS if t], saes, pooling="last", batch_size=3)
        assert len(list((tmp_path / "work").glob("0[1-3]-harvest/chunk-*.safetensors"))) == 3 + 3 + 2
    assert not (tmp_path / "work").exists()  # removed once the block succeeded
    expected_codes = [c for part in per_chunk(model, tok, TEXTS, saes, 4, batch_size=3) for c in part]
    assert len(codes) == len(TEXTS) and codes[5].token_ids.numel() == 0
    for got, want in zip(codes, expected_codes, strict=True):
        assert torch.equal(got.token_ids, want.token_ids)
        for n in saes:
            assert torch.equal(got.indices[n], want.indices[n])
            assert torch.equal(got.values[n], want.values[n].to(got.values[n].dtype))
    parts = per_chunk(model, tok, TEXTS, saes, 4, pooling="max", batch_size=3, exclude_first_token=True)
    for n in saes:
        want = np.vstack([p[n].toarray() for p in parts])
        assert np.array_equal(maxes[n].toarray(), want) and maxes[n].nnz > 0
    parts = per_chunk(model, tok, [t for t in TEXTS if t], saes, 4, pooling="last", batch_size=3)
    for n in saes:
        want = [row for p in parts for row in p[n]]
        assert len(last[n]) == len(want) and all(np.array_equal(a, b) for a, b in zip(last[n], want, strict=True))


def test_one_chunk_is_exactly_the_plain_harvest(setup):
    model, tok, saes = setup
    plain = harvest(model, tok, TEXTS, saes, pooling="max")
    chunked = sharded_harvest(model, tok, TEXTS, saes, pooling="max")
    assert all(np.array_equal(plain[n].toarray(), chunked[n].toarray()) for n in saes)


def killed_after(texts, n):
    """A stream that dies after ``n`` texts, like a run killed mid-harvest."""
    for i, text in enumerate(texts):
        if i == n:
            raise RuntimeError("killed")
        yield text


def test_a_killed_run_resumes_without_recomputing_finished_chunks(setup, tmp_path, monkeypatch):
    model, tok, saes = setup
    calls = []

    def counted(model, tok, texts, saes, **options):
        calls.append(list(texts))
        return harvest(model, tok, texts, saes, **options)

    monkeypatch.setattr(_harvest, "harvest", counted)
    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="killed"), checkpoints(work, chunk_size=2):
        sharded_harvest(model, tok, killed_after(TEXTS, 5), saes, pooling="max")
    assert len(calls) == 2 and len(list(work.rglob("chunk-*.safetensors"))) == 2  # texts 0-3 are kept
    (work / "01-harvest" / ".chunk-000002.safetensors.x.tmp").write_bytes(b"half a file")  # never counts
    with pytest.raises(DistributedError, match="unfinished harvest with other settings"), checkpoints(work,
                                                                                                     chunk_size=2):
        sharded_harvest(model, tok, TEXTS, saes, pooling="max", exclude_first_token=True)
    calls.clear()
    with checkpoints(work, chunk_size=2):
        resumed = sharded_harvest(model, tok, TEXTS, saes, pooling="max")
    assert calls == [TEXTS[4:6], TEXTS[6:8], TEXTS[8:]]  # chunks 0 and 1 were read back, not recomputed
    with checkpoints(None, chunk_size=2):
        fresh = sharded_harvest(model, tok, TEXTS, saes, pooling="max")
    assert all(np.array_equal(resumed[n].toarray(), fresh[n].toarray()) for n in saes)
    assert not work.exists()


def test_changed_inputs_are_recomputed_and_a_corrupted_chunk_is_refused(tmp_path):
    def compute(start, chunk):
        return {"x": torch.tensor([float(len(t)) for t in chunk])}

    work = tmp_path / "work"
    with pytest.raises(RuntimeError), checkpoints(work, chunk_size=2):
        run_chunks(killed_after(["a", "bb", "ccc", "dd"], 3), compute, name="toy", settings={})
    calls = []
    with checkpoints(work, chunk_size=2):
        parts = run_chunks(["a", "BBB", "ccc", "dd"], lambda s, c: calls.append(s) or compute(s, c), name="toy",
                           settings={})
    assert calls == [0, 2] and [p["x"].tolist() for p in parts] == [[1.0, 3.0], [3.0, 2.0]]  # chunk 0 changed
    with pytest.raises(RuntimeError), checkpoints(work, chunk_size=2):
        run_chunks(killed_after(["a", "bb", "ccc"], 2), compute, name="toy", settings={})
    chunk = work / "01-toy" / "chunk-000000.safetensors"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 1  # one flipped bit in the tensor data
    chunk.write_bytes(bytes(data))
    with pytest.raises(ChunkFileError, match="does not match the hash"), checkpoints(work, chunk_size=2):
        run_chunks(["a", "bb"], compute, name="toy", settings={})
    with pytest.raises(DistributedError, match="chunk_size=0"), checkpoints(work, chunk_size=0):
        pass


# ------------------------------------------------------------------------------- every command under torchrun


def write_inputs(root: Path) -> dict[str, Path]:
    sentences = json.loads((Path(__file__).parents[1] / "qscope_plugin/demo/eval_sentences.json").read_text())
    zh, en = sentences["zh"][:4], sentences["en"][:4]
    files = {"texts": root / "texts.jsonl", "lines": root / "lines.txt", "langs": root / "langs.json",
             "loops": root / "loops.txt", "toxic": root / "toxic"}
    files["texts"].write_text("".join(json.dumps({"text": t}) + "\n" for t in zh + en))
    files["lines"].write_text("\n".join(zh + en) + "\n")
    files["langs"].write_text(json.dumps({"zh": zh, "en": en}, ensure_ascii=False))
    files["loops"].write_text("\n".join(t + " the end the end the end the end" for t in en[:3] + zh[:2]) + "\n")
    files["toxic"].mkdir()
    rows = [{"text": t, "toxic": 1} for t in zh] + [{"text": t, "toxic": 0} for t in en]
    (files["toxic"] / "en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


COMMANDS = {
    "dashboard": (lambda f: ["dashboard", "--layer", "3", "--top", "5", "--data", f["texts"], "--batch-size", "2"],
                  "cards.html"),
    "evaluate": (lambda f: ["evaluate", "1,3", "--data", f["texts"], "--batch-size", "2"], "quality"),
    "classify fit": (lambda f: ["classify", "fit", "--data", f["toxic"], "--n-discovery", "4", "--n-test", "4",
                                "--layers", "1,3", "--k", "2"], "classifier.json"),
    "sasft features": (lambda f: ["sasft", "features", "--texts", f["langs"], "--target", "zh", "--layers", "2,3"],
                       "features.json"),
    "repetition features": (lambda f: ["repetition", "features", "--texts", f["loops"], "--layers", "1,3"],
                            "repetition.json"),
    "top contexts": (lambda f: ["safety", "targets", "--layers", "3", "--features", "0-5", "--corpus", f["lines"],
                                "--tau", "0", "--max-new-tokens", "2"], "targets.jsonl"),
}


def output_bytes(path: Path) -> bytes:
    """The command's output; a report folder is its report.json; the classifier's creation time is left out."""
    path = path / "report.json" if path.is_dir() else path
    if path.name == "classifier.json":
        saved = json.loads(path.read_text())
        saved["provenance"].pop("created")
        return json.dumps(saved, sort_keys=True).encode()
    return path.read_bytes()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_two_torchrun_ranks_write_what_one_process_writes(command, tmp_path):
    from qscope_plugin.cli import main
    from qscope_plugin.models import DEMO_MODEL_DIR

    if not DEMO_MODEL_DIR.is_dir():
        pytest.skip("demo assets not built")
    argv, name = COMMANDS[command]
    args = [str(a) for a in argv(write_inputs(tmp_path))] + ["--chunk-size", "2"]
    single, distributed = tmp_path / "single" / name, tmp_path / "distributed" / name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: one thread
    try:
        assert main([*args, "--out", str(single)]) == 0
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "qscope_plugin.cli", *args, "--out", str(distributed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert output_bytes(distributed) == output_bytes(single)
    assert not distributed.with_name(name + ".partial").exists() and not single.with_name(name + ".partial").exists()
