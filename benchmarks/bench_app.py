"""`qscope app` request latency on the embedded demo: each tab's request through the running server, and its
callback alone.

    python benchmarks/bench_app.py          # prints a table, writes docs/benchmarks_app.md

The app serves the demo model (Qwen3 layout, 4 layers, hidden 128) and its SAEs (d_sae 1536, k 32) on CPU, on
127.0.0.1. "Through the server" is a ``gradio_client`` request, what a click in the page costs (HTTP, Gradio's
queue, the callback, the HTML back); "callback" is the ``Explorer`` method called directly. Every SAE is loaded
once before timing (the store's LRU keeps them), as in a session where each layer has been used once. Best of
several interleaved runs. ``BENCH_THREADS`` sets torch's thread count (default 1, as the other benchmarks).
The goal is under a second per request.

Then a load check: ``CLIENTS`` concurrent ``gradio_client`` clients, each sending normal requests mixed with
hostile ones that the app's caps refuse (``0-999999999`` prompt positions, a 200,000-character prompt, 10^9 new
tokens, a text past ``--max-tokens``, a Compare past its layers × tokens budget), report latency percentiles and
that every request was answered or refused; and a burst of ``BURST`` simultaneous Steer requests against a queue of
``QUEUE_SIZE``, where the requests past the queue must be refused at once ("Queue is full") rather than wait.
"""

from __future__ import annotations

import html
import os
import platform
import re
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import gradio
import torch
from _timing import best_of_interleaved, publish
from gradio_client import Client

from qscope_plugin.app import web
from qscope_plugin.app.explorer import Explorer
from qscope_plugin.app.web import serve

REPEATS = 5
CLIENTS, ROUNDS = 6, 4
"""Load check: concurrent clients, and rounds of (normal, hostile) request pairs each sends."""
QUEUE_SIZE, BURST = 4, 12
"""Burst: simultaneous Steer requests against a server whose queue holds ``QUEUE_SIZE``."""
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
    load_lines = load_check(explorer, steer)

    lines = ["# `qscope app` request latency", "",
             f"`python benchmarks/bench_app.py` on {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, Gradio {gradio.__version__}: "
             "the embedded demo (4 layers, hidden 128, d_sae 1536) on CPU; best of "
             f"{REPEATS} interleaved runs, SAEs already loaded. Goal: under 1 s per request.", "",
             "| request | through the server (s) | callback alone (s) |", "|---|---|---|"]
    lines += [f"| {name} | {timings[f'{name}|server']:.3f} | {timings[f'{name}|callback']:.3f} |"
              for name in requests]
    text = "\n".join(lines + load_lines) + "\n"
    publish(text, "benchmarks_app.md")


def _outcome(call) -> tuple[str, float, str]:
    """``(answered | refused | busy | failed, seconds, message)`` of one request."""
    start = time.perf_counter()
    try:
        status = call()[-1]
    except Exception as e:  # gradio_client raises for a full queue and for server errors
        kind = "busy" if "queue is full" in str(e).lower() else "failed"
        return kind, time.perf_counter() - start, " ".join(str(e).split())[:120]
    message = html.unescape(re.sub(r"<[^>]+>", "", status)).removeprefix("⚠ ")
    return ("refused" if status else "answered"), time.perf_counter() - start, message[:160]


def _percentiles(seconds: list[float]) -> str:
    if not seconds:
        return "– | – | – | –"
    cuts = statistics.quantiles(seconds, n=100, method="inclusive") if len(seconds) > 1 else seconds * 99
    return f"{cuts[49]:.2f} | {cuts[89]:.2f} | {cuts[98]:.2f} | {max(seconds):.2f}"


def load_check(explorer: Explorer, steer: dict) -> list[str]:
    """Concurrent clients on a fresh server: normal and capped hostile requests, then a burst past the queue."""
    app = serve(explorer, port=_free_port(), announce=lambda url: None, block=False)  # the default queue
    url = app.local_url

    def steer_with(**changes):
        args = {**steer, **changes}
        return (*list(args.values())[:8], "greedy", *list(args.values())[8:])

    normal = [("/analyze", (TEXT, 3, 5)), ("/compare", (*PAIR, 0, 3, 5, "rate", True, False, False)),
              ("/steer", steer_with()), ("/feature", (3, 28))]
    hostile = [("/steer", steer_with(positions="0-999999999")), ("/steer", steer_with(prompt="今" * 200_000)),
               ("/steer", steer_with(max_new_tokens=10**9)), ("/analyze", ("hi " * 400, 3, 5)),
               ("/compare", ("hi " * 250, "ok " * 250, 0, 3, 5, "rate", True, False, False))]
    compare_tokens = sum(len(explorer.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in hostile[-1][1][:2])
    results: dict[str, list[tuple[str, float, str]]] = {"normal": [], "hostile": []}
    lock = threading.Lock()

    def client(i: int) -> None:
        c = Client(url, verbose=False)
        for r in range(ROUNDS):
            for kind, (api, args) in (("normal", normal[(i + r) % len(normal)]),
                                      ("hostile", hostile[(i + r) % len(hostile)])):
                found = _outcome(lambda api=api, args=args: c.predict(*args, api_name=api))
                with lock:
                    results[kind].append(found)

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    wall = time.perf_counter() - start
    app.close()

    app = serve(explorer, port=_free_port(), announce=lambda url: None, block=False, queue_size=QUEUE_SIZE)
    clients = [Client(app.local_url, verbose=False) for _ in range(BURST)]
    with ThreadPoolExecutor(BURST) as pool:
        burst = list(pool.map(lambda c: _outcome(lambda: c.predict(*steer_with(max_new_tokens=64),
                                                                   api_name="/steer")), clients))
    app.close()

    lines = ["", "## Load check", "",
             f"{CLIENTS} concurrent `gradio_client` clients, each sending {ROUNDS} normal requests (Analyze, Compare, "
             "Steer with 24 new tokens, a Feature card, in turn) interleaved with as many hostile ones the caps refuse "
             "(`0-999999999` prompt positions, a 200,000-character prompt, 10^9 new tokens, an 800-token text past "
             f"`--max-tokens` 512, a Compare of 4 layers × {compare_tokens} tokens past its budget of "
             f"{explorer.max_layer_tokens}), queue of {web.QUEUE_SIZE}: "
             f"{len(results['normal']) + len(results['hostile'])} requests in {wall:.1f} s on one model (one request "
             "runs at a time; the others wait in Gradio's queue). Latency is the client's, queueing included.", "",
             "| requests | n | answered | refused with a message | busy | failed | p50 (s) | p90 (s) | p99 (s) | "
             "max (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, found in (*results.items(), (f"burst: {BURST} Steer (64 new tokens) at once, queue {QUEUE_SIZE}",
                                           burst)):
        counts = {k: sum(o == k for o, _, _ in found) for k in ("answered", "refused", "busy", "failed")}
        lines.append(f"| {kind} | {len(found)} | {counts['answered']} | {counts['refused']} | {counts['busy']} | "
                     f"{counts['failed']} | {_percentiles([t for _, t, _ in found])} |")
    busy = [t for o, t, _ in burst if o == "busy"]
    lines += ["", f"Busy answers of the burst came back in at most {max(busy):.2f} s (refused at once, not queued)."
              if busy else "No request of the burst was refused as busy."]
    messages = sorted({m for o, _, m in results["hostile"] if o == "refused"})
    lines += ["", "Messages the hostile requests got:", ""] + [f"- {m}" for m in messages]
    failures = [m for found in (*results.values(), burst) for o, _, m in found if o == "failed"]
    if failures:
        lines += ["", f"Failed requests (bugs): {failures[:5]}"]
    return lines


if __name__ == "__main__":
    main()
