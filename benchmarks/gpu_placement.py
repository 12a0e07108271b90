"""Placement on CUDA: SAEs beside their layers, no activation copied to the host, an all-layer harvest at
Qwen3-1.7B size in bf16, evaluate_saes' memory at Qwen's vocabulary, and ``qscope plan``'s predicted peak.

    python benchmarks/gpu_placement.py --out /tmp/qscope-gpu-check      # on a CUDA machine (a few minutes)
    python benchmarks/gpu_placement.py --dry                            # the same code paths on CPU, tiny sizes

Random weights of the published Qwen3-1.7B-Base config (``tests/real_size.py``) built directly on the GPU in bf16;
one real-size float32 SAE (d_sae 32,768) on the host, shared by 28 SAE objects (one per layer, as a release's
mmap'd files would be), so every layer is placed and copied separately. Prints one ``PASS`` / ``FAIL`` line per
check and writes ``gpu_placement.md`` and ``gpu_placement.json`` to ``--out``; exits 1 if any check failed.

Host copies are counted with ``torch.profiler``: the bytes of every device-to-host memcpy in the harvest's trace,
against the bytes the old path copied (every hooked activation, once per layer).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests")]  # real_size: the published configurations

from real_size import backbone_config  # noqa: E402

from qscope_plugin.placement import release, resident  # noqa: E402
from qscope_plugin.plan import SAEDims, make_plan  # noqa: E402
from qscope_plugin.recipes._harvest import harvest  # noqa: E402
from qscope_plugin.recipes.quality import evaluate_saes  # noqa: E402
from qscope_plugin.sae import QScopeSAEConfig, QwenScopeSAE  # noqa: E402

GIB = 1 << 30
results: dict[str, dict] = {}


def check(name: str, ok: bool, detail: str) -> None:
    results[name] = {"pass": bool(ok), "detail": detail}
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def build(dry: bool, device: str, dtype: torch.dtype):
    """``(model, tokenizer, saes, d_sae)``: the backbone on ``device`` and one SAE per layer on the host."""
    from transformers import AutoModelForCausalLM

    from qscope_plugin.models import default_model, load_model

    _, tok = load_model(default_model())  # the demo's tokenizer: real text -> ids within Qwen's vocabulary
    cfg = backbone_config("Qwen/Qwen3-1.7B-Base")
    if dry:
        cfg.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 16, "max_window_layers": 4,
                    "layer_types": ["full_attention"] * 4})
    d_model, d_sae = cfg.hidden_size, (256 if dry else 32768)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    shared = {"W_enc": (torch.rand(d_sae, d_model, generator=g) - 0.5) / d_model**0.5,
              "W_dec": (torch.rand(d_model, d_sae, generator=g) - 0.5) / d_model**0.5,
              "b_enc": (torch.rand(d_sae, generator=g) - 0.5) * 0.1, "b_dec": torch.zeros(d_model)}
    saes = {n: QwenScopeSAE(dict(shared), QScopeSAEConfig(d_model, d_sae, 50, n))
            for n in range(cfg.num_hidden_layers)}
    return model, tok, saes, cfg


def texts_of(tok, n: int, tokens: int) -> list[str]:
    """``n`` texts of about ``tokens`` tokens each, from the demo's sentences."""
    from qscope_plugin.demo import run

    sentences = [s for group in json.loads((Path(run.__file__).parent / "eval_sentences.json")
                                           .read_text(encoding="utf-8")).values() for s in group]
    body = " ".join(sentences)
    ids = tok(body, add_special_tokens=False)["input_ids"]
    return [tok.decode(ids[(i * 37) % max(1, len(ids) - tokens):][:tokens]) for i in range(n)]


def dtoh_bytes(trace: Path) -> tuple[int, int]:
    """``(total bytes, largest copy)`` of the device-to-host memcpys in a chrome trace."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    sizes = [int(e.get("args", {}).get("bytes", 0)) for e in events
             if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "")]
    return sum(sizes), max(sizes, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes: the same code paths, no CUDA")
    parser.add_argument("--out", default="/tmp/qscope-gpu-check")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry to check the script on CPU")
    device, dtype = ("cpu", torch.float32) if args.dry else ("cuda", torch.bfloat16)
    cuda = device == "cuda"
    n_texts, n_tokens, batch = (8, 32, 4) if args.dry else (64, 512, 16)
    model, tok, saes, cfg = build(args.dry, device, dtype)
    texts = texts_of(tok, n_texts, n_tokens)
    layers = sorted(saes)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    # 1. all-layer harvest, max pooling: placement, host copies, memory, throughput
    harvest(model, tok, texts[:batch], saes, pooling="max", batch_size=batch)  # warm-up: places the copies
    copies = {n: resident(saes[n]) for n in layers}
    layer_devices = {n: next(model.model.layers[n].parameters()).device for n in layers}
    if cuda:
        ok = all(len(c) == 1 and c[0].device == layer_devices[n] and c[0].dtype == dtype for n, c in copies.items())
        check("placement", ok, f"{len(layers)} SAE copies, each on its layer's device in {dtype}")
    else:
        ok = all(c == [] for c in copies.values())
        check("placement", ok, "CPU: every layer encodes with the host SAE itself (zero copy, no private copy)")
    sae_bytes = sum(c.W_enc.numel() * c.W_enc.element_size() * 2 for cs in copies.values() for c in cs)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    trace = Path(tempfile.mkdtemp()) / "harvest.json"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        maxes = harvest(model, tok, texts, saes, pooling="max", batch_size=batch)
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    prof.export_chrome_trace(str(trace))
    n_real = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    activation_bytes = n_real * cfg.hidden_size * torch.finfo(dtype).bits // 8 * len(layers)
    total, largest = dtoh_bytes(trace) if cuda else (0, 0)
    pooled = batch * saes[0].cfg.d_sae * 4  # one batch's per-text maxima, float32
    check("no host copies of activations", total < activation_bytes / 4 and largest <= pooled,
          f"device-to-host {total / 2**20:.1f} MiB in all (largest copy {largest / 2**20:.2f} MiB, pooled results "
          f"are {pooled / 2**20:.2f} MiB per batch) vs {activation_bytes / 2**20:.1f} MiB of activations")
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    results["harvest"] = {"layers": len(layers), "texts": n_texts, "tokens": n_real, "seconds": seconds,
                          "tokens_per_s": n_real / seconds, "peak_above_model_and_saes_gib": peak / GIB,
                          "model_gib": model_bytes / GIB, "saes_gib": sae_bytes / GIB}
    check("all-layer harvest", all(m.shape == (n_texts, saes[0].cfg.d_sae) for m in maxes.values()),
          f"{len(layers)} layers, {n_real} tokens in {seconds:.2f} s ({n_real / seconds:,.0f} tokens/s), peak "
          f"{peak / GIB:.2f} GiB above model {model_bytes / GIB:.2f} GiB + SAEs {sae_bytes / GIB:.2f} GiB")

    # 2. qscope plan's prediction for the same run (on CPU only computed: no allocator statistics to compare)
    dims = SAEDims(cfg.hidden_size, saes[0].cfg.d_sae, cfg.num_hidden_layers)
    plan = make_plan(cfg.to_dict(), dims, layers=layers, devices=[device], memory=[1 << 50],
                     dtype=str(dtype).removeprefix("torch."), seq=n_tokens, batch_size=batch)
    predicted = plan.devices[0].peak_bytes
    if cuda:
        measured = model_bytes + sae_bytes + peak
        ratio = predicted / measured
        results["plan"] = {"predicted_gib": predicted / GIB, "measured_gib": measured / GIB, "ratio": ratio}
        check("plan within 15%", abs(ratio - 1) <= 0.15,
              f"predicted {predicted / GIB:.2f} GiB, measured {measured / GIB:.2f} GiB ({ratio:.3f}x)")
    release(saes.values())

    # 3. evaluate_saes at Qwen's 151,936-token vocabulary, 4,096 predicted positions per batch
    eval_texts, eval_tokens = (texts_of(tok, 2, 16), 16) if args.dry else (texts_of(tok, 8, 513), 513)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    report = evaluate_saes(model, tok, eval_texts, {14 % len(layers): saes[14 % len(layers)]},
                           batch_size=len(eval_texts), max_length=eval_tokens, progress=False)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    q = next(iter(report.layers.values()))
    results["evaluate"] = {"predicted_positions": q.n_predicted, "vocab": cfg.vocab_size, "seconds": seconds,
                           "peak_above_model_gib": peak / GIB, "ce_clean": q.ce_clean, "kl_spliced": q.kl_spliced}
    check("evaluate_saes memory", peak <= GIB, f"{q.n_predicted} predicted positions at vocab {cfg.vocab_size}: "
          f"peak {peak / GIB:.3f} GiB above the model (bound 1 GiB), {seconds:.2f} s")

    failed = [name for name, r in results.items() if "pass" in r and not r["pass"]]
    lines = [f"# Placement on {torch.cuda.get_device_name() if cuda else 'CPU (dry run)'} ({dtype})", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {name} | {'PASS' if r['pass'] else 'FAIL'} | {r['detail']} |" for name, r in results.items()
              if "pass" in r]
    (out / "gpu_placement.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "gpu_placement.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"{'FAIL' if failed else 'PASS'} gpu_placement: {len(failed)} failed; wrote {out}/gpu_placement.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
