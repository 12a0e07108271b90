# %% [markdown]
# # OR-rule classifiers over SAE features (Qwen-Scope report §5)
#
# The report classifies toxicity in 13 languages (`textdetox/multilingual_toxicity_dataset`). The demo model has no
# toxicity data, so this notebook classifies Chinese vs English lines with the same code; for the real task set
# `MODEL, RELEASE` to a Qwen3 model and its SAEs and load the data with
# `qscope_plugin.recipes.toxicity.load_splits("textdetox/multilingual_toxicity_dataset", ["en", "ru"])`.

# %%
import json
import tempfile
from pathlib import Path

import numpy as np

from qscope_plugin import load_sae
from qscope_plugin.demo.run import PROMPTS
from qscope_plugin.models import default_model, default_release, load_model
from qscope_plugin.recipes.classifiers import ORRuleClassifier
from qscope_plugin.recipes.toxicity import Split, evaluate

MODEL, RELEASE, LAYERS = default_model(), default_release(), [0, 1, 2, 3]

model, tokenizer = load_model(MODEL)
saes = {n: load_sae(RELEASE, n) for n in LAYERS}
texts = PROMPTS["zh"] + PROMPTS["en"]
labels = np.array([1] * len(PROMPTS["zh"]) + [0] * len(PROMPTS["en"]))
even, odd = np.arange(len(texts)) % 2 == 0, np.arange(len(texts)) % 2 == 1

# %% [markdown]
# Fit on half the lines (discovery, R15-R17, ℓ* by top1-diff R19), score on the other half.

# %%
clf = ORRuleClassifier(model, tokenizer, saes, k_features=2).fit([texts[i] for i in np.flatnonzero(even)],
                                                                 labels[even])
print("features", clf.features, "top1-diff", clf.top1_diff)
print(clf.score([texts[i] for i in np.flatnonzero(odd)], labels[odd]))

# %% [markdown]
# Save and reload: the JSON records the backbone, the SAE release and geometry, layers, features, ε, thresholds and
# provenance; `load` refuses SAEs of another release, width or k.

# %%
path = Path(tempfile.mkdtemp()) / "zh_vs_en.json"
clf.save(path)
saved = json.loads(path.read_text())
print({key: saved[key] for key in ("model_id", "release", "layers", "features", "eps", "thresholds", "saes")})
again = ORRuleClassifier.load(path, model, tokenizer, saes)
assert (again.predict(texts) == clf.predict(texts)).all()

# %% [markdown]
# The full evaluation: precision / recall / F1 by layer and K (per language and macro), multi-layer composition
# (R20), transfer, data efficiency.

# %%
split = Split([texts[i] for i in np.flatnonzero(even)], labels[even], [texts[i] for i in np.flatnonzero(odd)],
              labels[odd])
report = evaluate(model, tokenizer, saes, {"zh-vs-en": split}, ks=(1, 2, 5), m_layers=2, fractions=(0.25, 0.5))
print(report.languages["zh-vs-en"].best_layer_f1, report.data_efficiency)
print("macro P/R/F1 at ℓ* by K:", report.macro.selected_layer)
