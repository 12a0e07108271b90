"""One SASFT training step vs one plain SFT step on the demo model (target: at most 1.10x).

    python benchmarks/bench_sasft.py             # prints a table, writes docs/benchmarks_sasft.md

A step is forward, backward and an AdamW update on a batch of 8 Chinese-context / English-answer examples. Plain
SFT is the model's own CE loss; SASFT adds lambda * L_reduce read from the last two layers through the penalty's
hooks (2 encoder rows per layer). Best of several interleaved runs.
"""

from __future__ import annotations

import copy
import json
import os
import platform
from pathlib import Path

import torch
import transformers
from _timing import best_of_interleaved, publish

import qscope_plugin.demo
from qscope_plugin import load_sae
from qscope_plugin.backends import as_backend
from qscope_plugin.models import default_model, default_release, load_model
from qscope_plugin.recipes.sasft import Example, SASFTPenalty, collate, encode_examples, language_features, sasft_loss

REPEATS, BATCH = 10, 8


def main() -> None:
    print(f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    lines = json.loads((Path(qscope_plugin.demo.__file__).parent / "eval_sentences.json").read_text("utf-8"))
    base, tok = load_model(default_model())
    saes = {n: load_sae(default_release(), n) for n in range(4)}
    features = language_features(base, tok, {"zh": lines["zh"][:10], "en": lines["en"][:10]}, saes, target="zh")
    batch = collate(encode_examples(tok, [Example(z + " ", e, "en") for z, e in
                                          zip(lines["zh"][:BATCH], lines["en"][:BATCH], strict=True)], features),
                    tok.pad_token_id)
    model = copy.deepcopy(base).train()
    backend, penalty = as_backend(model), SASFTPenalty(model, features, saes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def sft() -> None:
        step(backend.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss)

    def sasft() -> None:
        step(sasft_loss(penalty, batch).loss)

    timings = best_of_interleaved({"plain SFT step": sft, "SASFT step": sasft}, repeats=REPEATS)
    base_t = timings["plain SFT step"]
    rows = ["# SASFT training step vs plain SFT", "",
            f"`python benchmarks/bench_sasft.py` on {platform.machine()}, {os.cpu_count()} CPU cores, torch "
            f"{torch.__version__}: demo model (Qwen3, 4 layers, hidden 128, vocab 151k), batch {BATCH} "
            f"({int(batch['attention_mask'].sum())} tokens), forward + backward + AdamW; penalty on layers "
            f"{penalty.layers} with 2 features each; best of {REPEATS}, interleaved.", "",
            "| step | seconds | vs plain SFT |", "|---|---|---|"]
    rows += [f"| {name} | {t:.4f} | {t / base_t:.3f}x |" for name, t in timings.items()]
    text = "\n".join(rows) + "\n"
    publish(text, "benchmarks_sasft.md")


if __name__ == "__main__":
    main()
