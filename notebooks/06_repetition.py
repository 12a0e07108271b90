# %% [markdown]
# # Repetition features and repetition-steered rollouts for GRPO / DAPO (Qwen-Scope report §8)
#
# RL rarely samples endless repetition, so it never learns to avoid it. The report finds "repetition features"
# (R32: activation at the last repeated occurrence of a token minus at its first), steers one extra rollout per
# group with them (R33) to create a rare negative, and trains with DAPO on a reward that penalises repetition.
# Here the same code runs on the shipped demo model (4 layers, d_model 128), whose greedy continuations of short
# Chinese prompts often end in a loop ('我就买了，我就买了，…'). For a real model set `MODEL, RELEASE`.

# %%
import copy
import json
import os
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import matplotlib.pyplot as plt
import torch
from datasets import Dataset
from trl import GRPOTrainer

import qscope_plugin.demo
from qscope_plugin import load_sae
from qscope_plugin.adapters.trl import dapo_config, repetition_reward_func, repetition_rollout_func
from qscope_plugin.models import default_model, default_release, load_model
from qscope_plugin.recipes.repetition import (
    causal_check,
    continuations,
    find_repeats,
    is_repetitive,
    repeat_ratio,
    repetition_features,
    repetition_spec,
)

MODEL, RELEASE, SEED, LENGTH = default_model(), default_release(), 0, 40
lines = json.loads((Path(qscope_plugin.demo.__file__).parent / "prompts.json").read_text(encoding="utf-8"))["zh"]
prompts = [line[:4] for line in lines[:16]]  # the first four characters of 16 demo sentences
model, tokenizer = load_model(MODEL)
saes = {n: load_sae(RELEASE, n) for n in range(model.config.num_hidden_layers)}

# %% [markdown]
# Repeat ratio: a completion is repetitive when a unit of 1..32 tokens repeats at least 3 times in a row up to
# its last token (an endless loop; a completion that stopped never counts). Greedy continuations first.

# %%
greedy = continuations(model, tokenizer, prompts, max_new_tokens=LENGTH)  # one left-padded batch
for prompt, ids in zip(prompts, greedy, strict=True):
    print(f"{'LOOP' if is_repetitive(ids) else '    '} {prompt}{tokenizer.decode(ids, skip_special_tokens=True)}")
print(f"repeat ratio (greedy, {LENGTH} tokens): {repeat_ratio(greedy):.2f}")

# %% [markdown]
# Repetition features (R32): Δ^rep averaged over each text's repeated tokens, then over texts; top 3 per layer.

# %%
texts = [p + tokenizer.decode(ids, skip_special_tokens=True) for p, ids in zip(prompts, greedy, strict=True)
         if find_repeats(ids)]
found = repetition_features(model, tokenizer, texts, saes, n_features=3)
print(f"{found.n_texts} texts, {found.n_tokens} repeated tokens")
for n in found.features:
    print(n, [(f, round(s, 2)) for f, s in zip(found.features[n], found.scores[n], strict=True)])

# %% [markdown]
# Causal check (R33 at every decode step, unit-norm directions, the top feature of layers 1 and 2; the demo's
# residual norm there is about 50-60): repeat ratio against α beside a random direction of the same norm.
# α < 0 suppresses.

# %%
spec = repetition_spec(found, 1.0, layers=[1, 2], direction_norm="unit")
check = causal_check(model, tokenizer, prompts, spec, saes, [-32.0, 0.0, 32.0], max_new_tokens=LENGTH, seed=SEED)
print("| α | repetition features | random direction |")
print("|---|---|---|")
for row in check.rows:
    print(f"| {row.alpha:+.0f} | {row.features:.2f} | {row.random:.2f} |")

# %% [markdown]
# Short GRPO runs with DAPO's loss (TRL `GRPOTrainer`, `dapo_config`), same seed, prompts and steps: groups of 4
# with the steered negative (α = 32) and without it (α = 0, four normal samples), temperature 0.3. Reward:
# −(repeated share of the completion) − 1 if it loops to the end, counting units repeated twice or more (the demo
# model's samples rarely reach three copies). Logged per step: mean reward and the repeat ratio (units repeated
# twice or more, to the end) of the normal samples.


# %%
def train(alpha: float, steps: int = 3) -> list[dict]:
    torch.manual_seed(SEED)
    history: list[dict] = []

    def watch(completion_ids, steered, **kwargs):
        """Not a reward (weight 0): records the repeat ratio of the normal samples of each step."""
        normal = [c for c, s in zip(completion_ids, steered, strict=True) if not s]
        history.append({"repeat_ratio": repeat_ratio(normal, min_repeats=2)})
        return [0.0] * len(completion_ids)

    args = dapo_config("grpo_out", max_steps=steps, per_device_train_batch_size=8, num_generations=4,
                       max_completion_length=32, temperature=0.3, learning_rate=2e-4, use_cpu=True, seed=SEED,
                       logging_steps=1, reward_weights=[1.0, 0.0], save_strategy="no", disable_tqdm=True,
                       log_level="error")
    trainer = GRPOTrainer(model=copy.deepcopy(model), args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          reward_funcs=[repetition_reward_func(min_repeats=2), watch],
                          rollout_func=repetition_rollout_func(repetition_spec(found, alpha, layers=[1, 2],
                                                                               direction_norm="unit"), saes))
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return [{**h, "reward": r} for h, r in zip(history, rewards, strict=True)]


runs = {"DAPO + steered negative": train(32.0), "DAPO": train(0.0)}
print("| step | " + " | ".join(f"{name}: reward, repeat ratio" for name in runs) + " |")
print("|---|" + "---|" * len(runs))
for step in range(len(runs["DAPO"])):
    print(f"| {step + 1} | " + " | ".join(f"{r[step]['reward']:.2f}, {r[step]['repeat_ratio']:.2f}"
                                          for r in runs.values()) + " |")
fig, axes = plt.subplots(1, 2, figsize=(8, 3))
for name, history in runs.items():
    axes[0].plot([h["reward"] for h in history], label=name)
    axes[1].plot([h["repeat_ratio"] for h in history], label=name)
axes[0].set(title="mean reward", xlabel="step")
axes[1].set(title="repeat ratio (normal samples)", xlabel="step")
axes[0].legend()
fig.tight_layout()
fig.savefig("repetition_grpo.png", dpi=100)
