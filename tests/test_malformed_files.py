"""Files other programs wrote are input too: truncated, empty and foreign versions of each kind the project reads.

For every reader (lm-eval results and samples, datasets, saved footprints, classifier JSON, SAE folders, per-sample
correctness tables) a valid file is written, then hypothesis cuts it at any byte, empties it, or swaps in foreign
content (random bytes, another kind's file, JSON of another shape). Each read must either succeed (a cut at a line
boundary can leave a valid, shorter file) or raise the project's usage error (a ``QScopeError`` that is a
``ValueError``: exit 2 in the CLI) whose message names the file; never ``JSONDecodeError``, ``KeyError``,
``IndexError`` or a crash.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qscope_plugin.errors import QScopeError
from qscope_plugin.models import DEMO_MODEL_DIR
from qscope_plugin.store import DEMO_RELEASE, load_sae

FOREIGN = [b"", b"\x00\xff\xfe\x80garbage", b"[1, 2, 3]", b'{"a": {"b": null}}', b"null", b"\xef\xbb\xbf{}",
           b"PK\x03\x04 not a zip", b"\n\n\n", b'{"results": []}', b'"text"', b"1e999"]
"""Foreign contents: binary junk, JSON of other shapes, a BOM, an infinity."""

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _mutation(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.integers(0, max(len(valid) - 1, 0)).map(lambda n: valid[:n]),
                     st.sampled_from(FOREIGN),
                     st.binary(max_size=64),
                     st.integers(0, max(len(valid) - 1, 0)).map(lambda n: valid[:n] + b"\x00" + valid[n + 1:]))


def _check(read: Callable[[], object], path: Path) -> None:
    try:
        read()
    except QScopeError as e:
        assert isinstance(e, ValueError), f"{type(e).__name__} would exit 1, not 2: {e}"
        assert path.name in str(e), f"the message does not name {path.name}: {e}"


# ------------------------------------------------------------------------------------------------- lm-eval


def _lm_eval_folder(root: Path) -> tuple[Path, Path]:
    run = root / "model-a" / "org__model"
    run.mkdir(parents=True)
    results = run / "results_2026-01-01T00-00-00.json"
    results.write_text(json.dumps({"results": {"toy": {"acc,none": 0.5}}, "versions": {"toy": 1}}))
    samples = run / "samples_toy_2026-01-01T00-00-00.jsonl"
    rows = [{"doc_id": i, "filter": "none", "metrics": ["acc"], "acc": float(i % 2), "doc_hash": f"d{i}",
             "prompt_hash": f"p{i}"} for i in range(4)]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return results, samples


@pytest.mark.parametrize("which", ["results", "samples"])
def test_lm_eval_outputs(tmp_path, which):
    from qscope_plugin.adapters.lm_eval import read_lm_eval_outputs

    results, samples = _lm_eval_folder(tmp_path / "valid")
    assert read_lm_eval_outputs([tmp_path / "valid" / "model-a"]).tasks.keys() == {"toy"}  # the valid one reads
    valid = (results if which == "results" else samples).read_bytes()

    @SETTINGS
    @given(content=_mutation(valid))
    def run(content):
        folder = tmp_path / "case"
        shutil.rmtree(folder, ignore_errors=True)
        files = dict(zip(("results", "samples"), _lm_eval_folder(folder), strict=True))
        files[which].write_bytes(content)
        _check(lambda: read_lm_eval_outputs([folder / "model-a"]), files[which])

    run()


# ------------------------------------------------------------------------------------------------ datasets


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_datasets(tmp_path, suffix):
    import pandas as pd

    from qscope_plugin.recipes.data import load_texts

    frame = pd.DataFrame({"text": ["hello world", "我今天很开心", "third"], "label": [0, 1, 0]})
    path = tmp_path / f"data{suffix}"
    {".jsonl": lambda p: frame.to_json(p, orient="records", lines=True, force_ascii=False),
     ".json": lambda p: frame.to_json(p, orient="records", force_ascii=False),
     ".csv": lambda p: frame.to_csv(p, index=False), ".parquet": lambda p: frame.to_parquet(p)}[suffix](path)
    assert load_texts(str(path)) == frame["text"].tolist()
    valid = path.read_bytes()

    @settings(SETTINGS, max_examples=12)
    @given(content=_mutation(valid))
    def run(content):
        case = tmp_path / f"case{suffix}"
        case.write_bytes(content)
        _check(lambda: load_texts(str(case)), case)

    run()


# ----------------------------------------------------------------------------------------------- footprints


def test_footprints(tmp_path):
    from qscope_plugin.recipes.footprints import Footprints, LayerFootprints

    path = tmp_path / "valid.safetensors"
    layer = LayerFootprints(np.array([0, 2, 3]), np.array([1, 5, 7], dtype=np.int32), 16)
    Footprints({3: layer}, {"name": "toy"}).save(path)
    assert Footprints.load(path).layers[3].d_sae == 16
    valid = path.read_bytes()

    @SETTINGS
    @given(content=_mutation(valid))
    def run(content):
        case = tmp_path / "case.safetensors"
        case.write_bytes(content)
        _check(lambda: Footprints.load(case), case)

    run()


def test_footprints_with_foreign_metadata(tmp_path):
    """A real safetensors file whose metadata or tensors are not a footprint's."""
    from safetensors.torch import save_file

    from qscope_plugin.recipes.footprints import Footprints

    cases = [({"x": torch.zeros(2)}, {"provenance": "{", "d_sae": "{}"}),
             ({"x": torch.zeros(2)}, {"provenance": "{}", "d_sae": '{"3": 16}'}),
             ({"layer3.indptr": torch.zeros(2, dtype=torch.int64)}, {"provenance": "{}", "d_sae": '{"x": 1}'}),
             ({"layer3.indptr": torch.tensor([0, 5]), "layer3.indices": torch.tensor([1], dtype=torch.int32)},
              {"provenance": "[]", "d_sae": '{"3": 16}'}),
             ({"x": torch.zeros(2)}, {"provenance": "{}", "d_sae": "[1]"})]
    for i, (tensors, meta) in enumerate(cases):
        path = tmp_path / f"foreign{i}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(QScopeError, match=path.name):
            Footprints.load(path)


# ---------------------------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def demo_backbone():
    from qscope_plugin.models import load_model

    return load_model(str(DEMO_MODEL_DIR))


def test_classifier_json(tmp_path, demo_backbone):
    from qscope_plugin.recipes.classifiers import ORRuleClassifier

    model, tok = demo_backbone
    saes = {n: load_sae(DEMO_RELEASE, n) for n in (2, 3)}
    texts = ["我今天很开心", "今天早上", "hello there", "good day"]
    clf = ORRuleClassifier(model, tok, saes, k_features=2).fit(texts, [1, 1, 0, 0])
    path = tmp_path / "valid.json"
    clf.save(path)
    ORRuleClassifier.load(path, model, tok, saes)
    valid = path.read_bytes()
    state = json.loads(valid)
    shapes = [{**state, "features": []}, {**state, "features": {"x": [1]}}, {**state, "features": {"3": "a"}},
              {**state, "eps": "high"}, {**state, "saes": []}, {**state, "thresholds": {"3": 5}},
              {k: v for k, v in state.items() if k != "features"}, {**state, "top1_diff": [1]}]

    @SETTINGS
    @given(content=st.one_of(_mutation(valid), st.sampled_from(shapes).map(lambda s: json.dumps(s).encode())))
    def run(content):
        case = tmp_path / "case.json"
        case.write_bytes(content)
        _check(lambda: ORRuleClassifier.load(case, model, tok, saes), case)

    run()


# --------------------------------------------------------------------------------------------- SAE folders


@pytest.mark.parametrize("name", ["layer3.sae.pt", "qscope.json"])
def test_sae_folders(tmp_path, name):
    from qscope_plugin import store

    source = store.DEMO_SAE_DIR
    valid = (source / name).read_bytes()

    @settings(SETTINGS, max_examples=10)
    @given(content=_mutation(valid))
    def run(content):
        folder = tmp_path / "saes"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for f in ("layer3.sae.pt", "qscope.json"):
            (folder / f).write_bytes((source / f).read_bytes())
        (folder / name).write_bytes(content)
        store.DEFAULT_CACHE.clear()  # the folder's path is the same in every example
        _check(lambda: load_sae(str(folder), 3), folder / name)

    run()


# ------------------------------------------------------------------------------------- correctness tables


def test_correctness_csv(tmp_path):
    from qscope_plugin.recipes.redundancy import read_correctness

    path = tmp_path / "valid.csv"
    path.write_text("model,0,1,2\na,1,0,1\nb,0,0,1\n")
    assert read_correctness({"toy": path})["toy"].shape == (2, 3)
    valid = path.read_bytes()

    @SETTINGS
    @given(content=_mutation(valid))
    def run(content):
        case = tmp_path / "case.csv"
        case.write_bytes(content)
        _check(lambda: read_correctness({"toy": case}), case)

    run()
