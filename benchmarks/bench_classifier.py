"""OR-rule classifier discovery throughput: ``fit`` / ``harvest(pooling="max")`` vs a bare forward + SAE encode.

    python benchmarks/bench_classifier.py        # prints a table, writes docs/benchmarks_classifier.md

The demo model shipped in the package (``qscope_plugin/demo/assets/model``, Qwen3 layout, 4 layers, hidden 128) and
its four SAEs (d_sae 1536, k 32) on CPU; the texts are the demo's Chinese and English lines, cycled to N_TEXTS. Every
run sees the same batches (same texts, batch size and padding). The baseline is the least any harvest must do: tokenize,
one forward pass with the four residual hooks, ``encode_sparse`` at every layer. Best of several interleaved runs;
read the ratios, the absolute numbers depend on the machine. The last row shows what the (tied, 4096-token) ``lm_head``
costs: the SAEs read block outputs, so a harvest does not need the logits. ``BENCH_THREADS`` sets torch's
thread count (default 1: on a shared machine, threads competing for busy cores made the same forward ~40x slower).
"""

from __future__ import annotations

import os
import platform

import numpy as np
import torch
from _timing import best_of_interleaved, publish

from qscope_plugin.demo.run import PROMPTS
from qscope_plugin.hooks import capture_residual
from qscope_plugin.models import DEMO_MODEL_DIR, load_model
from qscope_plugin.recipes import harvest
from qscope_plugin.recipes.classifiers import ORRuleClassifier
from qscope_plugin.store import DEMO_SAE_DIR, load_sae, local_layers

N_TEXTS, BATCH, REPEATS, MAX_LENGTH = 512, 16, 5, 512


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model(str(DEMO_MODEL_DIR))
    saes = {n: load_sae(DEMO_SAE_DIR, n) for n in local_layers(DEMO_SAE_DIR)}
    base = PROMPTS["zh"] + PROMPTS["en"]
    texts = [base[i % len(base)] for i in range(N_TEXTS)]
    labels = np.array([i % len(base) < len(PROMPTS["zh"]) for i in range(N_TEXTS)])

    @torch.no_grad()
    def forward_only(encode: bool = False, lm_head: bool = True) -> None:
        for start in range(0, len(texts), BATCH):
            enc = tok(texts[start : start + BATCH], return_tensors="pt", padding=True, truncation=True,
                      max_length=MAX_LENGTH, add_special_tokens=False)
            with capture_residual(model, list(saes)) as acts:
                (model if lm_head else model.model)(**enc)
            if encode:
                for layer, sae in saes.items():
                    sae.encode_sparse(acts[layer])

    def discovery_harvest() -> None:
        harvest(model, tok, texts, saes, pooling="max", batch_size=BATCH, max_length=MAX_LENGTH)

    def fit() -> None:
        ORRuleClassifier(model, tok, saes, k_features=5).fit(texts, labels)  # fit's defaults: batch 16, length 512

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    timings = best_of_interleaved(repeats=REPEATS, runs={
        "forward + hooks only": forward_only,
        "forward + encode_sparse (baseline)": lambda: forward_only(encode=True),
        "harvest(pooling='max') (discovery harvest)": discovery_harvest,
        "ORRuleClassifier.fit (harvest + Δ + ℓ*)": fit,
        "decoder stack + encode_sparse, no lm_head": lambda: forward_only(encode=True, lm_head=False),
    })
    ref = timings["forward + encode_sparse (baseline)"]
    n_tokens = int(sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]))
    lines = ["# OR-rule classifier: discovery harvest throughput", "",
             f"`python benchmarks/bench_classifier.py` on {platform.machine()}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}, {torch.get_num_threads()} torch threads: the demo model (Qwen3 layout, 4 layers, "
             f"hidden 128) and its 4 SAEs (d_sae "
             f"{next(iter(saes.values())).cfg.d_sae}, k {next(iter(saes.values())).cfg.k}), all 4 layers harvested; "
             f"{N_TEXTS} texts ({n_tokens} tokens), batch {BATCH}; best of {REPEATS}, interleaved.", "",
             "| run | seconds | texts/s | tokens/s | vs baseline |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {t:.3f} | {N_TEXTS / t:.0f} | {n_tokens / t:.0f} | {t / ref:.2f}x |"
              for name, t in timings.items()]
    text = "\n".join(lines) + "\n"
    publish(text, "benchmarks_classifier.md")


if __name__ == "__main__":
    main()
