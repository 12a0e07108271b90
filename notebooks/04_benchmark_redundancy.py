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
import tempfile
from pathlib import Path

import numpy as np

from qscope_plugin import load_sae
from qscope_plugin.demo.run import SENTENCES
from qscope_plugin.models import default_model, default_release, load_model
from qscope_plugin.recipes.footprints import Footprints, harvest_footprints
from qscope_plugin.recipes.redundancy import expected_coverage, redundancy_report
from qscope_plugin.recipes.reports import write_report

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
