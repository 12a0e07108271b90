"""CI executes every recipe notebook (percent-format scripts) on the demo model, as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qscope_plugin.models import DEMO_MODEL_DIR

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo assets not built")
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_runs(notebook, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, str(notebook)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()


def test_there_is_a_notebook_per_recipe():
    assert [n.stem for n in NOTEBOOKS] == ["01_discovery_and_steering", "02_or_rule_classifier",
                                           "03_safety_synthesis", "04_benchmark_redundancy", "05_sasft",
                                           "06_repetition"]
