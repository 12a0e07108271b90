"""Property test over the whole CLI: every command, any mix of its options, hostile values.

Each run ends in success (exit 0) or exactly one line on stderr, ``qscope CMD: error: ...``, with exit 1 or 2 —
never a traceback, and never an exception the CLI did not expect (those print "rerun with --debug", which would
mean a crash was only caught by the last-resort handler). Commands are read from ``build_parser()``, so a new
command is covered without touching this file.

Every run is under resource limits: ``RLIMIT_AS`` of the current size plus ``HEADROOM`` (a runaway allocation
fails in the test, not on the machine) and a bound on its peak RSS growth. Sizes of a job (``BOUNDED``) get small
values or enormous ones, which must be refused (exit 2) from their text, before anything loads.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qscope_testing import ResourceBound

from qscope_plugin.cli import build_parser, main
from qscope_plugin.store import DEMO_RELEASE

HUB_RELEASE = "qwen-scope-3-1.7b-base-w32k-l50"
SKIPPED = {("demo",): "runs every recipe (minutes) on any valid --out; its only option is an output folder",
           ("app",): "serves until stopped on any valid input; tests/app/test_app_cli.py covers its argument errors"}
"""Commands whose valid input starts a long job, with the reason; everything else is explored."""
BOUNDED = {"--max-new-tokens", "--budget", "--n-draws", "--n-adversarial", "--limit", "--batch-size", "--chunk-size",
           "--max-length", "--n-discovery", "--n-test", "--top", "--top-k", "--k", "--m-layers", "--weak-support"}
"""Sizes of a job: hostile but never huge, so a valid example stays a short run."""
EXAMPLES = {"releases": 3, "info": 15, "fetch": 20, "verify": 25, "checksum": 15, "redundancy": 20}
"""Examples per command; commands that load the demo model get ``MODEL_EXAMPLES``."""
MODEL_EXAMPLES = 8
EXPLORE = int(os.environ.get("QSCOPE_CLI_EXAMPLES", "0"))
"""Set to explore deeper locally (random, that many examples per command); CI runs the fixed, bounded budget."""

HOSTILE = ["", " ", "0", "1", "2", "-1", "-99999999999999999999", "99999999999999999999", "1e308", "nan", "inf",
           "-inf", "1.5", "3-1", "0-1", "0,2", "all", "a,b", ",", "=", "x=", "漢字 🙂 \u202eevil", "%s{0}\\n"]
SMALL = ["", "0", "1", "2", "-1", "nan", "inf", "1.5", "x"]
ENORMOUS = ["99999999999", "1e9", "2147483648", "-99999999999999999999", "9" * 400]
"""Sizes no option accepts: each is refused with exit 2 before a model or dataset loads."""
HEADROOM = 2 << 30
MEMORY_BOUND = 1536 << 20
"""Peak RSS growth of one run: the demo model, its SAEs and a harvest of a few texts fit with room to spare."""


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """Every leaf command (``classify fit`` included) with its parser, read from the subparsers."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return {prefix: parser}
    out = {}
    for name, child in sub.choices.items():
        out.update(_commands(child, (*prefix, name)))
    return out


COMMANDS = _commands(build_parser())


@pytest.fixture
def workdir(tmp_path: Path, hub_cache, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch cwd (relative outputs land here), an empty offline hub cache, and the backbone loaded once."""
    from qscope_plugin import models

    monkeypatch.chdir(tmp_path)
    loaded: dict[tuple, tuple] = {}
    real = models.load_model

    def load_once(model: str, *, device: str | None = None, dtype=None):
        key = (model, device, dtype)
        if key not in loaded:
            loaded[key] = real(model, device=device, dtype=dtype)
        return loaded[key]

    monkeypatch.setattr(models, "load_model", load_once)
    return tmp_path


def _files(root: Path) -> list[str]:
    """Hostile files, rebuilt for every example (an earlier example may have written over them)."""
    scratch = root / "files"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "folder").mkdir(parents=True)
    (scratch / "junk.bin").write_bytes(os.urandom(64) + b"\x00\xff\xfe" * 20)
    (scratch / "empty.txt").write_bytes(b"")
    (scratch / "lines.txt").write_text("hello world\n我今天很开心\n\n", encoding="utf-8")
    (scratch / "data.jsonl").write_text('{"text": "hi", "toxic": 1}\n{"text": 3}\n', encoding="utf-8")
    (scratch / "bad.json").write_text('{"features": {"x": [1]}, "release": 5}', encoding="utf-8")
    return [str(scratch / name) for name in ("folder", "junk.bin", "empty.txt", "lines.txt", "data.jsonl",
                                              "bad.json", "missing.txt")]


def _value(action: argparse.Action, files: list[str]) -> st.SearchStrategy[str]:
    if action.choices:
        return st.sampled_from([*action.choices, "", "bogus"])
    if any(o in BOUNDED for o in action.option_strings):
        return st.sampled_from(SMALL + ENORMOUS)
    return st.sampled_from([*HOSTILE, *files, DEMO_RELEASE, HUB_RELEASE])


@st.composite
def _argv(draw: st.DrawFn, command: tuple[str, ...], files: list[str]) -> list[str]:
    argv = list(command)
    for action in COMMANDS[command]._actions:
        if isinstance(action, argparse._HelpAction) or action.dest == "debug":
            continue
        if not action.option_strings:  # positional
            argv += draw(st.lists(_value(action, files), min_size=1, max_size=2 if action.nargs == "+" else 1))
            continue
        if not action.required and not draw(st.booleans()):
            continue
        option = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:  # a flag
            argv.append(option)
        else:
            for value in draw(st.lists(_value(action, files), min_size=1, max_size=2)):
                argv += [option, value] if not value.startswith("-") or draw(st.booleans()) else [f"{option}={value}"]
    return argv


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in SKIPPED], ids=" ".join)
def test_no_command_ever_prints_a_traceback(command, workdir, capsys):
    @settings(max_examples=EXPLORE or EXAMPLES.get(command[0], MODEL_EXAMPLES), deadline=None, derandomize=not EXPLORE,
              database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def run(data):
        argv = data.draw(_argv(command, _files(workdir)), label="argv")
        capsys.readouterr()
        with ResourceBound(HEADROOM) as used:
            try:
                status = main(argv)
            except SystemExit as e:  # argparse: usage errors
                status = e.code
        err = capsys.readouterr().err
        assert used.growth <= MEMORY_BOUND, f"{argv} grew the peak RSS by {used.growth / 2**20:.0f} MiB"
        if any(arg == value or arg.endswith(f"={value}") for arg in argv for value in ENORMOUS):
            assert status == 2, f"{argv}: an enormous size was not refused ({status}): {err}"
        assert "Traceback" not in err and status in (0, 1, 2), err
        if status:
            lines = err.strip().splitlines()
            assert lines and lines[-1].startswith("qscope") and ": error: " in lines[-1], err
            assert sum(": error: " in line for line in lines) == 1, err
            assert "rerun with --debug" not in err, f"unexpected exception for {argv}: {err}"

    run()


def test_every_command_is_explored_or_skipped_with_a_reason():
    assert set(SKIPPED) <= set(COMMANDS) and len(COMMANDS) - len(SKIPPED) >= 15
