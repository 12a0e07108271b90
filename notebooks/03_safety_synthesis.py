# %% [markdown]
# # Feature-driven safety data synthesis (Qwen-Scope report §6)
#
# Targets are SAE features judged relevant to safety; prompts are generated for the targets the seed data misses
# and kept only if they fire their feature through the SAE. Here every model call goes to the small demo model
# (it writes nonsense, but every step is real). For the report's setup use Qwen3-8B with the layer-30 W64K SAE
# and a strong chat model for `ChatModel`.

# %%
from qscope_plugin import load_sae
from qscope_plugin.demo.run import PROMPTS
from qscope_plugin.models import default_model, default_release, load_model
from qscope_plugin.recipes.safety_synthesis import (
    ChatModel,
    build_targets,
    compare_coverage,
    coverage,
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
kept = synthesize(model, tokenizer, saes, targets, chat.generators(), seed_prompts=seed, budget=12)
print(f"{len(kept)} verified examples; e.g. {kept[:1]}")
# the feature-driven line reuses the verified rows above; the random baseline never sees an explanation
curves = compare_coverage(model, tokenizer, saes, targets, chat.generators(), seed_prompts=seed,
                          pool=PROMPTS["zh"], budgets=[0, 4, 8, 12], rows=kept)
print(curves)
