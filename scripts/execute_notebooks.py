"""Execute every recipe notebook on the embedded demo and write its paired ``.ipynb`` with the outputs.

``notebooks/*.py`` (percent format) are the sources; the ``.ipynb`` next to each is what the hosting site shows.
Each notebook runs in a fresh kernel in a temporary folder (its files do not land in the repository), offline.
What changes from run to run without saying anything is left out, so that a re-run's diff is the outputs only:
stderr streams (progress bars, timing warnings), execution timing metadata and the kernel's version details.

    python scripts/execute_notebooks.py                # all of them
    python scripts/execute_notebooks.py 01 03          # those whose name starts so
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TIMEOUT_S = 900


def execute(source: Path, cwd: Path) -> nbformat.NotebookNode:
    """The notebook of ``source`` executed in ``cwd``; raises nbclient's CellExecutionError on the first error."""
    notebook = jupytext.read(source)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
                   ).execute()
    return notebook


def strip_volatile(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Outputs without stderr noise; no timing or interpreter-version metadata."""
    notebook.metadata.pop("widgets", None)
    notebook.metadata["language_info"] = {"name": "python"}
    for cell in notebook.cells:
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs = [out for out in cell.outputs if not (out.output_type == "stream" and out.name == "stderr")]
    return notebook


def main(prefixes: list[str]) -> None:
    for source in sorted(NOTEBOOKS.glob("*.py")):
        if prefixes and not source.name.startswith(tuple(prefixes)):
            continue
        with tempfile.TemporaryDirectory() as cwd:
            notebook = strip_volatile(execute(source, Path(cwd)))
        jupytext.write(notebook, source.with_suffix(".ipynb"), fmt="ipynb")
        print(f"wrote {source.with_suffix('.ipynb').relative_to(NOTEBOOKS.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:])
