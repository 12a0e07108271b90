"""The wheel installs adapters/ and recipes/ inside qscope_plugin: PyPI's `adapters` library owns that name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("builds")  # one process: every build writes the tree's build/ and egg-info


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel built from this tree, and everything the build printed."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-v", "-w", str(out)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("qscope_plugin-*.whl")
    return wheel, build.stdout + build.stderr


def test_wheel_has_only_the_qscope_plugin_top_level_package(built_wheel):
    wheel, _ = built_wheel
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"qscope_plugin"}
    assert "qscope_plugin/adapters/sae_lens.py" in names and "qscope_plugin/recipes/__init__.py" in names
    cli = {"qscope_plugin/cli/__init__.py", "qscope_plugin/cli/__main__.py", "qscope_plugin/cli/safety.py"}
    assert cli <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "qscope = qscope_plugin.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_ships_the_demo_assets_and_templates_without_setuptools_warnings(built_wheel):
    """Every data folder is declared: a fresh install is quiet, and the embedded demo runs from the wheel."""
    wheel, log = built_wheel
    assert "is absent from the `packages` configuration" not in log
    names = set(zipfile.ZipFile(wheel).namelist())
    demo = "qscope_plugin/demo/assets"
    model = [f"{demo}/model/{f}" for f in ("config.json", "tokenizer.json", "tokenizer_config.json",
                                           "model.safetensors")]
    saes = [f"{demo}/saes/{f}" for f in ("qscope.json", *(f"layer{n}.sae.pt" for n in range(4)))]
    templates = [f"qscope_plugin/recipes/templates/{p.name}" for p in (ROOT / "recipes" / "templates").glob("*.txt")]
    templates += [f"qscope_plugin/app/templates/{f}" for f in ("dashboard.html", "card.css", "dashboard.js")]
    assert templates and set(model + saes + templates) <= names, sorted(set(model + saes + templates) - names)


def test_installed_names():
    import qscope_plugin.adapters
    import qscope_plugin.recipes

    assert Path(qscope_plugin.adapters.__file__).parent == ROOT / "adapters"
    assert Path(qscope_plugin.recipes.__file__).parent == ROOT / "recipes"


def test_the_editable_install_maps_the_package_quietly(tmp_path):
    """``pip install -e .`` builds its wheel with the project's backend: the finder maps the three folders into
    qscope_plugin, and setuptools' notice about same-named folders in the working directory is gone."""
    code = ("import sys; sys.path.insert(0, 'scripts'); import qscope_build; "
            f"print(qscope_build.build_editable({str(tmp_path)!r}))")
    build = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, capture_output=True, text=True,
                           check=True)
    log = build.stdout + build.stderr
    assert "working directory" not in log and "Editable installation" not in log, log[-2000:]
    wheel = zipfile.ZipFile(tmp_path / build.stdout.strip().splitlines()[-1])
    (finder,) = [n for n in wheel.namelist() if n.endswith("_finder.py")]
    mapping = wheel.read(finder).decode()
    for package, folder in (("qscope_plugin", "qscope_plugin"), ("qscope_plugin.adapters", "adapters"),
                            ("qscope_plugin.recipes", "recipes")):
        assert f"{package!r}: {str(ROOT / folder)!r}" in mapping
    assert "'adapters'" not in mapping.replace("qscope_plugin.adapters", "")  # no top-level `adapters`
