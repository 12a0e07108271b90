"""The wheel installs adapters/ and recipes/ inside qscope_plugin: PyPI's `adapters` library owns that name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_the_qscope_plugin_top_level_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True)
    (wheel,) = tmp_path.glob("qscope_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"qscope_plugin"}
    assert "qscope_plugin/adapters/sae_lens.py" in names and "qscope_plugin/recipes/__init__.py" in names
    cli = {"qscope_plugin/cli/__init__.py", "qscope_plugin/cli/__main__.py", "qscope_plugin/cli/safety.py"}
    assert cli <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "qscope = qscope_plugin.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_names():
    import qscope_plugin.adapters
    import qscope_plugin.recipes

    assert Path(qscope_plugin.adapters.__file__).parent == ROOT / "adapters"
    assert Path(qscope_plugin.recipes.__file__).parent == ROOT / "recipes"
