"""`qscope app` request latency on the embedded demo: each tab's request through the running server, and its
callback alone.

    python benchmarks/bench_app.py          # prints a table, writes docs/benchmarks_app.md

The app serves the demo model (Qwen3 layout, 4 layers, hidden 128) and its SAEs (d_sae 1536, k 32) on CPU, on
127.0.0.1. "Through the server" is a ``gradio_client`` request, what a click in the page costs (HTTP, Gradio's
queue, the callback, the HTML back); "callback" is the ``Explorer`` method called directly. Every SAE is loaded
once before timing (the store's LRU keeps them), as in a session where each layer has been used once. Best of
several interleaved runs. ``BENCH_THREADS`` sets torch's thread count (default 1, as the other benchmarks).
The goal is under a second per request.
"""

from __future__ import annotations

import os
import platform
import socket

import gradio
import torch
from _timing import best_of_interleaved, publish
from gradio_client import Client

from qscope_plugin.app.explorer import Explorer
from qscope_plugin.app.web import serve

REPEATS = 5
TEXT = "今天早上我喝了一杯热茶，then I went to work."
PAIR = ("今天早上我喝了一杯热茶。", "This morning I drank a cup of hot tea.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    print(f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s), torch "
          f"{torch.__version__}, Gradio {gradio.__version__}")
    explorer = Explorer.load()
    app = serve(explorer, port=_free_port(), announce=lambda url: None, block=False)
    client = Client(app.local_url, verbose=False)
    steer = dict(prompt="今天早上", layer=3, feature=28, preset="Strong", custom_alpha=5.0, direction_norm="raw",
                 positions="all", steer_generated=True, temperature=1.0, top_p=0.95, seed=0, max_new_tokens=24)
    requests = {
        "Analyze (1 text, 1 layer)": ((TEXT, 3, 5), "/analyze"),
        "Compare (2 texts, layers 0-3)": ((*PAIR, 0, 3, 5, "rate", True, False, False), "/compare"),
        "Steer, greedy (24 new tokens, top-10)": ((*steer.values(),), "/steer"),
        "Steer, sampled (24 new tokens, top-10)": ((*steer.values(),), "/steer"),
        f"Feature card ({len(explorer.texts)} texts)": ((3, 28), "/feature"),
    }
    decoding = {name: "sampled" if "sampled" in name else "greedy" for name in requests}

    def through_server(name: str):
        args, api = requests[name]
        if api == "/steer":  # the decoding radio sits between steer_generated and temperature
            args = (*args[:8], decoding[name], *args[8:])
        return lambda: client.predict(*args, api_name=api)

    def callback(name: str):
        args, api = requests[name]
        if api == "/steer":
            return lambda: explorer.steer(**steer, decoding=decoding[name])
        return lambda: getattr(explorer, api[1:])(*args)

    runs = {f"{name}|server": through_server(name) for name in requests}
    runs |= {f"{name}|callback": callback(name) for name in requests}
    for run in runs.values():  # every layer's SAE loaded once, and a check that each request succeeds
        status = run()[-1]
        if status:
            raise SystemExit(f"a benchmark request failed: {status}")
    timings = best_of_interleaved(runs, repeats=REPEATS)
    app.close()

    lines = ["# `qscope app` request latency", "",
             f"`python benchmarks/bench_app.py` on {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, Gradio {gradio.__version__}: "
             "the embedded demo (4 layers, hidden 128, d_sae 1536) on CPU; best of "
             f"{REPEATS} interleaved runs, SAEs already loaded. Goal: under 1 s per request.", "",
             "| request | through the server (s) | callback alone (s) |", "|---|---|---|"]
    lines += [f"| {name} | {timings[f'{name}|server']:.3f} | {timings[f'{name}|callback']:.3f} |"
              for name in requests]
    text = "\n".join(lines) + "\n"
    publish(text, "benchmarks_app.md")


if __name__ == "__main__":
    main()
