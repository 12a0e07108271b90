# %% [markdown]
# # Feature-driven safety data synthesis (Qwen-Scope report §6)
#
# Targets are SAE features judged relevant to safety; prompts are generated for the targets the seed data misses
# and kept only if they fire their feature through the SAE. Here every model call goes to the small demo model:
# every step is real, but a 4-layer LM trained on plain sentences cannot follow the instructions in the templates,
# so few prompts verify and the baselines win (docs/safety_synthesis.md). For the report's setup use Qwen3-8B with
# the layer-30 W64K SAE and a strong chat model for `ChatModel`.

# %%
from qscope_plugin import load_sae
from qscope_plugin.demo.run import PROMPTS
from qscope_plugin.models import default_model, default_release, load_model
from qscope_plugin.recipes.chat import ChatModel
from qscope_plugin.recipes.safety_synthesis import (
    build_targets,
    compare_coverage,
    coverage,
    plot_coverage_curves,
    synthesize,
)

MODEL, RELEASE, LAYER = default_model(), default_release(), 3

model, tokenizer = load_model(MODEL)
saes = {LAYER: load_sae(RELEASE, LAYER)}
chat = ChatModel(model, tokenizer, max_new_tokens=16)
corpus = PROMPTS["zh"] + PROMPTS["en"]

# %%
# `ChatModel` renders every prompt through the tokenizer's chat template (Qwen3: enable_thinking=False) and strips
# <think> blocks; the categorizer picks each target's risk category (z = benign only for "benign").
targets = build_targets(model, tokenizer, saes, {LAYER: list(range(40))}, corpus, chat.explainer(), chat.judge(),
                        tau=0.0, categorize=chat.categorizer())
seed = PROMPTS["en"][:6]
before = coverage(model, tokenizer, saes, targets, seed)
print(f"{len(targets)} targets; Cov(seed) = {before.cov:.2f}; {len(before.missing)} uncovered; "
      f"by category {before.by_category}")

# %%
# Generators sample (seeded by their input) exactly as the random baseline does, so the lines below differ only
# in coverage guidance and SAE verification.
BUDGETS = [0, 6, 12, 18, 24]
kept = synthesize(model, tokenizer, saes, targets, chat.generators(), seed_prompts=seed, budget=max(BUDGETS))
print(f"{len(kept)} of {max(BUDGETS)} generated prompts verified; e.g. {kept[:1]}")
# the feature-driven line reuses the verified rows above; the random baseline never sees an explanation
curves = compare_coverage(model, tokenizer, saes, targets, chat.generators(), seed_prompts=seed,
                          pool=PROMPTS["zh"], budgets=BUDGETS, rows=kept)
print("budget " + " ".join(f"{b:>5}" for b in BUDGETS))
for name, values in curves.items():
    print(f"{name:<17} " + " ".join(f"{v:5.3f}" for v in values))
print("figure:", plot_coverage_curves(curves, BUDGETS, "safety_coverage_vs_budget.png"))
