"""Steering overhead in cached greedy generation: steered vs unsteered, and vs a bare residual-addition hook.

    python benchmarks/bench_steering.py          # prints a table, writes docs/benchmarks_steering.md

A random-weight Qwen3 model (8 layers, hidden 512) generates 64 tokens greedily with the KV cache, batch 1, on
CPU. The steered runs add α·d at two layers on every position. Best of several runs; read the ratios.
"""

from __future__ import annotations

import os
import platform

import torch
from _timing import best_of_interleaved, publish
from transformers import Qwen3Config, Qwen3ForCausalLM

from qscope_plugin.hooks import add_to_residual
from qscope_plugin.recipes.steering import SteeringSpec, Term, steer
from qscope_plugin.sae import QScopeSAEConfig, QwenScopeSAE

N_NEW, REPEATS = 64, 5


def main() -> None:
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    model = Qwen3ForCausalLM(cfg).eval()
    d_sae = 8192
    tensors = {"W_enc": torch.randn(d_sae, 512), "W_dec": torch.randn(512, d_sae) / 22.6,
               "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(512)}
    saes = {n: QwenScopeSAE(tensors, QScopeSAEConfig(512, d_sae, 32, n)) for n in (3, 6)}
    spec = SteeringSpec((Term(3, 17, 4.0), Term(6, 99, -4.0)))
    ids = torch.randint(0, 32000, (1, 16))

    def run() -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                           do_sample=False, pad_token_id=0)

    def steered() -> None:
        with steer(model, spec, saes):
            run()

    def generated_only() -> None:
        with steer(model, SteeringSpec(spec.terms, positions="generated"), saes):
            run()

    def bare() -> None:
        with add_to_residual(model, 3, 4.0 * saes[3].direction(17)), \
                add_to_residual(model, 6, -4.0 * saes[6].direction(99)):
            run()

    torch.set_num_threads(os.cpu_count() or 1)
    timings = best_of_interleaved(repeats=REPEATS, runs={"unsteered": run, "steer(), positions=all": steered,
                                   "steer(), positions=generated": generated_only, "bare add_to_residual hooks": bare})
    base, rows = timings["unsteered"], list(timings.items())
    lines = ["# Steering overhead", "",
             f"`python benchmarks/bench_steering.py` on {platform.machine()}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}: random Qwen3 (8 layers, hidden 512, vocab 32k), {N_NEW} new tokens, greedy, KV "
             f"cache, batch 1; two steered layers; best of {REPEATS}.", "",
             "| run | seconds | tokens/s | vs unsteered |", "|---|---|---|---|"]
    lines += [f"| {name} | {t:.3f} | {N_NEW / t:.1f} | {t / base:.3f}x |" for name, t in rows]
    text = "\n".join(lines) + "\n"
    publish(text, "benchmarks_steering.md")


if __name__ == "__main__":
    main()
