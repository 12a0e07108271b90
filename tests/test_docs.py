"""The documentation is self-contained: what the code cites exists inside the repository.

- every equation label in a docstring or comment (``(R16)``, ``R10a``, ranges such as ``R15–R17``) is defined in
  ``docs/method.md``, as a line of the form ``(LABEL) ...``;
- every "docs/method.md §N" / "docs/upstream.md §N" (and "§4 row N", "§1.1 rule N") names a heading, row or rule
  that exists;
- every relative link in ``README.md`` and ``docs/*.md`` resolves to a file inside the repository;
- nothing cites the old out-of-repository notes.
"""

from __future__ import annotations

import functools
import io
import os
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
METHOD = DOCS / "method.md"
SKIP_DIRS = {".venv", ".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}

LABEL = re.compile(r"(?<![\w.])([ER])(\d+)([a-z]?)(?![\w])")
RANGE = re.compile(r"(?<![\w.])([ER])(\d+)\s*[–-]\s*\1?(\d+)(?![\w])")
DEFINITION = re.compile(r"^\s*\(([ER]\d+[a-z]?)\)\s", re.M)
NOQA = re.compile(r"noqa(?::\s*[A-Z]+\d+(?:\s*,\s*[A-Z]+\d+)*)?")
SECTION_REF = re.compile(r"\b(method|upstream)\.md\)?\s+§(\d+(?:\.\d+)*)")
ROW_REF = re.compile(r"\bmethod\.md\)?\s+§4\s+row\s+(\d+)")
RULE_REF = re.compile(r"\bmethod\.md\)?\s+§1\.1\s+rule\s+(\d+)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?\s*$", re.M)
# Assembled so that this file does not match itself.
FORBIDDEN = ("spec " + "§", "upstream-" + "status", "../" + "shared", "spec E" + "1")


@functools.cache
def _files(suffix: str) -> list[Path]:
    """The repository's files ending in ``suffix``, without virtualenvs, caches and build output."""
    found = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")]
        found += [Path(folder) / name for name in names if name.endswith(suffix)]
    return sorted(found)


def _prose(path: Path) -> str:
    """Docstrings, string literals and comments of a Python file (``noqa`` rule codes removed)."""
    chunks = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type == tokenize.COMMENT:
            chunks.append(NOQA.sub("", tok.string))
        elif tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            chunks.append(tok.string)
    return "\n".join(chunks)


def labels_in(text: str) -> set[str]:
    """Every label written in ``text``; a range ``R15–R17`` also uses the labels between its ends."""
    found = {"".join(m.groups()) for m in LABEL.finditer(text)}
    for kind, first, last in RANGE.findall(text):
        found |= {f"{kind}{n}" for n in range(int(first), int(last) + 1)}
    return found


def defined_labels() -> set[str]:
    return set(DEFINITION.findall(METHOD.read_text(encoding="utf-8")))


def cited_labels() -> dict[str, set[Path]]:
    """Label -> the files citing it: Python prose everywhere, and every markdown file but method.md."""
    cited: dict[str, set[Path]] = {}
    sources = [(p, _prose(p)) for p in _files(".py")]
    sources += [(p, p.read_text(encoding="utf-8")) for p in _files(".md") if p != METHOD]
    for path, text in sources:
        for label in labels_in(text):
            cited.setdefault(label, set()).add(path.relative_to(ROOT))
    return cited


def test_the_extractors_see_the_labels_as_they_are_written() -> None:
    assert labels_in("(R16) Δ_f ...; see R10a and (R22, R24, R27); R15–R17; E1-E2") == {
        "R16", "R10a", "R22", "R24", "R27", "R15", "R17", "E1", "E2"}
    assert labels_in("SAE-Res-Qwen3-8B-Base-W64K-L0_50, x.E1, RE12") == set()
    assert labels_in(NOQA.sub("", "noqa: E" + "731, B008")) == set()  # ruff codes in comments are not labels
    assert {"E1", "E5", "R1", "R8b", "R10a", "R16", "R33"} <= defined_labels()
    assert {"E1", "R1", "R8b", "R10a", "R16", "R27"} <= set(cited_labels())  # the scan reaches the package


def test_every_cited_equation_label_is_defined_in_docs_method() -> None:
    defined = defined_labels()
    missing = {label: sorted(map(str, files)) for label, files in cited_labels().items() if label not in defined}
    assert not missing, f"labels cited but not defined in docs/method.md: {missing}"


def _section(markdown: str, number: str) -> str:
    """The text of section ``number`` (from its heading to the next heading of the same or a higher level)."""
    heading = re.search(rf"^(#{{1,6}})\s+{re.escape(number)}[.\s].*$", markdown, re.M)
    if heading is None:
        return ""
    end = re.compile(rf"^#{{1,{len(heading.group(1))}}}\s", re.M).search(markdown, heading.end())
    return markdown[heading.end() : end.start() if end else len(markdown)]


def test_every_cited_section_row_and_rule_exists() -> None:
    docs = {name: (DOCS / f"{name}.md").read_text(encoding="utf-8") for name in ("method", "upstream")}
    problems = []
    for path in _files(".py") + _files(".md"):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT)
        for name, number in SECTION_REF.findall(text):
            if not re.search(rf"^#{{1,6}}\s+{re.escape(number)}[.\s]", docs[name], re.M):
                problems.append(f"{where}: docs/{name}.md §{number} has no such heading")
        for row in ROW_REF.findall(text):
            if not re.search(rf"^\|\s*{row}\s*\|", _section(docs["method"], "4"), re.M):
                problems.append(f"{where}: docs/method.md §4 row {row} does not exist")
        for rule in RULE_REF.findall(text):
            if not re.search(rf"^{rule}\.\s", _section(docs["method"], "1.1"), re.M):
                problems.append(f"{where}: docs/method.md §1.1 rule {rule} does not exist")
    assert not problems, "\n".join(problems)


def _markdown() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", _markdown(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text) + REFERENCE_LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # external URL, mailto or an anchor in the same page
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (path.parent / file_part).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to missing or outside files: {broken}"


def test_the_readme_indexes_every_document() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unlisted = [p.name for p in sorted(DOCS.glob("*.md")) if f"(docs/{p.name})" not in readme]
    assert not unlisted, f"README's Documentation section does not link {unlisted}"


def test_nothing_cites_notes_outside_the_repository() -> None:
    hits = [f"{p.relative_to(ROOT)}: {needle!r}" for p in _files(".py") + _files(".md")
            for needle in FORBIDDEN if needle in p.read_text(encoding="utf-8")]
    assert not hits, ("references to notes outside the repository (point them at docs/method.md or "
                      "docs/upstream.md):\n" + "\n".join(hits))
