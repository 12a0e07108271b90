"""The ``qscope`` command line: one module per command group, each command a thin call into a recipe.

    qscope releases                                   # the 14 Qwen-Scope groups
    qscope info qwen-scope-3-1.7b-base-w32k-l50       # dims, bytes per layer, cached layers
    qscope fetch qwen-scope-3-1.7b-base-w32k-l50 --layers 10-14
    qscope verify qwen-scope-3-1.7b-base-w32k-l50     # cached layers against their SHA-256, offline
    qscope dashboard --layer 3 --top 50 --data texts.jsonl --out dashboard.html   # feature cards, one HTML file
    qscope explain --layers 3 --top 20 --data texts.jsonl --llm http://127.0.0.1:8000/v1   # explanations, scored

Exit status: 0 success, 1 runtime failure, 2 usage error. A usage error is a bad argument (argparse, ``UsageError``)
or a plugin error that is a ``ValueError`` (an unknown release, a layer out of range, a bad option value); a
runtime failure is anything else that stops the command, such as an ``OSError``-based plugin error (hub
unreachable, not cached, a model that cannot load) or a file that cannot be written. Either way one line goes to
stderr, ``qscope CMD: error: ...``; ``--debug`` raises the exception instead, with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from qscope_plugin.cli import (
    app,
    benchmarks,
    classify,
    dashboard,
    demo,
    discovery,
    evaluate,
    explain,
    hub,
    plan,
    repetition,
    safety,
    sasft,
    steering,
    verify,
)
from qscope_plugin.cli._options import UsageError, parse_layers
from qscope_plugin.errors import QScopeError

__all__ = ["UsageError", "build_parser", "exit_status", "main", "parse_layers"]

USAGE, RUNTIME = 2, 1


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr (``qscope CMD: error: ...`` and where to look), exit status 2."""

    def error(self, message: str):  # subparsers inherit this class
        hint = f"see `{self.prog} --help`"
        self.exit(USAGE, f"{self.prog}: error: {' '.join(message.split())} ({hint})\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="qscope", description="Qwen-Scope SAEs: catalogue, download, recipes")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (hub, verify, demo, discovery, evaluate, steering, classify, benchmarks, safety, sasft, repetition,
                  dashboard, app, explain, plan):
        group.add_parser(sub)
    return parser


def exit_status(error: Exception) -> int:
    """2 for a plugin error that is a ``ValueError`` (the input was wrong), 1 for everything else."""
    return USAGE if isinstance(error, QScopeError) and isinstance(error, ValueError) else RUNTIME


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except Exception as e:
        if args.debug:
            raise
        plugin = isinstance(e, QScopeError | OSError)  # their messages say what to do; others are unexpected
        message = " ".join(str(e).split()) or type(e).__name__
        hint = "" if plugin else f" ({type(e).__name__}; rerun with --debug for the traceback)"
        print(f"qscope {args.command}: error: {message}{hint}", file=sys.stderr)
        return exit_status(e)
    return 0
