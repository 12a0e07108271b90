"""Throughput of the shared harvest against the three model-running loops it replaced, side by side in one run.

    python benchmarks/bench_harvest.py          # prints a table, writes docs/benchmarks_harvest.md

Before the backend layer, recipes ran the model through three loops with different rules. They are kept here,
verbatim in what they compute, as the baselines:
- ``encode_texts`` (discovery, classifiers, safety firing; the demo): tokenizer padding, every block and the LM
  head run, codes cut out of the padded batch per row; ``max`` pooling scattered each text's codes one row at a time;
- ``footprints._harvest_chunk``: batches sorted by length, hand padding with ``position_ids``, the forward cut after
  the deepest wanted block, the last token encoded.
Each pooling of ``harvest`` is timed against the best of the old loops that produce the same result, on the same
texts (the demo's Chinese and English lines, cycled to N_TEXTS, and longer mixed ones) and the same batch size.
The demo model (Qwen3 layout, 4 layers, hidden 128) and its four SAEs on CPU; best of several interleaved runs.
``BENCH_THREADS`` sets torch's thread count (default 1: threads competing for busy cores distort CPU timings).
"""

from __future__ import annotations

import contextlib
import os
import platform

import numpy as np
import torch
from _timing import best_of_interleaved, publish

from qscope_plugin.demo.run import PROMPTS, SENTENCES
from qscope_plugin.hooks import capture_residual, edit_residual
from qscope_plugin.models import DEMO_MODEL_DIR, load_model
from qscope_plugin.recipes import harvest
from qscope_plugin.store import DEMO_SAE_DIR, load_sae, local_layers

N_TEXTS, BATCH, REPEATS, MAX_LENGTH = 512, 16, 5, 512


@torch.no_grad()
def old_encode_texts(model, tok, texts, saes) -> list:
    """The former ``recipes/_common.encode_texts``: tokenizer padding, full forward, per-row cut."""
    out = []
    for start in range(0, len(texts), BATCH):
        enc = tok(texts[start : start + BATCH], return_tensors="pt", padding=True, truncation=True,
                  max_length=MAX_LENGTH, add_special_tokens=False)
        with capture_residual(model, list(saes)) as acts:
            model(**enc)
        mask = enc["attention_mask"].bool()
        codes = {layer: saes[layer].encode_sparse(acts[layer]) for layer in saes}
        for row in range(mask.shape[0]):
            keep = mask[row]
            out.append((enc["input_ids"][row][keep], {n: (v[row][keep], i[row][keep]) for n, (v, i) in codes.items()}))
    return out


def old_max_activations(model, tok, texts, saes) -> dict:
    """The former ``classifiers.max_activations``: ``encode_texts`` then one scatter per text and layer."""
    rows: dict[int, list] = {n: [] for n in saes}
    for _, codes in old_encode_texts(model, tok, texts, saes):
        for n, sae in saes.items():
            values, indices = codes[n]
            best = torch.zeros(sae.cfg.d_sae).scatter_reduce_(0, indices.flatten(), values.flatten().float(), "amax")
            rows[n].append(best.nonzero().flatten())
    return rows


class _Stop(Exception):
    pass


@torch.no_grad()
def old_footprints(model, tok, texts, saes) -> dict:
    """The former ``footprints._harvest_chunk`` + ``footprint_batch``: sorted batches, early exit, last token."""
    encoded = [ids[-MAX_LENGTH:] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    out: dict[int, list] = {n: [None] * len(texts) for n in saes}
    deepest = max(saes)
    for start in range(0, len(order), BATCH):
        rows = order[start : start + BATCH]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(encoded[i])], mask[r, : len(encoded[i])] = torch.tensor(encoded[i]), 1
        last = mask.sum(-1) - 1
        picked = {}

        def take(hidden, n, last=last, picked=picked):
            picked[n] = hidden[torch.arange(hidden.shape[0]), last]
            if n == deepest:
                raise _Stop

        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with edit_residual(model, dict.fromkeys(saes, take)), contextlib.suppress(_Stop):
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        for n, sae in saes.items():
            values, indices = sae.encode_sparse(picked[n])
            active = torch.where(values > 0, indices, -1).sort(dim=-1).values.numpy()
            for i, row in zip(rows, active, strict=True):
                out[n][i] = row[row >= 0].astype(np.int32)
    return out


def main() -> None:
    model, tok = load_model(str(DEMO_MODEL_DIR))
    saes = {n: load_sae(DEMO_SAE_DIR, n) for n in local_layers(DEMO_SAE_DIR)}
    base = PROMPTS["zh"] + PROMPTS["en"] + SENTENCES["zh"] + SENTENCES["en"] + SENTENCES["mixed_prompts"]
    texts = [base[i % len(base)] for i in range(N_TEXTS)]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

    new = {pooling: (lambda p=pooling: harvest(model, tok, texts, saes, pooling=p, batch_size=BATCH,
                                               max_length=MAX_LENGTH, truncation_side="left" if p == "last"
                                               else "right")) for pooling in ("tokens", "max", "last")}
    timings = best_of_interleaved(repeats=REPEATS, runs={
        "old encode_texts": lambda: old_encode_texts(model, tok, texts, saes),
        "old max_activations": lambda: old_max_activations(model, tok, texts, saes),
        "old footprints loop": lambda: old_footprints(model, tok, texts, saes),
        **{f"harvest(pooling={p!r})": fn for p, fn in new.items()},
    })
    baselines = {"tokens": ["old encode_texts"], "max": ["old max_activations"], "last": ["old footprints loop"]}
    n_tokens = int(sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]))
    lines = ["# Shared harvest vs the loops it replaced", "",
             f"`python benchmarks/bench_harvest.py` on {platform.machine()}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}, {torch.get_num_threads()} torch threads: the demo model (Qwen3 layout, 4 layers, "
             f"hidden 128) and its 4 SAEs, all 4 layers; {N_TEXTS} texts ({n_tokens} tokens), batch {BATCH}; best of "
             f"{REPEATS}, interleaved. Throughput ratio = old seconds / new seconds (>= 1: the shared harvest is at "
             "least as fast); the requirement is >= 0.95.", "",
             "| pooling | harvest (s) | tokens/s | best old loop | old (s) | throughput ratio |",
             "|---|---|---|---|---|---|"]
    for pooling in ("tokens", "max", "last"):
        t = timings[f"harvest(pooling={pooling!r})"]
        old_name = min(baselines[pooling], key=timings.__getitem__)
        lines.append(f"| {pooling} | {t:.3f} | {n_tokens / t:.0f} | {old_name} | {timings[old_name]:.3f} | "
                     f"{timings[old_name] / t:.2f}x |")
    text = "\n".join(lines) + "\n"
    publish(text, "benchmarks_harvest.md")


if __name__ == "__main__":
    main()
