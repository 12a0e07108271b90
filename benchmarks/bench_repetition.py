"""A repetition-steered rollout group vs an unsteered group of the same size on the demo model (target: <= 1.10x),
and the cost of the repetition detector and reward on one completion of growing length (target: linear in length).

    python benchmarks/bench_repetition.py        # prints a table, writes docs/benchmarks_repetition.md

A group is what GRPO needs per prompt: G sampled completions and their old log-probs. Unsteered: one sampled
``generate`` of G rows and one forward for the log-probs, no hook. Steered (``rollout_groups``): the same, with
the last row steered at every decode step (R33) by a hook on two layers. EOS is switched off so both sides
generate exactly ``NEW`` tokens per row. Best of several interleaved runs.

The detector runs inside GRPO rewards on every completion: ``is_repetitive`` (the repeat ratio's test) and
``repetition_reward`` (repeated share + endless loop) on random tokens and on text ending in a long loop, for
lengths 512 to 32,768; O(n · max_period) means the time per token does not grow with the length.
"""

from __future__ import annotations

import copy
import os
import platform
import random

import torch
import transformers
from _timing import best_of_interleaved, publish

from qscope_plugin import load_sae
from qscope_plugin.backends import as_backend
from qscope_plugin.models import default_model, default_release, load_model
from qscope_plugin.recipes.repetition import (
    is_repetitive,
    old_logprobs,
    repetition_reward,
    repetition_spec,
    rollout_groups,
)

REPEATS, G, NEW = 5, 8, 32
LENGTHS = (512, 4096, 32768)


def detector_rows() -> list[str]:
    """Milliseconds per completion for the detector and the reward, random text vs a loop over its second half."""
    rng = random.Random(0)
    rows = ["| tokens | text | is_repetitive (ms) | repetition_reward (ms) | reward µs / token |",
            "|---|---|---|---|---|"]
    for n in LENGTHS:
        noise = [rng.randrange(1000) for _ in range(n)]
        unit = [rng.randrange(1000) for _ in range(7)]
        texts = {"random": noise, "loop of 7 over the second half": noise[: n // 2] + (unit * n)[: n - n // 2]}
        for name, ids in texts.items():
            t = best_of_interleaved({"detect": lambda ids=ids: is_repetitive(ids),
                                     "reward": lambda ids=ids: repetition_reward([ids])}, repeats=REPEATS)
            rows.append(f"| {n} | {name} | {t['detect'] * 1e3:.3f} | {t['reward'] * 1e3:.2f} | "
                        f"{t['reward'] / n * 1e6:.3f} |")
    return rows


def main() -> None:
    print(f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    base, tok = load_model(default_model())
    model = copy.deepcopy(base)
    model.generation_config.eos_token_id = None  # fixed length: both sides generate NEW tokens per row
    backend = as_backend(model)
    saes = {n: load_sae(default_release(), n) for n in range(4)}
    spec = repetition_spec({1: [1022], 2: [95]}, 8.0, direction_norm="unit")
    prompt = tok("医生建议", add_special_tokens=False)["input_ids"]

    def unsteered() -> None:
        new = backend.generate(torch.tensor([prompt] * G), max_new_tokens=NEW, do_sample=True, pad_token_id=0)
        old_logprobs(backend, prompt, new.tolist())

    def steered() -> None:
        rollout_groups(backend, [prompt], spec, saes, group_size=G, max_new_tokens=NEW, pad_token_id=0)

    timings = best_of_interleaved({"unsteered group": unsteered, "steered group (rollout_groups)": steered},
                                  repeats=REPEATS)
    base_t = timings["unsteered group"]
    rows = ["# Repetition-steered rollout group vs unsteered group", "",
            f"`python benchmarks/bench_repetition.py` on {platform.machine()}, {os.cpu_count()} CPU cores, torch "
            f"{torch.__version__}: demo model (Qwen3, 4 layers, hidden 128, vocab 151k), G = {G} rows, prompt of "
            f"{len(prompt)} tokens, {NEW} sampled tokens per row (EOS off), then one forward for the old log-probs; "
            f"steering on layers {list(spec.layers)} of the last row; best of {REPEATS}, interleaved.", "",
            "| group | seconds | vs unsteered |", "|---|---|---|"]
    rows += [f"| {name} | {t:.4f} | {t / base_t:.3f}x |" for name, t in timings.items()]
    rows += ["", "## The detector and the reward on one completion", "",
             "`is_repetitive` (does it end in a unit of 1–32 tokens repeated ≥ 3 times) and `repetition_reward` "
             "(−repeated share − 1 if endless) with their defaults, on one completion of random token ids (vocab "
             f"1000) and on one whose second half is a loop of 7 tokens; best of {REPEATS}, interleaved.", "",
             *detector_rows()]
    text = "\n".join(rows) + "\n"
    publish(text, "benchmarks_repetition.md")


if __name__ == "__main__":
    main()
