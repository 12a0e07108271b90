"""Load time, peak memory and encode/decode throughput: the plugin vs SAELens' built-in Qwen-Scope loader.

    python benchmarks/bench_sae.py            # prints a table, writes docs/benchmarks.md

One synthetic 2048 x 32768 float32 layer file (the geometry of 6 of the 14 groups, 512 MiB) is written into a
local Hugging Face cache under a real release name, so both loaders run their real hf_hub_download path. Every
load is measured in a fresh process (page cache warm) so peak RSS is the loader's own. Machines are noisy: read
the ratios, which compare numbers taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # qscope_testing: the hub cache layout the tests use

RELEASE, REPO, LAYER = "qwen-scope-3-1.7b-base-w32k-l50", "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", 0
D_MODEL, D_SAE, K = 2048, 32768, 50

# Each snippet runs in a fresh interpreter and prints JSON {load_s, peak_delta_mib, after_delta_mib}. Before the
# timed load it warms the hub client (one hf_hub_download of a small cached file: a once-per-process cost both
# loaders share); the peak is the load's own (_memory.PeakMemory resets the kernel's peak-RSS mark), read without
# a sampling thread, which would share the interpreter with the timed load.
_MEASURE = """
import json, sys, time
sys.path.insert(0, {benchmarks!r})
from _memory import PeakMemory, status_mib
{imports}
from huggingface_hub import hf_hub_download
hf_hub_download({repo!r}, 'README.md')
with PeakMemory(sample_s=None) as mem:
    t = time.perf_counter()
    {load}
    load_s = time.perf_counter() - t
print(json.dumps(dict(load_s=load_s, peak_delta_mib=mem.peak_rss - mem.base_rss,
                      after_delta_mib=status_mib('VmRSS:') - mem.base_rss)))
"""

LOADERS = {
    "SAELens built-in (`SAE.from_pretrained`)": (
        "import torch\nfrom sae_lens import SAE\nfrom sae_lens.loading.pretrained_saes_directory import "
        "get_pretrained_saes_directory as d; d()",
        f"sae = SAE.from_pretrained({RELEASE!r}, 'layer{LAYER}')",
    ),
    "plugin `load_sae`": (
        "import torch, qscope_plugin",
        f"sae = qscope_plugin.load_sae({RELEASE!r}, {LAYER})",
    ),
    "SAELens + plugin (`SAE.from_pretrained`)": (
        "import torch, qscope_plugin\nfrom sae_lens import SAE\nfrom sae_lens.loading.pretrained_saes_directory "
        "import get_pretrained_saes_directory as d; d()",
        f"sae = SAE.from_pretrained({RELEASE!r}, 'layer{LAYER}')",
    ),
}


def write_layer(cache: Path) -> Path:
    """One random layer of real size in a Hugging Face cache under ``cache``, as hf_hub_download stores it."""
    from qscope_testing import FakeHubCache

    hub = FakeHubCache(cache)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "W_enc": torch.randn(D_SAE, D_MODEL, generator=g) / D_MODEL**0.5,
        "W_dec": torch.randn(D_MODEL, D_SAE, generator=g) / D_MODEL**0.5,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.01 - 0.05,
        "b_dec": torch.randn(D_MODEL, generator=g),
    }
    hub.add_file(REPO, "README.md", b"synthetic Qwen-Scope layer for benchmarks\n")
    staging = cache / "staging.pt"
    torch.save(tensors, staging)
    return hub.add_file(REPO, f"layer{LAYER}.sae.pt", staging)


def measure_load(name: str, env: dict[str, str], repeats: int) -> dict[str, float]:
    imports, load = LOADERS[name]
    runs = []
    for _ in range(repeats):
        code = _MEASURE.format(imports=imports, load=load, repo=REPO, benchmarks=str(HERE))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["load_s"])
    return {"load_s": best["load_s"], "peak_delta_mib": max(r["peak_delta_mib"] for r in runs),
            "after_delta_mib": best["after_delta_mib"]}


def timeit(fn, repeats: int = 5) -> float:
    """Best of ``repeats`` after a warm-up; a call over 2 s (SAELens' bf16 on AVX2) is timed once."""
    t = time.perf_counter()
    fn()
    if time.perf_counter() - t > 2:
        repeats = 1
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def throughput(path: Path) -> list[tuple[str, float, float, str]]:
    """(what, plugin seconds, baseline seconds, baseline name) rows."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import qwen_scope_sae_huggingface_loader as builtin

    from qscope_plugin import QwenScopeSAE

    ours = QwenScopeSAE.from_file(path, K)
    rows = []
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        theirs = SAE.from_pretrained(RELEASE, f"layer{LAYER}", dtype=name, converter=builtin)  # SAELens as shipped
        mine = ours.to(dtype=dtype)
        x = torch.randn(64, D_MODEL).to(dtype)
        with torch.no_grad():
            rows.append((f"encode 64 tok, {name}", timeit(lambda m=mine, x=x: m.encode(x)),
                         timeit(lambda m=theirs, x=x: m.encode(x)), "SAELens built-in `encode`"))
            rows.append((f"encode+decode 64 tok, {name}", timeit(lambda m=mine, x=x: m.reconstruct(x)),
                         timeit(lambda m=theirs, x=x: m(x)), "SAELens built-in `forward`"))
        del theirs, mine
    x = torch.randn(256, D_MODEL)
    rows.append(("encode 256 tok, float32", timeit(lambda: ours.encode(x)),
                 timeit(lambda: F.linear(x, ours.W_enc, ours.b_enc)), "bare GEMM x @ W_enc.T + b_enc"))
    in_ram = ours.to()  # feature-major decoder
    for n_tokens in (1, 64, 256):
        x = torch.randn(n_tokens, D_MODEL)
        values, idx = ours.encode_sparse(x)
        z = ours.encode(x)
        dense = timeit(lambda z=z: ours.decode(z))
        for sae, layout in ((ours, "mmap file layout"), (in_ram, "`.to()` copy, feature-major")):
            rows.append((f"sparse decode {n_tokens} tok, k={K}, {layout}",
                         timeit(lambda s=sae, v=values, i=idx: s.decode_sparse(v, i)), dense,
                         "dense decode z @ W_dec.T"))
    return rows


def versions() -> str:
    from importlib.metadata import version

    libs = ", ".join(f"{p} {version(p)}" for p in ("torch", "sae-lens", "transformers", "huggingface_hub"))
    return f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), " \
           f"{os.cpu_count()} CPU cores, Python {platform.python_version()}; {libs}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process loads per loader")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(versions())
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")  # before huggingface_hub is imported
        env = dict(os.environ)
        path = write_layer(cache)
        path.read_bytes()  # warm the page cache: the table compares loaders, not the disk
        loads = {name: measure_load(name, env, args.repeats) for name in LOADERS}
        rows = throughput(path)

    base = loads["SAELens built-in (`SAE.from_pretrained`)"]
    lines = [
        "# Benchmarks", "",
        f"Generated by `python benchmarks/bench_sae.py` on {versions()}.", "",
        f"One synthetic {D_MODEL} x {D_SAE} float32 layer (512 MiB) under `{RELEASE}`, read from a local Hugging Face "
        "cache. Loads run in fresh processes with a warm page cache; best of "
        f"{args.repeats} for time, worst for peak RSS.", "",
        "## Load", "",
        "| loader | load (s) | peak RSS delta (MiB) | RSS after (MiB) | load speed-up | peak RSS vs SAELens |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in loads.items():
        speed, memory = base["load_s"] / r["load_s"], r["peak_delta_mib"] / max(base["peak_delta_mib"], 1)
        lines.append(f"| {name} | {r['load_s']:.4f} | {r['peak_delta_mib']:.0f} | {r['after_delta_mib']:.0f} | "
                     f"{speed:.0f}x | {memory:.3f} |")
    lines += ["", "Memory-mapped pages are mapped lazily: touching every weight later adds ~512 MiB of shared, "
              "reclaimable page cache, not private memory.", "",
              "Sparse decode on the memory-mapped file layout reads each used decoder column with a stride of "
              "d_sae, so its gain is largest for a few tokens (generation) and shrinks as a batch's distinct "
              "features approach d_sae (random inputs, as here, are the worst case). A float32 (or CUDA) `.to()` "
              "copy stores the decoder feature-major, and sparse decode becomes one embedding-bag over k "
              "contiguous rows per token; the copy costs the decoder's size in private RAM (256 MiB here). bf16 "
              "copies on CPU keep the file layout.", "",
              "bf16 on CPU depends on the ISA (the CPU capability is in the first line): on AVX2-only CPUs "
              "SAELens' contiguous (d_in, d_sae) bf16 matrix is ~80x slower than the file's (d_sae, d_in) "
              "layout, which the plugin keeps ([upstream.md](upstream.md) §1.4); with AVX512-BF16 both layouts "
              "are fast and SAELens' is the faster (plugin encode+decode of 64 tokens measured at 0.80x SAELens "
              "there while the file layout was kept). So a bf16/fp16 `.to()` copy on CPU takes its layout from "
              "`torch.backends.cpu.get_cpu_capability()`: the file layout on AVX2, SAELens' (encoder in "
              "(d_in, d_sae) memory, decoder feature-major) on AVX512. The bf16 rows below are for the layout this "
              "machine gets; rerun this script on the other kind of CPU for the other. Calls over 2 s are timed "
              "once.", "",
              "## Compute (CPU)", "", "| operation | plugin (ms) | baseline (ms) | baseline | speed-up |",
              "|---|---|---|---|---|"]
    for what, ours, theirs, name in rows:
        lines.append(f"| {what} | {ours * 1e3:.2f} | {theirs * 1e3:.2f} | {name} | {theirs / ours:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
