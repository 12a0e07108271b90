"""lm-eval integration on the demo model, offline: three local tasks that ``include:`` builtin lm-eval YAMLs and
read json files written here; the prompts, correctness and steered log-likelihoods are checked against what
lm-eval itself builds, logs and computes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")
os.environ["HF_DATASETS_OFFLINE"] = "1"

import lm_eval  # noqa: E402
from lm_eval.loggers import EvaluationTracker  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from qscope_plugin.adapters.lm_eval import (  # noqa: E402
    LmEvalError,
    SteeredHFLM,
    harvest_task_footprints,
    load_task,
    parse_steer,
    read_lm_eval_outputs,
    task_manager,
    task_prompts,
)
from qscope_plugin.backends import as_backend  # noqa: E402
from qscope_plugin.models import DEMO_MODEL_DIR, load_model  # noqa: E402
from qscope_plugin.recipes.footprints import Footprints, harvest_footprints  # noqa: E402
from qscope_plugin.recipes.redundancy import redundancy_report  # noqa: E402
from qscope_plugin.recipes.steering import SteeringSpec, steer  # noqa: E402
from qscope_plugin.store import DEMO_RELEASE, load_sae  # noqa: E402

BUILTIN = Path(lm_eval.__file__).parent / "tasks"
WORDS = ["river", "stone", "cloud", "apple", "engine", "garden", "window", "silver", "mountain", "paper", "forest",
         "candle", "bridge", "tiger", "ocean", "pencil"]
SPEC = SteeringSpec.single(2, 5, 6.0)


def _arc(i: int) -> dict:
    choices = [WORDS[(i + j) % len(WORDS)] for j in range(4)]
    return {"id": str(i), "question": f"Which word names a {WORDS[(3 * i) % len(WORDS)]}?",
            "choices": {"text": choices, "label": list("ABCD")}, "answerKey": "ABCD"[i % 4]}


def _piqa(i: int) -> dict:
    return {"goal": f"How do you clean a {WORDS[i % len(WORDS)]}?", "sol1": f"Use a {WORDS[(i + 5) % len(WORDS)]}.",
            "sol2": f"Wash it with {WORDS[(i + 9) % len(WORDS)]} water.", "label": i % 2}


def _gsm(i: int) -> dict:
    return {"question": f"Tom has {i + 2} apples and buys {i + 3} more. How many apples?",
            "answer": f"He has {i + 2} + {i + 3} = {2 * i + 5}.\n#### {2 * i + 5}"}


TASKS = {  # name: (builtin YAML, row maker, evaluation split, overrides)
    "toy_arc": ("arc/arc_easy.yaml", _arc, "test", "validation_split: null\n"),
    "toy_piqa": ("piqa/piqa.yaml", _piqa, "validation", ""),
    # the demo model ends a bare "Answer:" at once; "Answer: He has" leaves generate_until something to generate
    "toy_gsm8k": ("gsm8k/gsm8k.yaml", _gsm, "test",
                  "num_fewshot: 2\ndoc_to_text: \"Question: {{question}}\\nAnswer: He has\"\n"
                  "generation_kwargs:\n  until: ['Question:']\n  do_sample: false\n"
                  "  max_gen_toks: 6\n"),
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """The local task folder: each task a YAML including the builtin one, its data in json lines files."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, (builtin, make, split, overrides) in TASKS.items():
        for part, rows in (("train", range(100, 108)), (split, range(12))):
            (root / f"{name}.{part}.jsonl").write_text("".join(json.dumps(make(i)) + "\n" for i in rows))
        (root / f"{name}.yaml").write_text(
            f"include: {BUILTIN / builtin}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    train: {root / f'{name}.train.jsonl'}\n"
            f"    {split}: {root / f'{name}.{split}.jsonl'}\n{overrides}")
    return root


@pytest.fixture(scope="module")
def manager(tasks):
    return task_manager(tasks, include_defaults=False)


@pytest.fixture(scope="module")
def demo():
    model, tok = load_model(str(DEMO_MODEL_DIR))
    return model, tok, {n: load_sae(DEMO_RELEASE, n) for n in range(4)}


def _evaluate(lm, manager, task: str, out: Path | None = None, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` with logged samples; with ``out``, written as the lm_eval CLI writes them."""
    tracker = EvaluationTracker(output_path=str(out)) if out else None
    results = lm_eval.simple_evaluate(model=lm, tasks=[task] if isinstance(task, str) else task,
                                      task_manager=manager, log_samples=True, evaluation_tracker=tracker, **kwargs)
    if tracker:
        tracker.save_results_aggregated(results=results, samples=results["samples"])
        for name in results["configs"]:
            tracker.save_results_samples(task_name=name, samples=results["samples"][name])
    return results


@pytest.mark.parametrize(("task", "shots"), [("toy_arc", 0), ("toy_arc", 3), ("toy_gsm8k", None)])
def test_prompts_equal_the_contexts_lm_eval_logs(demo, manager, task, shots):
    model, tok, _ = demo
    prompts = task_prompts(task, num_fewshot=shots, fewshot_seed=7, manager=manager)
    logged = _evaluate(HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=8), manager, task,
                       num_fewshot=shots, fewshot_random_seed=7)["samples"][task]
    by_doc = {s["doc_id"]: s for s in logged if s["filter"] == logged[0]["filter"]}
    assert prompts.doc_ids == sorted(by_doc) == list(range(12))
    assert prompts.prompts == [by_doc[i]["arguments"][0][0] for i in prompts.doc_ids]
    assert prompts.doc_hashes == [by_doc[i]["doc_hash"] for i in prompts.doc_ids]
    expected_shots = 2 if shots is None else shots  # toy_gsm8k's YAML asks for 2
    assert prompts.num_fewshot == expected_shots
    assert prompts.prompts[0].count("Question:") == expected_shots + 1
    if expected_shots:
        other_seed = task_prompts(task, num_fewshot=shots, fewshot_seed=8, manager=manager)
        assert other_seed.prompts != prompts.prompts  # the seed picks the few-shot examples


CHAT = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_prompts_match_lm_eval(demo, manager):
    """The demo tokenizer has no chat template: a copy gets a ChatML one, as Qwen tokenizers have."""
    import copy

    model, tok, _ = demo
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT
    prompts = task_prompts("toy_arc", num_fewshot=1, apply_chat_template=True, tokenizer=tok, manager=manager)
    logged = _evaluate(HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=8), manager, "toy_arc",
                       num_fewshot=1, apply_chat_template=True)["samples"]["toy_arc"]
    assert prompts.prompts == [s["arguments"][0][0] for s in sorted(logged, key=lambda s: s["doc_id"])]
    assert prompts.prompts[0].startswith("<|im_start|>") and prompts.prompts[0].count("<|im_start|>user") == 2
    single_turn = task_prompts("toy_arc", num_fewshot=1, apply_chat_template=True, fewshot_as_multiturn=False,
                               tokenizer=tok, manager=manager)
    logged = _evaluate(HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=8), manager, "toy_arc",
                       num_fewshot=1, apply_chat_template=True, fewshot_as_multiturn=False)["samples"]["toy_arc"]
    assert single_turn.prompts == [s["arguments"][0][0] for s in sorted(logged, key=lambda s: s["doc_id"])]
    assert single_turn.prompts[0].count("<|im_start|>user") == 1


def test_footprints_of_a_task_are_the_footprints_of_its_prompts(demo, manager, tmp_path):
    model, tok, saes = demo
    prompts = task_prompts("toy_arc", num_fewshot=2, manager=manager)
    fp = harvest_task_footprints(model, tok, "toy_arc", saes, num_fewshot=2, manager=manager,
                                 out=tmp_path / "arc.safetensors", chunk_size=5, progress=False)
    direct = harvest_footprints(model, tok, prompts.prompts, saes, progress=False)
    for n in saes:
        assert np.array_equal(fp[n].indptr, direct[n].indptr) and np.array_equal(fp[n].indices, direct[n].indices)
    assert fp.name == "toy_arc" and fp.n_samples == 12
    assert fp.provenance["lm_eval_task"] == "toy_arc" and fp.provenance["num_fewshot"] == 2
    assert Footprints.load(tmp_path / "arc.safetensors").provenance == fp.provenance


def test_unknown_task_and_groups_are_clear_errors(manager):
    with pytest.raises(LmEvalError, match=r"no task 'toy_ark' \(close matches: toy_arc"):
        load_task("toy_ark", manager)
    with pytest.raises(LmEvalError, match=r"no task 'nothing_like_it' \(pass --include-path"):
        load_task("nothing_like_it", manager)
    with pytest.raises(LmEvalError, match="apply_chat_template needs the tokenizer"):
        task_prompts("toy_arc", apply_chat_template=True, manager=manager)


def test_a_builtin_group_is_refused_from_the_task_index_before_any_data_loads(monkeypatch, tmp_path, capsys):
    """Offline, loading ``mmlu`` used to fail with the hub's ConnectionError (online: every subset downloaded)."""
    import datasets

    from qscope_plugin import models
    from qscope_plugin.cli import main

    def no_data(*args, **kwargs):
        raise AssertionError("a dataset was loaded")

    monkeypatch.setattr(datasets, "load_dataset", no_data)
    monkeypatch.setattr(models, "load_model", no_data)
    with pytest.raises(LmEvalError, match=r"'mmlu' is an lm-eval group of tasks \(mmlu_humanities, .*\), not one"):
        task_prompts("mmlu")
    assert main(["footprints", "--lm-eval-task", "mmlu", "--out", str(tmp_path / "fp.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'mmlu' is an lm-eval group of tasks" in err


def test_parse_steer():
    terms = parse_steer("2:5:6; 3:17:-1.5e1")
    assert [(t.layer, t.feature, t.alpha) for t in terms] == [(2, 5, 6.0), (3, 17, -15.0)]
    with pytest.raises(LmEvalError, match="expected LAYER:FEATURE:ALPHA"):
        parse_steer("2:five:6")
    with pytest.raises(LmEvalError, match="expected LAYER:FEATURE:ALPHA"):
        parse_steer("2:5:1.2.3")  # once read by float() unchecked: a ValueError, not the project's error


@pytest.mark.parametrize(("spec", "message"), [
    ("9" * 5000 + ":1:1", "steer layer .* more than 18 digits"),  # int() itself refuses past 4300 digits
    ("1:" + "9" * 100_000 + ":1", "steer spec is 100004 characters long"),
    ("1:" + "9" * 19 + ":1", "steer feature .* more than 18 digits"),
    ("1:1:" + "9" * 400, "steer strength .* not a finite number"),  # float() would give inf
    ("1:1:1e999", "steer strength '1e999' .* not a finite number"),
    ("1:1:0." + "0" * 40 + "1", "at most 32 characters"),
])
def test_parse_steer_bounds_every_number(spec, message):
    """Enormous numbers are refused from their text, with the project's usage error (exit 2), before int() or
    float() reads them; the largest valid ones still read."""
    from qscope_plugin.errors import QScopeError

    with pytest.raises(QScopeError, match=message) as caught:
        parse_steer(spec)
    assert isinstance(caught.value, ValueError)
    (term,) = parse_steer(f"{'9' * 18}:{'9' * 18}:-1.5e2")
    assert (term.layer, term.feature, term.alpha) == (10**18 - 1, 10**18 - 1, -150.0)


def _loglikelihoods(samples: list[dict]) -> list[float]:
    return [r[0] for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]


@torch.no_grad()
def _direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) from one forward under the recipe's ``steer`` (lm-eval's token split)."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[: len(context) - spaces], context[len(context) - spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with steer(model, SPEC, {2: load_sae(DEMO_RELEASE, 2)}):
        logprobs = as_backend(model).logits(ids)[0].float().log_softmax(-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_steered_model_in_lm_eval(demo, manager):
    """alpha = 0 gives HFLM's log-likelihoods exactly; alpha != 0 gives the recipe's steered forward's."""
    model, tok, saes = demo
    plain = _evaluate(HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=4), manager, "toy_arc")
    zero = _evaluate(SteeredHFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=4,
                                 spec=SteeringSpec.single(2, 5, 0.0), saes=saes), manager, "toy_arc")
    steered = _evaluate(SteeredHFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=4, spec=SPEC,
                                    saes=saes), manager, "toy_arc")
    assert _loglikelihoods(zero["samples"]["toy_arc"]) == _loglikelihoods(plain["samples"]["toy_arc"])
    got = _loglikelihoods(steered["samples"]["toy_arc"])
    assert got != _loglikelihoods(plain["samples"]["toy_arc"])
    requests = [a for s in sorted(steered["samples"]["toy_arc"], key=lambda s: s["doc_id"]) for a in s["arguments"]]
    expected = [_direct_loglikelihood(model, tok, ctx, cont) for ctx, cont in requests]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    # the steer is undone after each call: the plain model afterwards scores as before
    again = _evaluate(HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=4), manager, "toy_arc")
    assert _loglikelihoods(again["samples"]["toy_arc"]) == _loglikelihoods(plain["samples"]["toy_arc"])


def test_steered_model_from_model_args(manager):
    """The registered name and string arguments, as ``lm_eval --model qscope-steered --model_args ...``."""
    results = lm_eval.simple_evaluate(
        model="qscope-steered", model_args=f"pretrained={DEMO_MODEL_DIR},release={DEMO_RELEASE},steer=2:5:6",
        tasks=["toy_gsm8k"], task_manager=manager, limit=3, device="cpu", log_samples=True)
    assert "exact_match,strict-match" in results["results"]["toy_gsm8k"]
    assert len(results["samples"]["toy_gsm8k"]) == 2 * 3  # two filters, three documents


@pytest.fixture(scope="module")
def panel_outputs(demo, manager, tmp_path_factory) -> dict[str, Path]:
    """lm-eval outputs of three demo variants (unsteered and steered both ways) on the three tasks."""
    model, tok, saes = demo
    root = tmp_path_factory.mktemp("lm_eval_outputs")
    variants = {"base": None, "plus": SPEC, "minus": SteeringSpec.single(2, 5, -6.0)}
    for name, spec in variants.items():
        lm = SteeredHFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=8, spec=spec, saes=saes)
        _evaluate(lm, manager, list(TASKS), root / name, num_fewshot=1)
    return {name: root / name for name in variants}


def test_outputs_read_back_as_lm_eval_logged_them(panel_outputs):
    panel = read_lm_eval_outputs(list(panel_outputs.values()))
    assert panel.models == ["base", "plus", "minus"] and sorted(panel.tasks) == sorted(TASKS)
    assert panel.tasks["toy_arc"].metric == "acc,none"
    assert panel.tasks["toy_gsm8k"].metric == "exact_match,strict-match"
    for model, folder in panel_outputs.items():
        (results_file,) = folder.rglob("results_*.json")
        results = json.loads(results_file.read_text())
        for task, read in panel.tasks.items():
            (samples_file,) = folder.rglob(f"samples_{task}_*.jsonl")
            logged = [json.loads(line) for line in samples_file.read_text().splitlines()]
            metric, filter_key = read.metric.split(",")
            expected = {s["doc_id"]: s[metric] for s in logged if s["filter"] == filter_key}
            assert read.correctness.loc[model].to_dict() == expected
            assert read.correctness.loc[model].mean() == pytest.approx(results["results"][task][read.metric])
            assert panel.scores.loc[model, task] == results["results"][task][read.metric]
    acc_norm = read_lm_eval_outputs(panel_outputs, tasks=["toy_arc"], metrics={"toy_arc": "acc_norm"})
    assert acc_norm.tasks["toy_arc"].metric == "acc_norm,none"


def test_panel_gives_a_complete_redundancy_report(demo, manager, panel_outputs, tmp_path):
    model, tok, saes = demo
    panel = read_lm_eval_outputs(panel_outputs, tasks=["toy_arc", "toy_piqa", "toy_gsm8k"])
    fps = {task: harvest_task_footprints(model, tok, task, {2: saes[2]}, num_fewshot=1, manager=manager,
                                         progress=False) for task in panel.tasks}
    panel.check_footprints(fps)
    report = redundancy_report({name: fp[2] for name, fp in fps.items()}, correctness=panel.correctness_arrays(),
                               scores=panel.scores, reference="toy_arc", n_draws=20)
    assert all(row.performance_redundancy is not None for row in report.benchmarks.values())
    assert report.pearson is not None and report.partial_pearson is not None
    assert report.spearman_r_vs_rhat is not None and report.overlap.names == list(panel.tasks)
    other = harvest_task_footprints(model, tok, "toy_arc", {2: saes[2]}, limit=5, manager=manager, progress=False)
    with pytest.raises(LmEvalError, match="footprints hold 5 samples but lm-eval scored 12"):
        panel.check_footprints({"toy_arc": other})
    zero_shot = harvest_task_footprints(model, tok, "toy_arc", {2: saes[2]}, num_fewshot=0, manager=manager,
                                        progress=False)
    with pytest.raises(LmEvalError, match="other contexts than any model was scored on"):
        panel.check_footprints({"toy_arc": zero_shot})


def test_bad_output_folders(panel_outputs, tmp_path):
    with pytest.raises(LmEvalError, match="no lm-eval results_.*json under"):
        read_lm_eval_outputs([tmp_path])
    with pytest.raises(LmEvalError, match=r"no per-sample metric 'f1'.*acc,none, acc_norm,none"):
        read_lm_eval_outputs(panel_outputs, tasks=["toy_arc"], metrics={"toy_arc": "f1"})
    # a model scored on fewer documents, then on other documents
    changed = {**panel_outputs, "short": tmp_path / "short"}
    source = next(panel_outputs["base"].rglob("samples_toy_arc_*.jsonl"))
    target = tmp_path / "short" / "model" / source.name
    target.parent.mkdir(parents=True)
    results = next(panel_outputs["base"].rglob("results_*.json"))
    (target.parent / results.name).write_text(results.read_text())
    lines = source.read_text().splitlines()
    target.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(LmEvalError, match=r"different numbers of documents .*short: 11"):
        read_lm_eval_outputs(changed, tasks=["toy_arc"])
    edited = [json.loads(line) for line in lines]
    edited[0]["doc_hash"] = "0" * 64
    target.write_text("".join(json.dumps(s) + "\n" for s in edited))
    with pytest.raises(LmEvalError, match="short scored other documents than base"):
        read_lm_eval_outputs(changed, tasks=["toy_arc"])
    versions = json.loads(results.read_text())
    versions["versions"]["toy_arc"] = "2.0"
    target.write_text(source.read_text())
    (target.parent / results.name).write_text(json.dumps(versions))
    with pytest.raises(LmEvalError, match=r"different task versions .*short: 2.0"):
        read_lm_eval_outputs(changed, tasks=["toy_arc"])
    with pytest.raises(LmEvalError, match=r"no samples_toy_piqa_\*.jsonl for short"):
        read_lm_eval_outputs(changed, tasks=["toy_piqa"])


def test_cli_footprints_and_redundancy_from_lm_eval(tasks, panel_outputs, tmp_path, capsys):
    from qscope_plugin.cli import main

    paths = []
    for task in TASKS:
        paths.append(str(tmp_path / f"{task}.safetensors"))
        assert main(["footprints", "--lm-eval-task", task, "--include-path", str(tasks), "--num-fewshot", "1",
                     "--layers", "2", "--out", paths[-1]]) == 0
    assert "toy_gsm8k layer 2: 12 samples" in capsys.readouterr().out
    assert Footprints.load(paths[0]).provenance["num_fewshot"] == 1
    out = tmp_path / "report"
    assert main(["redundancy", *paths, "--lm-eval-outputs", *map(str, panel_outputs.values()), "--reference",
                 "toy_arc", "--n-draws", "20", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(row["performance_redundancy"] is not None for row in report["benchmarks"].values())
    assert sorted(report["pearson"]["names"]) == sorted(TASKS) and report["partial_pearson"] is not None
    assert main(["footprints", "--lm-eval-task", "toy_ark", "--include-path", str(tasks), "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "close matches: toy_arc" in capsys.readouterr().err
    assert main(["redundancy", paths[0], "--lm-eval-outputs", str(tmp_path), "--out", str(out)]) == 2
    assert "no lm-eval results_*.json under" in capsys.readouterr().err
    assert main(["footprints", "data.jsonl", "--num-fewshot", "2", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "--num-fewshot only apply with --lm-eval-task" in capsys.readouterr().err


def test_steered_generation_equals_the_recipes_steered_generate(demo, manager):
    """generate_until under qscope-steered: the continuation of greedy generation under ``steer``, cut at the
    task's stop sequence, and not the unsteered one."""
    model, tok, saes = demo
    logged = _evaluate(SteeredHFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=1, spec=SPEC,
                                   saes=saes), manager, "toy_gsm8k", limit=4)["samples"]["toy_gsm8k"]
    backend = as_backend(model)
    steered, plain = [], []
    for sample in sorted((s for s in logged if s["filter"] == "strict-match"), key=lambda s: s["doc_id"]):
        ids = tok(sample["arguments"][0][0], return_tensors="pt", add_special_tokens=False)["input_ids"]
        with steer(model, SPEC, saes):
            new = backend.generate(ids, max_new_tokens=6, pad_token_id=tok.pad_token_id)[0]
        steered.append(sample["resps"][0][0])
        plain.append(tok.decode(backend.generate(ids, max_new_tokens=6)[0], skip_special_tokens=True)
                     .split("Question:")[0])
        assert sample["resps"][0][0] == tok.decode(new, skip_special_tokens=True).split("Question:")[0]
    assert steered != plain
