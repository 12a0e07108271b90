"""Every harvest-based recipe under ``torchrun`` with 2 ranks (gloo, CPU) against one process: same results, time.

    python benchmarks/bench_distributed.py      # prints a table, writes docs/benchmarks_distributed.md

The script launches itself twice as a worker: once as one process, once under ``torchrun --nproc-per-node 2``.
Each worker loads the demo model and SAEs and runs, inside ``checkpoints(work dir, chunk_size=CHUNK)``, the recipe
behind each command on the same texts (the demo's Chinese and English lines, cycled to N_TEXTS): footprints,
feature cards (``qscope dashboard``), ``evaluate_saes`` (``qscope evaluate``), OR-rule classifier features
(``qscope classify fit``), SASFT language features (``qscope sasft features``), repetition features and top
contexts (``qscope safety targets``). Each recipe is timed between two barriers (model load and process start
left out) and its result reduced to a SHA-256 of its exact values; the table says whether the two launches agree.
Every worker process uses one thread (``OMP_NUM_THREADS=1``), so 2 ranks use 2 cores where one process uses one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_TEXTS, CHUNK, BATCH = 256, 32, 16


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def worker(result_file: str, work: str) -> None:
    """One rank (or the one process): run every recipe, time it, hash its result; rank 0 writes the JSON."""
    import numpy as np

    from qscope_plugin.demo.run import SENTENCES
    from qscope_plugin.distributed import barrier, checkpoints, rank_and_world, torchrun_group
    from qscope_plugin.models import DEMO_MODEL_DIR, load_model
    from qscope_plugin.recipes.classifiers import ORRuleClassifier
    from qscope_plugin.recipes.discovery import top_contexts
    from qscope_plugin.recipes.footprints import harvest_footprints
    from qscope_plugin.recipes.inspection import feature_cards
    from qscope_plugin.recipes.quality import evaluate_saes
    from qscope_plugin.recipes.repetition import repetition_features
    from qscope_plugin.recipes.sasft import language_features
    from qscope_plugin.store import DEMO_SAE_DIR, load_sae

    with torchrun_group("cpu") as (rank, _):
        model, tok = load_model(str(DEMO_MODEL_DIR))
        saes = {n: load_sae(str(DEMO_SAE_DIR), n) for n in range(4)}
        zh, en = SENTENCES["zh"], SENTENCES["en"]
        texts = [(zh + en)[i % (len(zh) + len(en))] + f" ({i})" for i in range(N_TEXTS)]
        labels = [int(i % (len(zh) + len(en)) < len(zh)) for i in range(N_TEXTS)]
        half = N_TEXTS // 2
        loops = [f"{t} the end the end the end the end" for t in texts]
        recipes = {
            "footprints": lambda: (lambda fp: [(fp[n].indptr.tolist(), fp[n].indices.tolist()) for n in fp.layers])(
                harvest_footprints(model, tok, texts, saes, batch_size=BATCH, chunk_size=CHUNK, progress=False,
                                   out=Path(work) / "footprints.safetensors")),
            "feature cards (dashboard)": lambda: [c.to_json() for c in feature_cards(
                model, tok, texts, saes[3], layer=3, top=20, batch_size=BATCH, progress=False)],
            "evaluate": lambda: evaluate_saes(model, tok, texts, saes, batch_size=BATCH, progress=False).to_json(),
            "classifier features (classify fit)": lambda: (lambda c: [c.features, c.top1_diff])(
                ORRuleClassifier(model, tok, saes, k_features=5).fit(texts, labels)),
            "language features (sasft features)": lambda: language_features(
                model, tok, {"zh": texts[:half], "en": texts[half:]}, saes, target="zh", batch_size=BATCH).to_json(),
            "repetition features": lambda: repetition_features(model, tok, loops, saes, batch_size=BATCH).to_json(),
            "top contexts (safety targets)": lambda: {str(k): v for k, v in top_contexts(
                model, tok, texts, saes, {n: list(range(0, 64)) for n in (1, 3)}, batch_size=BATCH).items()},
        }
        rows = {}
        for name, run in recipes.items():
            barrier()
            start = time.perf_counter()
            with checkpoints(Path(work) / name.split()[0], chunk_size=CHUNK):
                result = run()
            barrier()
            rows[name] = {"seconds": time.perf_counter() - start, "sha256": digest(result)}
        if rank == 0:
            world = rank_and_world()[1]
            Path(result_file).write_text(json.dumps({"world": world, "rows": rows, "numpy": np.__version__}))


def launch(ranks: int, tmp: Path) -> dict:
    out = tmp / f"world{ranks}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    me = [str(Path(__file__).resolve()), "--worker", str(out), str(tmp / f"work{ranks}")]
    cmd = ([sys.executable, *me] if ranks == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *me])
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())["rows"]


def main() -> None:
    import torch
    from _timing import publish

    with tempfile.TemporaryDirectory() as tmp:
        one, two = launch(1, Path(tmp)), launch(2, Path(tmp))
    lines = ["# Benchmark: data-parallel harvests under torchrun", "",
             f"`python benchmarks/bench_distributed.py` on {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPU cores (shared with other jobs while measured), torch {torch.__version__}: the demo "
             f"model and its 4 SAEs, {N_TEXTS} texts, chunks of {CHUNK} texts, batch {BATCH}, one thread per process "
             "(gloo). Seconds between two barriers (process start and model load left out); throughput per rank = "
             "texts / seconds / ranks.", "",
             "| recipe (command) | 1 process s | 2 ranks s | speed-up | texts/s, 1 process | texts/s per rank, 2 ranks "
             "| results identical |", "|---|---|---|---|---|---|---|"]
    for name, a in one.items():
        b = two[name]
        lines.append(f"| {name} | {a['seconds']:.2f} | {b['seconds']:.2f} | {a['seconds'] / b['seconds']:.2f}x | "
                     f"{N_TEXTS / a['seconds']:.0f} | {N_TEXTS / b['seconds'] / 2:.0f} | "
                     f"{'yes' if a['sha256'] == b['sha256'] else 'NO'} |")
    lines += ["", "Identical means the SHA-256 of the result's exact values (every float, index and string) is the "
              "same for both launches. With two ranks on two cores the ideal speed-up is 2x; what falls short comes "
              "from every rank reading and merging all chunks and from uneven shares (chunk i goes to rank i mod 2), "
              "and, like figures above 2x, from the two cores being shared with other jobs while this was "
              "measured (a single run of each, not a best of several).", ""]
    publish("\n".join(lines), "benchmarks_distributed.md")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
