"""The recipe notebooks: percent-format scripts, each paired with an executed ``.ipynb`` that shows its outputs.

CI re-executes every notebook with nbclient on the demo model (a fresh kernel in a temporary folder, as
``scripts/execute_notebooks.py`` does to write the ``.ipynb``) and fails when a cell errors, and fails when a
``.ipynb`` is missing, has no outputs, or its cells differ from its ``.py`` (edit the ``.py``, then rerun the
script).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jupytext
import pytest

from qscope_plugin.models import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
_spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "scripts" / "execute_notebooks.py")
execute_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute_notebooks)


def _cells(path: Path) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in jupytext.read(path).cells]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_the_executed_pair_is_up_to_date(notebook):
    paired = notebook.with_suffix(".ipynb")
    assert paired.is_file(), f"{paired.name} is missing: run python scripts/execute_notebooks.py {notebook.stem[:2]}"
    assert _cells(paired) == _cells(notebook), (f"{paired.name} is out of date with {notebook.name}: run python "
                                                f"scripts/execute_notebooks.py {notebook.stem[:2]}")
    code = [cell for cell in jupytext.read(paired).cells if cell.cell_type == "code"]
    assert sum(bool(cell.get("outputs")) for cell in code) >= len(code) / 2, f"{paired.name} has few outputs"


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo assets not built")
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_executes(notebook, tmp_path):
    executed = execute_notebooks.execute(notebook, tmp_path)  # raises CellExecutionError on the first error
    assert any(cell.get("outputs") for cell in executed.cells if cell.cell_type == "code")


def test_there_is_a_notebook_per_recipe():
    assert [n.stem for n in NOTEBOOKS] == ["01_discovery_and_steering", "02_or_rule_classifier",
                                           "03_safety_synthesis", "04_benchmark_redundancy", "05_sasft",
                                           "06_repetition"]
