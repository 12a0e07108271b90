"""Every code block of README.md and docs/*.md runs as written, offline, on the embedded demo.

Fenced blocks are read with markdown-it (the parser behind the hosting site's rendering), by info string:

- ```python: run in this process, in a fresh namespace, with the working directory a fresh temporary folder; a
  traceback names the markdown file and line (the code is compiled under the file's name, at its own lines).
- ```bash / ```sh: the blocks of one file run in order, one ``bash -eu -o pipefail`` process each, in one shared
  temporary working folder (a block's input is made by an earlier block of the same file, or shipped), with the
  ``qscope`` of this virtualenv first on PATH and ``HF_HUB_OFFLINE=1``; a failure names the file and line.
- ``notest`` after the language (```python notest): needs a real model, a GPU, the network or a server that does
  not exit, and is not run; its demo equivalent stands beside it. With ``offline-error`` as well
  (```python notest offline-error) it is run anyway and must stop at the project's one-line error (a
  ``QScopeError``; for a command, exit status 1 or 2 with one ``qscope ...: error:`` line and no traceback): the
  message a user without the model or the network sees.
- any other info string (text, json, ...) is output or data, never run; a fence without one is refused, so that a
  code block cannot skip the check by accident.

``python -m pytest tests/test_docs_run.py -k README`` checks one file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from qscope_plugin.errors import QScopeError

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON, SHELL = {"python", "py"}, {"bash", "sh", "shell"}
NOT_CODE = {"text", "json", "jsonl", "csv", "toml", "yaml", "markdown", "md", "html", "diff", "console", "output"}
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    flags: frozenset[str]
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return "notest" not in self.flags or "offline-error" in self.flags

    @property
    def expects_error(self) -> bool:
        return "notest" in self.flags and "offline-error" in self.flags


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with the line of their opening fence."""
    found = []
    for token in MarkdownIt("commonmark").parse(path.read_text(encoding="utf-8")):
        if token.type == "fence":
            language, *flags = token.info.split() or [""]
            found.append(Block(path, token.map[0] + 1, language.lower(), frozenset(flags), token.content))
    return found


ALL_BLOCKS = [b for path in DOC_FILES for b in blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.language in PYTHON and b.runs]
SHELL_FILES = sorted({b.path for b in ALL_BLOCKS if b.language in SHELL and b.runs})


def test_every_block_says_what_it_is():
    unlabelled = [b.where for b in ALL_BLOCKS if b.language not in PYTHON | SHELL | NOT_CODE]
    assert not unlabelled, (f"fenced blocks without a known info string: {unlabelled}; use ```python or ```bash "
                            f"(run on the demo, or `notest`), or ```text for output")


@pytest.fixture
def docs_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment a reader has: offline, no display, this virtualenv's commands first on PATH."""
    env = {"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return {**os.environ, **env}


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_python_block_runs(block: Block, docs_env):
    # Blank lines in front put every statement at its line in the markdown file, for tracebacks.
    code = compile("\n" * block.line + block.code, str(block.path), "exec")
    namespace = {"__name__": "__docs__"}
    if not block.expects_error:
        try:
            exec(code, namespace)
        except BaseException as e:
            pytest.fail(f"{block.where}: the block raised\n{''.join(traceback.format_exception(e)[-12:])}")
        return
    with pytest.raises(QScopeError) as caught:
        exec(code, namespace)
    message = str(caught.value)
    assert message and "\n" not in message, f"{block.where}: not a one-line error: {message!r}"


def _run_shell(block: Block, workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # xtrace names each command's markdown line, so a failure inside a block points at its command.
    trace = f"PS4='+ {block.path.relative_to(ROOT)}:$((LINENO + {block.line - 1})): '; set -x"
    return subprocess.run(["bash", "-eu", "-o", "pipefail", "-c", f"{trace}\n{block.code}"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


@pytest.mark.parametrize("path", SHELL_FILES, ids=[str(p.relative_to(ROOT)) for p in SHELL_FILES])
def test_shell_blocks_run(path: Path, tmp_path: Path, docs_env):
    for block in (b for b in ALL_BLOCKS if b.path == path and b.language in SHELL and b.runs):
        out = _run_shell(block, tmp_path, docs_env)
        tail = f"\n--- stdout ---\n{out.stdout[-2000:]}\n--- stderr ---\n{out.stderr[-4000:]}"
        if not block.expects_error:
            assert out.returncode == 0, f"{block.where}: exit status {out.returncode}{tail}"
            continue
        errors = [line for line in out.stderr.splitlines() if not line.startswith("+ ")]
        assert out.returncode in (1, 2), f"{block.where}: expected the one-line error, got exit {out.returncode}{tail}"
        assert len(errors) == 1 and errors[0].startswith("qscope") and ": error: " in errors[0], \
            f"{block.where}: expected one `qscope ...: error: ...` line{tail}"


def test_the_checker_reports_the_failing_line(tmp_path: Path, docs_env):
    """A failing command is reported at its own line of the markdown file, not just the block's."""
    doc = ROOT / "docs" / "_checker_probe.md"
    block = Block(doc, 7, "bash", frozenset(), "true\nfalse\n")
    out = _run_shell(block, tmp_path, docs_env)
    assert out.returncode == 1 and "docs/_checker_probe.md:9: false" in out.stderr, out.stderr
