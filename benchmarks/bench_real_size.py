"""Real-size backbones with every SAE layer: boot, generation, all-layer footprints and memory, end to end.

    python benchmarks/bench_real_size.py                          # Qwen3-1.7B-Base, bf16 (minutes on 2 cores)
    python benchmarks/bench_real_size.py --backbones 1.7b 2b      # + Qwen3.5-2B-Base (hybrid, multimodal layout)
    python benchmarks/bench_real_size.py --backbones 8b           # Qwen3-8B-Base: needs ~20 GiB of free memory

Random weights of the exact published configurations (``tests/real_size.py``) are saved once as a checkpoint, and
every layer of the paired SAE release is written as a real-size file into a Hugging Face cache layout; both live
under ``--root`` (outside the repository), are reused across runs, and are deleted at the end unless ``--keep``.
All layers of a release share one blob (the cache is content-addressed), so the page cache holds one layer's
bytes while every layer is mapped and read separately. Every measurement runs in a fresh process; peak memory is
read from the kernel (``VmHWM``, all resident pages) and sampled every 5 ms for private memory (``RssAnon``, what
cannot be reclaimed: memory-mapped SAE pages are file pages and count in the first but not the second).
Writes ``docs/benchmarks_real_size.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]  # _timing, _memory; real_size (configurations shared with CI)

from _memory import PeakMemory  # noqa: E402  (found through the line above)

BACKBONES = {
    "1.7b": ("Qwen/Qwen3-1.7B-Base", "qwen-scope-3-1.7b-base-w32k-l50"),
    "2b": ("Qwen/Qwen3.5-2B-Base", "qwen-scope-3.5-2b-base-w32k-l50"),
    "8b": ("Qwen/Qwen3-8B-Base", "qwen-scope-3-8b-base-w64k-l50"),
}
N_TEXTS, TEXT_TOKENS, BATCH, PROMPT_TOKENS, NEW_TOKENS, STEER_LAYER = 8, 16, 4, 8, 8, 10
"""Small on purpose: a 1.7B forward of 128 tokens takes about a minute on 2 shared AVX2 cores."""


# ------------------------------------------------------------------------------------------- worker side


def _tokenizer():
    from qscope_testing import qwen3_tokenizer

    return qwen3_tokenizer()


def _texts(tok, n: int, n_tokens: int) -> list[str]:
    """``n`` different texts of exactly ``n_tokens`` tokens (random ids of ordinary words, decoded)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (n, n_tokens), generator=g)
    texts = tok.batch_decode(ids)
    return [tok.decode(tok(t, add_special_tokens=False)["input_ids"][:n_tokens]) for t in texts]


def _load_hf(model_dir: str, dtype, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def _sae(args, layer: int):
    """A layer's SAE where the model runs: memory-mapped on CPU, one copy in the model's dtype on CUDA."""
    from qscope_plugin import load_sae

    sae = load_sae(args.release, layer)
    return sae if args.device == "cpu" else sae.to(args.device, getattr(__import__("torch"), args.dtype))


def worker_boot(args) -> dict:
    """Boot time (imports excluded: each framework's import is paid once per process) and peak memory of the
    boot plus one forward through the framework's own entry point (a loaded checkpoint is memory-mapped: its
    pages become resident as the first forward reads them)."""
    import torch

    from qscope_plugin.adapters import nnsight as nnsight_adapter
    from qscope_plugin.adapters import transformer_lens as tl_adapter

    dtype = getattr(torch, args.dtype)
    tok = _tokenizer()
    ids = torch.arange(1000, 1008, device=args.device).unsqueeze(0)
    with PeakMemory() as mem, torch.no_grad():
        t = time.perf_counter()
        if args.what == "boot_hf":
            model = _load_hf(args.model_dir, dtype, args.device)
        elif args.what == "boot_bridge":
            model = tl_adapter.boot(args.model_dir, dtype=dtype, tokenizer=tok, device=args.device)
        else:
            model = nnsight_adapter.load(args.model_dir, tokenizer=tok, dispatch=True, dtype=dtype,
                                         device_map=args.device)
        seconds = time.perf_counter() - t
        if args.what == "boot_nnsight":
            with model.trace(ids):
                pass
        else:
            model(ids)
    del model
    return {"seconds": seconds, "peak_rss_mib": mem.peak_rss - mem.base_rss,
            "peak_anon_mib": mem.peak_anon - mem.base_anon}


def worker_generate(args) -> dict:
    import torch
    from _timing import best_of_interleaved

    from qscope_plugin.backends import as_backend
    from qscope_plugin.recipes.steering import SteeringSpec, steer

    model = _load_hf(args.model_dir, getattr(torch, args.dtype), args.device)
    tok = _tokenizer()
    backend = as_backend(model)
    ids = tok(_texts(tok, 1, PROMPT_TOKENS)[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    saes = {STEER_LAYER: _sae(args, STEER_LAYER)}
    spec = SteeringSpec.single(STEER_LAYER, 123, 8.0)
    eos = model.config.vocab_size + 1  # never produced: every run makes exactly NEW_TOKENS tokens

    def unsteered():
        return backend.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)

    def steered():
        with steer(model, spec, saes):
            return backend.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)

    times = best_of_interleaved({"unsteered": unsteered, "steered": steered}, repeats=args.repeats)
    return {name: NEW_TOKENS / s for name, s in times.items()}


def worker_footprints(args) -> dict:
    """All layers: footprints vs the forward alone vs a hand-written forward + encode loop; memory; SAE share."""
    import torch
    import torch.nn.functional as F
    from _timing import best_of_interleaved

    from qscope_plugin.backends import as_backend
    from qscope_plugin.hooks import resolve_layers
    from qscope_plugin.recipes._harvest import pad, tokenize
    from qscope_plugin.recipes.footprints import harvest_footprints

    model = _load_hf(args.model_dir, getattr(torch, args.dtype), args.device)
    tok = _tokenizer()
    texts = _texts(tok, N_TEXTS, TEXT_TOKENS)
    backend = as_backend(model)
    n_layers = backend.n_layers
    batches = [tuple(t.to(args.device) for t in pad(tokenize(tok, texts[s : s + BATCH], max_length=None), 0))
               for s in range(0, N_TEXTS, BATCH)]
    cuda = args.device == "cuda"
    with torch.no_grad():  # the model's memory-mapped weights become resident: the baseline is the model in use
        model.model(input_ids=batches[0][0], attention_mask=batches[0][1], use_cache=False)
    gpu_model_mib = torch.cuda.memory_allocated() / 2**20 if cuda else 0.0
    with PeakMemory() as mem:
        saes = {n: _sae(args, n) for n in range(n_layers)}
        harvest_footprints(model, tok, texts, saes, batch_size=BATCH, progress=False)
    gpu_peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    layers = resolve_layers(model)

    def forward_hidden():  # the decoder forward up to the last block: what footprints need at least
        for ids, mask, pos in batches:
            backend.capture(ids, mask, layers=[n_layers - 1], position_ids=pos, reduce=lambda h, n: None)

    def forward_logits():  # the model's forward with vocabulary-sized logits
        with torch.no_grad():
            for ids, mask, _ in batches:
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    def hand_loop():  # forward + every layer's hook keeping last rows + one encode per layer
        rows = {}

        def hook(n):
            return lambda module, inputs, output: rows.__setitem__(n, output[:, -1])

        handles = [layer.register_forward_hook(hook(n)) for n, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                for ids, mask, _ in batches:
                    model.model(input_ids=ids, attention_mask=mask, use_cache=False)
                    for n, h in rows.items():
                        sae = saes[n]
                        F.linear(h.float(), sae.W_enc, sae.b_enc).topk(sae.cfg.k, dim=-1)
        finally:
            for h in handles:
                h.remove()

    def footprints():
        harvest_footprints(model, tok, texts, saes, batch_size=BATCH, progress=False)

    times = best_of_interleaved({"footprints": footprints, "hand": hand_loop, "hidden": forward_hidden,
                                 "logits": forward_logits}, repeats=args.repeats)
    # SAE cost per layer: one layer's encode of a batch vs the forward's share per layer
    sae = saes[n_layers // 2]
    h_all = torch.randn(BATCH * TEXT_TOKENS, sae.cfg.d_model, dtype=getattr(torch, args.dtype), device=args.device)
    h_last = h_all[:BATCH]
    enc = best_of_interleaved({"last": lambda: sae.encode_sparse(h_last), "all": lambda: sae.encode_sparse(h_all)},
                              repeats=args.repeats)
    per_layer = times["hidden"] / len(batches) / n_layers
    return {"texts_per_s": {k: N_TEXTS / v for k, v in times.items()},
            "model_rss_mib": mem.base_rss, "model_anon_mib": mem.base_anon,
            "peak_rss_mib": mem.peak_rss, "peak_anon_mib": mem.peak_anon,
            "gpu_model_mib": gpu_model_mib, "gpu_peak_mib": gpu_peak_mib,
            "encode_share_last": enc["last"] / per_layer, "encode_share_all": enc["all"] / per_layer,
            "forward_per_layer_ms": 1000 * per_layer}


def worker_saelens(args) -> dict:
    """SAELens' own loader on one layer: its peak, which an all-layer harvest pays once per layer."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    get_pretrained_saes_directory()
    with PeakMemory() as mem:
        sae = SAE.from_pretrained(args.release, "layer0")
    del sae
    return {"peak_rss_mib": mem.peak_rss - mem.base_rss, "peak_anon_mib": mem.peak_anon - mem.base_anon}


MEASUREMENTS = ("boot_hf", "boot_bridge", "boot_nnsight", "generate", "footprints", "saelens")
WORKERS = {"boot_hf": worker_boot, "boot_bridge": worker_boot, "boot_nnsight": worker_boot,
           "generate": worker_generate, "footprints": worker_footprints, "saelens": worker_saelens}


# ------------------------------------------------------------------------------------------- driver side


def prepare(root: Path, model_id: str, release_name: str, dtype: str) -> Path:
    """The random-weight checkpoint (published layout, ``dtype``) and every SAE layer, written once."""
    import torch
    from real_size import backbone_config, write_release_saes
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    write_release_saes(root / "hub", release_name)
    model_dir = root / "models" / f"{model_id.split('/')[1]}-{dtype}"
    if not (model_dir / "config.json").exists():
        cfg = backbone_config(model_id)
        cls = AutoModelForImageTextToText if hasattr(cfg, "text_config") else AutoModelForCausalLM
        t = time.perf_counter()
        model = cls.from_config(cfg, dtype=getattr(torch, dtype))
        model.save_pretrained(model_dir)
        print(f"  wrote {model_dir} in {time.perf_counter() - t:.0f} s", flush=True)
        del model
    return model_dir


def run_worker(what: str, model_dir: Path, release_name: str, args, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", what, "--model-dir", str(model_dir), "--release", release_name,
           "--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats)]
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {what}: {time.perf_counter() - t:.0f} s  {result}", flush=True)
    return result


def measure(key: str, args) -> dict:
    """The measurements of one backbone, saved under ``--root``; with ``--reuse`` a saved run is read back."""
    model_id, release_name = BACKBONES[key]
    root = Path(args.root)
    saved = root / f"results-{key}-{args.dtype}-{args.device}.json"
    out = json.loads(saved.read_text()) if args.reuse and saved.exists() else {}
    todo = [w for w in MEASUREMENTS if w not in out or w in (args.only or ())]
    if not todo:
        return out
    print(f"{model_id} ({release_name})", flush=True)
    model_dir = prepare(root, model_id, release_name, args.dtype)
    env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1"}
    out.update(model_id=model_id, release=release_name)
    for what in todo:
        if not what.startswith("boot"):
            out[what] = run_worker(what, model_dir, release_name, args, env)
            continue
        runs = [run_worker(what, model_dir, release_name, args, env) for _ in range(args.repeats)]
        out[what] = {"seconds": min(r["seconds"] for r in runs),  # best of the repeats for time, worst for memory
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                     "peak_anon_mib": max(r["peak_anon_mib"] for r in runs)}
    saved.write_text(json.dumps(out, indent=1))
    return out


def _gib(mib: float) -> str:
    return f"{mib / 1024:.2f}"


def report(results: list[dict], header: str) -> str:
    from qscope_plugin.catalogue import release

    lines = ["# Benchmarks: real size", "", header, "",
             f"Random weights of the exact published configurations, every SAE layer at full width "
             f"({N_TEXTS} texts of {TEXT_TOKENS} tokens, batch {BATCH}; generation: 1 prompt of {PROMPT_TOKENS} "
             f"tokens, {NEW_TOKENS} new tokens, greedy, steered at layer {STEER_LAYER}). Each row is measured in "
             "fresh processes; times are the best of the repeats, memory the worst. \"private\" is peak `RssAnon` "
             "(sampled every 5 ms), \"resident\" is `VmHWM`, which also counts the memory-mapped SAE pages "
             "(file pages: shared and reclaimable).", "",
             "## Boot", "",
             "| backbone | loader | time (s) | vs from_pretrained | peak resident (GiB) | vs from_pretrained "
             "| peak private (GiB) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        base = r["boot_hf"]
        for what, name in (("boot_hf", "transformers `from_pretrained`"), ("boot_bridge", "TransformerLens bridge"),
                           ("boot_nnsight", "nnsight (`dispatch=True`)")):
            m = r[what]
            lines.append(f"| {r['model_id']} | {name} | {m['seconds']:.2f} | {m['seconds'] / base['seconds']:.2f}x "
                         f"| {_gib(m['peak_rss_mib'])} | {m['peak_rss_mib'] / base['peak_rss_mib']:.2f}x "
                         f"| {_gib(m['peak_anon_mib'])} |")
    lines += ["", "## Generation", "", "| backbone | unsteered (tok/s) | steered (tok/s) | steered time / unsteered |",
              "|---|---|---|---|"]
    for r in results:
        g = r["generate"]
        lines.append(f"| {r['model_id']} | {g['unsteered']:.2f} | {g['steered']:.2f} "
                     f"| {g['unsteered'] / g['steered']:.3f}x |")
    lines += ["", "## Footprints over all layers", "",
              "| backbone | layers | footprints (texts/s) | hand forward + encode loop | vs hand loop "
              "| forward to last block | forward with logits |", "|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["footprints"]["texts_per_s"]
        n = release(r["release"]).n_layers
        lines.append(f"| {r['model_id']} | {n} | {t['footprints']:.2f} | {t['hand']:.2f} "
                     f"| {t['footprints'] / t['hand']:.2f}x | {t['hidden']:.2f} | {t['logits']:.2f} |")
    lines += ["", "## Memory with every SAE layer in use", "",
              "| backbone | model in use, resident (GiB) | peak resident, all layers (GiB) | over the model, resident "
              "| over the model, private | SAELens loader, one layer (GiB) | SAELens x layers (GiB) |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        f, s = r["footprints"], r["saelens"]
        n = release(r["release"]).n_layers
        lines.append(f"| {r['model_id']} | {_gib(f['model_rss_mib'])} | {_gib(f['peak_rss_mib'])} "
                     f"| {_gib(f['peak_rss_mib'] - f['model_rss_mib'])} "
                     f"| {_gib(f['peak_anon_mib'] - f['model_anon_mib'])} "
                     f"| {_gib(s['peak_rss_mib'])} | {_gib(n * s['peak_rss_mib'])} |")
    lines += ["", "Resident memory counts every memory-mapped SAE page a harvest reads: an all-layer footprint harvest "
              "reads each layer's encoder (d_sae x d_model floats) once per batch, so those pages are resident while "
              "it runs. They are file pages (page cache: shared between processes, dropped under memory pressure and "
              "read again), not private memory; private memory is what SAELens' loader pays per layer (two copies "
              "of the file while it transposes, one kept)."]
    for r in results:
        f = r["footprints"]
        if f.get("gpu_peak_mib"):
            lines.append(f"\nOn the GPU ({r['model_id']}): model {_gib(f['gpu_model_mib'])} GiB, peak with every "
                         f"layer's SAE copied in {_gib(f['gpu_peak_mib'])} GiB.")
    lines += ["", "## SAE cost per layer", "",
              "| backbone | forward per layer (ms) | encode last tokens / forward per layer "
              "| encode all tokens / forward per layer |", "|---|---|---|---|"]
    for r in results:
        f = r["footprints"]
        lines.append(f"| {r['model_id']} | {f['forward_per_layer_ms']:.1f} | {f['encode_share_last']:.2f} "
                     f"| {f['encode_share_all']:.2f} |")
    lines += ["", "## Goals (issue 18)", "", "| backbone | goal | measured | met |", "|---|---|---|---|"]
    for r in results:
        f, g = r["footprints"], r["generate"]
        over = (f["peak_anon_mib"] - f["model_anon_mib"]) / 1024
        checks = [
            ("all-layer footprints >= 0.8x the hand forward + encode loop",
             f["texts_per_s"]["footprints"] / f["texts_per_s"]["hand"], 0.8, ">="),
            ("private memory over the model <= 2 GiB with every SAE layer (memory-mapped)", over, 2.0, "<="),
            ("resident memory over the model <= 2 GiB with every SAE layer (memory-mapped)",
             (f["peak_rss_mib"] - f["model_rss_mib"]) / 1024, 2.0, "<="),
            ("steered generation time <= 1.05x unsteered", g["unsteered"] / g["steered"], 1.05, "<="),
            *[(f"{name} boot time <= 1.3x from_pretrained", r[key]["seconds"] / r["boot_hf"]["seconds"], 1.3, "<=")
              for key, name in (("boot_bridge", "bridge"), ("boot_nnsight", "nnsight"))],
            *[(f"{name} peak resident <= 1.1x from_pretrained",
               r[key]["peak_rss_mib"] / r["boot_hf"]["peak_rss_mib"], 1.1, "<=")
              for key, name in (("boot_bridge", "bridge"), ("boot_nnsight", "nnsight"))],
        ]
        for goal, value, bound, op in checks:
            met = value >= bound if op == ">=" else value <= bound
            lines.append(f"| {r['model_id']} | {goal} | {value:.2f} | {'yes' if met else '**no**'} |")
    lines += ["", FINDINGS]
    return "\n".join(lines) + "\n"


FINDINGS = """## What the real size surfaced, and the fixes

- **Vocabulary-sized logits.** At 151,936 (Qwen3) or 248,320 (Qwen3.5) entries per position, the logits are the
  largest tensor of a forward. Footprints and every harvest already stop after the deepest block asked for (the
  LM head never runs: compare "forward to last block" with "forward with logits" above). The steering scores and
  GRPO's old log-probs computed logits for every position of prompt + completion: `Backend.logits(..., last=n)`
  now runs the LM head on the n positions they read (`logits_to_keep`; the bridge slices after its own forward).
- **The LRU against all-layer harvests.** The store keeps 8 layers (as the official app does); an all-layer
  harvest holds 28. Asking again for an evicted layer re-read the file and returned a new object (losing its
  cached decoder norms). The cache now finds SAEs still in use through weak references: no re-read, no thrash,
  and nothing held that the caller dropped.
- **TopK at real width.** Pre-activations are `(tokens, d_sae)` floats: 4 GiB for 8,192 tokens at W128K.
  `encode_sparse` now encodes in chunks of tokens under `ENCODE_BUDGET_BYTES` (256 MiB).
- **bf16 models with float32 SAEs.** The SAE casts the activations (tokens x d_model) to its dtype inside each
  encode; its weights are never copied per call (memory-mapped once). On CUDA, move the SAEs once with
  `sae.to("cuda", torch.bfloat16)` (what `benchmarks/gpu_check.sh` does).
- **bf16 CPU layout.** `.to()` copies in bf16/fp16 on CPU choose their layout by
  `torch.backends.cpu.get_cpu_capability()` (see [benchmarks.md](benchmarks.md)).
- **Meta-device boot.** The TransformerLens boot of a published (multimodal) Qwen3.5 model built on the meta
  device failed: its text-tower check took "still on meta" for "not taken from the model". It now compares by
  identity; `tests/test_real_size.py` boots every backbone of the 14 groups on meta in transformers, the bridge
  and nnsight (nnsight's own lazy load from the config).
- **Bridge boot time.** Two costs unrelated to the weights made most of the bridge's overhead over
  `from_pretrained`: `boot` imported SAELens (seconds, ~1 GiB) to apply its fixes even for a plain bridge, and
  deep-copied the caller's tokenizer so the bridge could set its special tokens (~7 s in a fresh process for
  Qwen's 151,643-entry vocabulary and merges). A plain bridge now applies the TransformerLens fixes only, and the
  tokenizer's settings are copied while its read-only tables are shared. What remains is TransformerLens'
  own bridge construction (per-block component setup and a hook scan of every module: seconds at 28 layers,
  the same on the meta device).

Not measured here: Qwen3-8B-Base (`--backbones 8b`; bf16 needs ~20 GiB free, more than this shared machine
had) and CUDA (`bash benchmarks/gpu_check.sh`, which also compares SAE encode throughput with the bandwidth
limit of reading W_enc once per batch; `DRY=1` checks the script on CPU). The CPU here is shared with other
jobs, so absolute times are slow and noisy; the ratios compare runs interleaved in the same process.

The steered/unsteered generation ratio is not conclusive on this machine: across four runs it ranged from 0.40x
to 1.4x, moving with the values the random weights produce (subnormal floats slowed whichever run met them until
the workers flushed them) and with the other jobs on the CPU. The edit itself is one (batch, d_model) addition
at one block per decode step, next to a forward of every block; the CUDA run of `gpu_check.sh` is the place to
settle the 1.05x goal.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", choices=sorted(BACKBONES), default=["1.7b"])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--root", default="/tmp/qscope-real-size", help="where checkpoints and SAE files go")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep --root for the next run")
    parser.add_argument("--reuse", action="store_true", help="report a backbone's saved results instead of measuring")
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, help="with --reuse: measure these again")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks_real_size.md"))
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--what", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--release", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import warnings

        import torch

        warnings.filterwarnings("ignore")
        # Random weights drive some activations into subnormal floats, whose CPU arithmetic is many times slower;
        # a steering vector pushed them out and made steered generation "faster". Flushed, both run like a real
        # checkpoint's (set FLUSH_DENORMAL=0 to see the effect).
        torch.set_flush_denormal(os.environ.get("FLUSH_DENORMAL", "1") == "1")
        args.what = args.worker
        print(json.dumps(WORKERS[args.worker](args)))
        return

    import torch
    import transformers

    header = (f"Generated by `python benchmarks/bench_real_size.py --backbones {' '.join(args.backbones)} --dtype "
              f"{args.dtype} --repeats {args.repeats}` on "
              f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPU cores, "
              f"{args.dtype} model; torch {torch.__version__}, transformers {transformers.__version__}.")
    print(header, flush=True)
    try:
        results = [measure(key, args) for key in args.backbones]
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    text = report(results, header)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
