# %% [markdown]
# # Benchmark redundancy from SAE footprints (Qwen-Scope report §4)
#
# The report harvests, for each benchmark sample, the SAE features active at the last prompt token (R3), then
# compares benchmarks by their footprints: exact coverage c_n and feature redundancy R̂(D), the asymmetric overlap,
# and, with a panel of models' per-sample scores, performance redundancy R(D) and partial correlations. The demo
# model has no benchmarks, so this notebook builds a toy suite from sentence sets; for real benchmarks set
# `MODEL, RELEASE, LAYER` to a Qwen3 model and its SAEs, and load data with
# `qscope_plugin.recipes.data.load_table("openai/gsm8k", config="main", split="test")` and a
# `template="Question: {question}\nAnswer:"`.

# %%
import json
import tempfile
from pathlib import Path

import lm_eval
import numpy as np
from lm_eval.loggers import EvaluationTracker

from qscope_plugin import load_sae
from qscope_plugin.adapters.lm_eval import SteeredHFLM, harvest_task_footprints, read_lm_eval_outputs, task_manager
from qscope_plugin.demo.run import SENTENCES
from qscope_plugin.models import default_model, default_release, load_model
from qscope_plugin.recipes._harvest import harvest
from qscope_plugin.recipes.discovery import ContrastOptions, contrast_codes
from qscope_plugin.recipes.footprints import Footprints, harvest_footprints
from qscope_plugin.recipes.redundancy import expected_coverage, redundancy_report
from qscope_plugin.recipes.reports import write_report
from qscope_plugin.recipes.steering import SteeringSpec

MODEL, RELEASE, LAYER = default_model(), default_release(), 3

model, tokenizer = load_model(MODEL)
saes = {LAYER: load_sae(RELEASE, LAYER)}
suite = {"zh": SENTENCES["zh"], "zh_half": SENTENCES["zh"][::2], "en": SENTENCES["en"],
         "mixed": SENTENCES["mixed_prompts"]}
work = Path(tempfile.mkdtemp())

# %% [markdown]
# Harvest: batched by length, the forward stops after the deepest layer asked for, chunks are checkpointed next
# to `out` so an interrupted run resumes (`torchrun --nproc_per_node N -m qscope_plugin.cli footprints ...` shards
# it over processes).

# %%
footprints = {}
for name, texts in suite.items():
    fp = harvest_footprints(model, tokenizer, texts, saes, name=name, out=work / f"{name}.safetensors",
                            progress=False)
    footprints[name] = Footprints.load(work / f"{name}.safetensors")[LAYER]
    print(name, len(fp[LAYER]), "samples, |F(D)| =", len(fp[LAYER].features()))

# %% [markdown]
# Exact coverage: c_n for a few subset sizes (no Monte Carlo; R8b).

# %%
zh = footprints["zh"]
print({n: round(float(c), 3) for n, c in zip([1, 5, 10, 40], expected_coverage(zh.support(), len(zh), [1, 5, 10, 40]),
                                             strict=True)})

# %% [markdown]
# The report, with a synthetic panel of six "models" whose accuracy rises with ability, for R(D), the Pearson
# and partial correlations (here controlling for `en`).

# %%
rng = np.random.default_rng(0)
ability = np.linspace(0.2, 0.9, 6)
correctness = {name: (rng.random((6, len(fp))) < ability[:, None]).astype(float) for name, fp in footprints.items()}
report = redundancy_report(footprints, correctness=correctness, reference="en", n_draws=100)
write_report(report, work / "report")
for name, row in report.benchmarks.items():
    print(f"{name:8} N={row.n_samples:3} |F|={row.footprint_size:4} R̂={row.feature_redundancy:.3f} "
          f"R={row.performance_redundancy:.3f}")
print(report.summary.drop_candidates, "report:", work / "report" / "report.md")

# %% [markdown]
# ## The same report from lm-evaluation-harness (`pip install "qscope-plugin[eval]"`)
#
# With real benchmarks the prompts and the per-sample scores come from lm-eval: `harvest_task_footprints` (or
# `qscope footprints --lm-eval-task`) harvests each document on the context lm-eval scores it on, and
# `read_lm_eval_outputs` (or `qscope redundancy --lm-eval-outputs`) reads the `--log_samples` folders of a panel of
# models. Offline, the tasks here are local: each YAML `include:`-s lm-eval's builtin `piqa` YAML and reads a json
# file of two-choice documents built from the sentence pairs (continue a half sentence in its own language rather
# than switch). The panel is the demo model and four steered variants of it (`qscope-steered`, the Chinese
# feature scaled from −16 to +16), each evaluated by `lm_eval.simple_evaluate` and saved as `lm_eval` saves.

# %%
builtin = Path(lm_eval.__file__).parent / "tasks" / "piqa" / "piqa.yaml"
tasks = work / "tasks"
tasks.mkdir()


def two_choice(first: list[str], other: list[str], space: str) -> list[dict]:
    """Half of a sentence, then its own second half (label 0) or the sentence in the other language."""
    rows = []
    for own, switch in zip(first, other, strict=True):
        parts = own.split() if space else list(own)
        half = len(parts) // 2
        rows.append({"goal": space.join(parts[:half]), "sol1": space.join(parts[half:]), "sol2": switch, "label": 0})
    return rows


documents = {"stay_en": two_choice(SENTENCES["en"], SENTENCES["zh"], " "),
             "stay_en_half": two_choice(SENTENCES["en"][::2], SENTENCES["zh"][::2], " "),
             "stay_zh": two_choice(SENTENCES["zh"], SENTENCES["en"], "")}
for name, rows in documents.items():
    (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tasks / f"{name}.yaml").write_text(f"include: {builtin}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
                                        f"training_split: null\ndataset_kwargs:\n  data_files:\n"
                                        f"    validation: {tasks / f'{name}.jsonl'}\n")
manager = task_manager(tasks, include_defaults=False)  # the builtin index is not needed for local tasks

steer_saes = {2: load_sae(RELEASE, 2)}
ranking = contrast_codes(harvest(model, tokenizer, SENTENCES["zh"], steer_saes),
                         harvest(model, tokenizer, SENTENCES["en"], steer_saes),
                         {2: steer_saes[2].cfg.d_sae}, ContrastOptions(method="rate"))
chinese = ranking[2][0].feature
panel_dirs = {}
for alpha in (-16.0, -8.0, 0.0, 8.0, 16.0):
    spec = SteeringSpec.single(2, chinese, alpha, direction_norm="unit")
    lm = SteeredHFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=16, spec=spec, saes=steer_saes)
    tracker = EvaluationTracker(output_path=str(work / "runs" / f"alpha{alpha:+g}"))
    results = lm_eval.simple_evaluate(model=lm, tasks=list(documents), task_manager=manager, log_samples=True,
                                      evaluation_tracker=tracker)
    tracker.save_results_aggregated(results=results, samples=results["samples"])
    for name in documents:
        tracker.save_results_samples(task_name=name, samples=results["samples"][name])
    panel_dirs[f"alpha{alpha:+g}"] = work / "runs" / f"alpha{alpha:+g}"

panel = read_lm_eval_outputs(panel_dirs)
print(panel.scores.round(3))
task_fps = {name: harvest_task_footprints(model, tokenizer, name, saes, manager=manager, progress=False)
            for name in panel.tasks}
panel.check_footprints(task_fps)  # same documents as lm-eval scored
report = redundancy_report({name: fp[LAYER] for name, fp in task_fps.items()}, correctness=panel.correctness_arrays(),
                           scores=panel.scores, reference="stay_en", n_draws=100)
for name, row in report.benchmarks.items():
    print(f"{name:13} N={row.n_samples:3} |F|={row.footprint_size:4} R̂={row.feature_redundancy:.3f} "
          f"R={row.performance_redundancy:.3f}")
print("drop:", [(d.benchmark, d.covered_by, round(d.overlap, 2)) for d in report.summary.drop_candidates])
print("pearson:\n", report.pearson.to_frame().round(3))
