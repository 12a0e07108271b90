"""``qscope app``: the local web app (Analyze, Compare, Steer, Feature) on a backbone and its SAEs."""

from __future__ import annotations

import argparse
from importlib.util import find_spec

from qscope_plugin.cli._options import (
    MAX_POSITIONS,
    UsageError,
    add_data_options,
    add_model_options,
    count,
    data_texts,
)


def cmd_app(args: argparse.Namespace) -> None:
    from qscope_plugin.app import GRADIO_MISSING

    if find_spec("gradio") is None:  # before the model loads: a missing extra is the user's to fix
        raise UsageError(GRADIO_MISSING)
    from qscope_plugin.app.explorer import Explorer
    from qscope_plugin.app.web import serve

    texts = data_texts(args) if args.data else ()
    explorer = Explorer.load(args.model, args.release, device=args.device, texts=texts, max_tokens=args.max_tokens,
                             explanations=args.explanations, sae_device=args.sae_device)
    serve(explorer, host=args.host, port=args.port, queue_size=args.queue_size,
          announce=lambda url: print(f"qscope app: serving on {url} (Ctrl+C to stop)", flush=True))


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; pass a number in 1..65535, e.g. 7860")
    return int(text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    app = sub.add_parser("app", help="local web app: analyze, compare, steer and inspect features in a browser")
    add_model_options(app, layers=False, json_output=False)
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    app.add_argument("--port", type=_port, default=7860, help="port to listen on (default 7860)")
    app.add_argument("--max-tokens", type=count(1, MAX_POSITIONS), default=None,
                     help="longest text any tab takes, in tokens; longer ones are refused in the page before the "
                     "model runs (default: the model's context, max_position_embeddings)")
    app.add_argument("--queue-size", type=count(1, 1000), default=16,
                     help="requests that may wait for the model; more are answered 'Queue is full' at once "
                     "(default 16)")
    add_data_options(app, required=False, what="texts of the Feature tab's cards (default: the demo's sentences)")
    app.add_argument("--explanations", default=None, help="a `qscope explain` file: the search box finds features by "
                     "their explanation, and cards show it with its scores")
    app.set_defaults(func=cmd_app)
