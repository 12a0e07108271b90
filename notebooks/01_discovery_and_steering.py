# %% [markdown]
# # Feature discovery and steering (Qwen-Scope report §3)
#
# Runs on the demo model shipped with the package. To use a real release, change the two lines below, e.g.
# `MODEL, RELEASE, LAYERS = "Qwen/Qwen3-8B-Base", "qwen-scope-3-8b-base-w64k-l50", [18, 24]`.

# %%
from qscope_plugin import load_sae
from qscope_plugin.demo.run import PROMPTS, char_breakdown
from qscope_plugin.models import default_model, default_release, load_model
from qscope_plugin.recipes.discovery import analyze, contrast, top_contexts
from qscope_plugin.recipes.steering import SteeringSpec, generate

MODEL, RELEASE, LAYERS = default_model(), default_release(), [2, 3]

model, tokenizer = load_model(MODEL)
saes = {n: load_sae(RELEASE, n) for n in LAYERS}

# %% [markdown]
# Top features of each token of a mixed Chinese / English sentence.

# %%
for row in analyze(model, tokenizer, PROMPTS["mixed"], saes, top_n=3)[:12]:
    print(row.layer, row.position, repr(row.token), row.features)

# %% [markdown]
# Contrastive identification: which feature fires more on Chinese than on English lines (R1)?

# %%
ranking = contrast(model, tokenizer, PROMPTS["zh"], PROMPTS["en"], saes, method="mean", top_k=3)
for layer, scores in ranking.items():
    print(layer, scores)
layer = LAYERS[-1]
feature = ranking[layer][0].feature

# %% [markdown]
# Where does it fire most? (top-activating contexts over the same sentences)

# %%
for context in top_contexts(model, tokenizer, PROMPTS["zh"] + PROMPTS["en"], saes, {layer: [feature]}, n_top=5)[
        (layer, feature)]:
    print(f"{context.activation:.2f}  {context.snippet}")

# %% [markdown]
# Steering with h' = h + α·d (unit direction, α in residual-norm units): suppress, then amplify.

# %%
for alpha in (-40.0, 40.0):
    spec = SteeringSpec.single(layer, feature, alpha, direction_norm="unit")
    result = generate(model, tokenizer, "我们明天", spec, saes, max_new_tokens=16)
    print(alpha, repr(result.unsteered.text), "->", repr(result.steered.text), char_breakdown([result.steered.text]))
