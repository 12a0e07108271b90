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


# ------------------------------------------------------------------------------ the project's own saved JSON


def _language_features():
    from qscope_plugin.recipes.sasft import LanguageFeatures

    return LanguageFeatures(target="zh", languages=("en", "zh"), features={3: [1, 5]}, scores={3: [0.9, 0.4]},
                            thresholds={"en": {3: [0.1, 0.2]}, "zh": {3: [1.5, 0.7]}},
                            saes={3: {"release": "demo", "d_sae": 64}})


def _repetition_features():
    from qscope_plugin.recipes.repetition import RepetitionFeatures

    return RepetitionFeatures(features={2: [4, 9]}, scores={2: [0.8, 0.1]}, n_texts=3, n_tokens=11, rep_agg="mean")


def _targets():
    from qscope_plugin.recipes.safety_synthesis import Target

    return [Target(3, 5, "violent requests", 0.9), Target(2, 7, "greetings", 0.4, "benign")]


def _explanations():
    from qscope_plugin.recipes.explain import FeatureExplanation, Score

    score = Score(0.75, 0.5, 0.9, 5, 5, 0.8, 0.7)
    return [FeatureExplanation(DEMO_RELEASE, 3, 28, "Chinese characters", score, None, 9, 4, "x", "x"),
            FeatureExplanation(DEMO_RELEASE, 2, 7, "the word the", None, score, 6, 3, "x", "x")]


def _save_language_features(path: Path) -> None:
    _language_features().save(path)


def _save_repetition_features(path: Path) -> None:
    path.write_text(_repetition_features().to_json(), encoding="utf-8")


def _save_targets(path: Path) -> None:
    from qscope_plugin.recipes.safety_synthesis import save_targets

    save_targets(_targets(), path)


def _save_explanations(path: Path) -> None:
    from qscope_plugin.recipes.explain import write_explanations

    write_explanations(path, _explanations())


def _load_language_features(path: Path) -> object:
    from qscope_plugin.recipes.sasft import LanguageFeatures

    return LanguageFeatures.load(path)


def _load_repetition_features(path: Path) -> object:
    from qscope_plugin.recipes.repetition import RepetitionFeatures

    return RepetitionFeatures.load(path)


def _load_targets(path: Path) -> object:
    from qscope_plugin.recipes.safety_synthesis import load_targets

    return load_targets(path)


def _load_explanations(path: Path) -> object:
    from qscope_plugin.recipes.explain import read_explanations

    return read_explanations(path)


SAVED = {"language-features": (".json", _save_language_features, _load_language_features, _language_features),
         "repetition-features": (".json", _save_repetition_features, _load_repetition_features, _repetition_features),
         "safety-targets": (".jsonl", _save_targets, _load_targets, _targets),
         "explanations": (".jsonl", _save_explanations, _load_explanations, _explanations)}
"""Each saved kind: suffix, writer, reader, and the value the writer saves (the reader must give it back)."""


def _foreign_shapes(valid: bytes, suffix: str) -> list[bytes]:
    """The valid file's records with one field dropped, retyped or given an alien key: JSON that parses (a JSON
    lines file becomes that one record)."""
    shapes = []
    for record in [json.loads(valid)] if suffix == ".json" else map(json.loads, valid.decode().splitlines()):
        for key in record:
            shapes += [json.dumps({k: v for k, v in record.items() if k != key}),
                       json.dumps({**record, key: "x"}), json.dumps({**record, key: {"x": [None]}}),
                       json.dumps({**record, key: [True]})]
        shapes.append(json.dumps({**record, "alien": 1}))
    return [s.encode() for s in shapes]


@pytest.mark.parametrize("kind", SAVED)
def test_saved_json(tmp_path, kind):
    """The project's own files read back (LanguageFeatures, RepetitionFeatures, safety targets, explanations):
    valid ones give the saved value back; cut, emptied, foreign or reshaped ones are the file's usage error."""
    suffix, save, load, value = SAVED[kind]
    path = tmp_path / f"valid{suffix}"
    save(path)
    assert load(path) == value()
    valid = path.read_bytes()

    @SETTINGS
    @given(content=st.one_of(_mutation(valid), st.sampled_from(_foreign_shapes(valid, suffix))))
    def run(content):
        case = tmp_path / f"case{suffix}"
        case.write_bytes(content)
        _check(lambda: load(case), case)

    run()
    with pytest.raises(QScopeError, match="missing"):  # a missing file is the same error, naming it
        load(tmp_path / f"missing{suffix}")


def test_saved_json_errors_are_malformed_file_errors(tmp_path):
    """Each reader's error is a ``MalformedFileError`` as well as its recipe's error (callers catch either)."""
    from qscope_plugin.errors import MalformedFileError
    from qscope_plugin.recipes.explain import ExplainError
    from qscope_plugin.recipes.repetition import RepetitionError
    from qscope_plugin.recipes.safety_synthesis import SynthesisError
    from qscope_plugin.recipes.sasft import SASFTError

    recipe_errors = {"language-features": SASFTError, "repetition-features": RepetitionError,
                     "safety-targets": SynthesisError, "explanations": ExplainError}
    for kind, (suffix, _, load, _) in SAVED.items():
        case = tmp_path / f"{kind}{suffix}"
        case.write_text("[1, 2", encoding="utf-8")
        with pytest.raises(MalformedFileError, match=case.name) as caught:
            load(case)
        assert isinstance(caught.value, recipe_errors[kind])


@pytest.mark.parametrize("kind", SAVED)
def test_saved_json_cli_exit_2(tmp_path, monkeypatch, capsys, kind):
    """One command that reads each kind: a truncated file is one `qscope:` line naming it, exit 2."""
    from qscope_plugin.cli import main

    suffix, save, _, _ = SAVED[kind]
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / f"bad{suffix}"
    save(bad)
    if kind == "explanations":  # a first line that is a `qscope explain` record, then a cut one
        first, second = bad.read_text(encoding="utf-8").splitlines()
        bad.write_text(first + "\n" + second[:len(second) // 2] + "\n", encoding="utf-8")
    else:
        bad.write_bytes(bad.read_bytes()[:-7])
    (tmp_path / "sft.jsonl").write_text('{"prompt": "hi", "response": "hello", "language": "en"}\n')
    argv = {"language-features": ["sasft", "train", "--features", bad.name, "--data", "sft.jsonl", "--out", "run"],
            "repetition-features": ["repetition", "check", "今天早上", "--features", bad.name],
            "safety-targets": ["safety", "coverage", bad.name, "--prompts", "sft.jsonl"],
            "explanations": ["dashboard", "--layer", "3", "--top", "2", "--data", "sft.jsonl",
                             "--explanations", bad.name, "--out", "d.html"]}[kind]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qscope")]
    assert len(errors) == 1 and bad.name in errors[0], errors
