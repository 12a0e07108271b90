"""``benchmarks/gpu_check.sh`` runs end to end: ``DRY=1`` takes the same code paths on CPU at tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_script_runs_dry_on_cpu_and_passes(tmp_path):
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path), "PY": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert lines and all(line.startswith("PASS") for line in lines), lines
    assert {"placement", "no host copies of activations", "all-layer harvest", "evaluate_saes memory"} <= {
        line.split(" ", 1)[1].split(":")[0] for line in lines}
    assert (tmp_path / "gpu_placement.md").is_file() and (tmp_path / "gpu_encode.md").is_file()
