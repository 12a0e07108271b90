#!/usr/bin/env bash
# On CUDA in bf16: SAE placement (each SAE on its layer's device, no activation copied to the host, counted with
# torch.profiler), an all-layer harvest at Qwen3-1.7B size, evaluate_saes' memory at Qwen's vocabulary, qscope
# plan's predicted peak (benchmarks/gpu_placement.py); SAE encode throughput against the memory-bandwidth limit of
# reading W_enc once per batch; then the real-size measurements (bench_real_size.py).
#
#   bash benchmarks/gpu_check.sh              # Qwen3-1.7B-Base size; results in $OUT (default /tmp/qscope-gpu-check)
#   REAL_SIZE=1 BACKBONES="1.7b 2b 8b" bash benchmarks/gpu_check.sh
#   REAL_SIZE=1 bash benchmarks/gpu_check.sh  # + bench_real_size.py on CUDA (default: placement and encode only)
#   DRY=1 bash benchmarks/gpu_check.sh        # on CPU, tiny sizes: the same code paths (CI runs this)
#
# Prints one PASS / FAIL line per check and exits 1 if any failed. Writes $OUT/gpu_placement.md (+ .json),
# $OUT/gpu_encode.md (the bandwidth table) and $OUT/benchmarks_real_size_cuda.md (bench_real_size.py's tables for
# CUDA); copy them into docs/ by hand once read.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/qscope-gpu-check}
BACKBONES=${BACKBONES:-1.7b}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
status=0

if [[ "${DRY:-0}" == "1" ]]; then
    "$PY" benchmarks/gpu_placement.py --dry --out "$OUT" || status=1
else
    "$PY" benchmarks/gpu_placement.py --out "$OUT" || status=1
fi

"$PY" - "$OUT" "${DRY:-0}" <<'EOF'
"""SAE encode at full width on one device: achieved bytes/s of reading W_enc vs the device's peak bandwidth."""
import sys
import time

import torch

from qscope_plugin.sae import QScopeSAEConfig, QwenScopeSAE

out, dry = sys.argv[1], sys.argv[2] == "1"
device = "cpu" if dry else "cuda"
if not dry and not torch.cuda.is_available():
    sys.exit("no CUDA device: run with DRY=1 to check the script on CPU")
widths = [(64, 256)] if dry else [(2048, 32768), (4096, 65536), (2048, 131072), (5120, 81920)]
tokens = [1, 64] if dry else [1, 64, 512, 4096]
dtype = torch.float32 if dry else torch.bfloat16


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bandwidth() -> float | None:
    """Bytes/s of a device-to-device copy of 1 GiB (what the memory system delivers in practice)."""
    if device != "cuda":
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync()
    return 2 * a.numel() * 10 / (time.perf_counter() - t)  # read + write


bw = peak_bandwidth()
name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
lines = [f"# SAE encode vs memory bandwidth ({name}, {dtype})", "",
         f"Device copy bandwidth: {bw / 1e9:.0f} GB/s." if bw else "Dry run: no bandwidth figure.", "",
         "| d_model x d_sae | tokens | encode (ms) | W_enc read (GB/s) | share of copy bandwidth |", "|---|---|---|---|---|"]
for d_model, d_sae in widths:
    g = torch.Generator().manual_seed(0)
    sd = {"W_enc": torch.rand(d_sae, d_model, generator=g) - 0.5, "W_dec": torch.rand(d_model, d_sae, generator=g),
          "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_model)}
    sae = QwenScopeSAE(sd, QScopeSAEConfig(d_model, d_sae, 50)).to(device, dtype)
    del sd
    for n in tokens:
        x = torch.randn(n, d_model, device=device, dtype=dtype)
        sae.encode_sparse(x)
        sync()
        t = time.perf_counter()
        reps = 20
        for _ in range(reps):
            sae.encode_sparse(x)
        sync()
        seconds = (time.perf_counter() - t) / reps
        rate = sae.W_enc.numel() * sae.W_enc.element_size() / seconds
        share = f"{rate / bw:.2f}" if bw else "-"
        lines.append(f"| {d_model} x {d_sae} | {n} | {1000 * seconds:.3f} | {rate / 1e9:.0f} | {share} |")
    del sae
    if device == "cuda":
        torch.cuda.empty_cache()
text = "\n".join(lines) + "\n"
open(f"{out}/gpu_encode.md", "w").write(text)
print(text)
EOF

if [[ "${DRY:-0}" == "1" || "${REAL_SIZE:-0}" != "1" ]]; then
    "$PY" benchmarks/bench_real_size.py --help > /dev/null
    echo "done: $OUT/gpu_placement.md $OUT/gpu_encode.md"
    exit $status
fi
# shellcheck disable=SC2086
"$PY" benchmarks/bench_real_size.py --backbones $BACKBONES --device cuda --dtype bfloat16 --repeats 3 \
    --root "$OUT/real-size" --out "$OUT/benchmarks_real_size_cuda.md"
exit $status
