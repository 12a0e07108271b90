"""`qscope explain` against a REAL OpenAI-compatible server: `transformers serve` with the embedded demo model, on CPU.

The demo tokenizer has no chat template (its /v1/chat/completions answers 400), so the served copy gets a plain
one. The server binds 127.0.0.1 on a free port, every wait is bounded, and it is always killed. The demo model
writes nonsense: these tests check the plumbing (requests, answers parsed or counted unparsed, the file, the cache,
resume after the server dies), never the quality of the explanations.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qscope_plugin.models import DEMO_MODEL_DIR

pytest.importorskip("openai", reason="the explain extra is not installed (pip install 'qscope-plugin[explain]')")
pytest.importorskip("fastapi", reason="transformers' serving extra is not installed")
if not DEMO_MODEL_DIR.is_dir():
    pytest.skip("the demo assets are not built", allow_module_level=True)

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}Answer:{% endif %}")
START_TIMEOUT = 180
SMALL = ["--n-train", "4", "--n-test", "6", "--n-non-activating", "6", "--batch", "3", "--window", "3",
         "--max-new-tokens", "8", "--n-promoted", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`transformers serve` of a model folder, in its own process group."""

    def __init__(self, model: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        serve = Path(sys.executable).with_name("transformers")
        self.log = log
        with open(log, "w") as sink:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([str(serve), "serve", str(model), "--host", "127.0.0.1", "--port",
                                          str(self.port), "--device", "cpu"], stdout=sink, stderr=subprocess.STDOUT,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"transformers serve did not answer within {START_TIMEOUT} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("served") / "demo-chat"
    shutil.copytree(DEMO_MODEL_DIR, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    from qscope_plugin.demo.run import SENTENCES

    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    rows = SENTENCES["zh"][:12] + SENTENCES["en"][:12]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows), encoding="utf-8")
    return path


def _explain(url: str, texts: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "qscope_plugin.cli", "explain", "--layers", "3", "--data", str(texts), "--llm",
            url, "--out", str(out), "--json", *SMALL, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_explain_through_the_server_then_rerun_from_the_cache(served_model, texts, tmp_path):
    server = Server(served_model, tmp_path / "server.log")
    try:
        out = tmp_path / "demo.explanations.jsonl"
        first = _explain(server.url, texts, out, "--top", "2", "--concurrency", "3")
        assert first.returncode == 0, first.stderr[-3000:]
        report = json.loads(first.stdout[first.stdout.index("{"):])
        assert report["calls"] > 2 and report["cache_hits"] == 0
        assert "LLM calls" in first.stdout and "probe" in first.stdout  # the estimate, before starting
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["layer"] for r in rows] == [3, 3] and all(r["explainer"] == str(served_model) for r in rows)
        assert all(r["detection"]["n_positive"] + r["detection"]["n_negative"] == 12 for r in rows)
        again = _explain(server.url, texts, out, "--top", "2", "--concurrency", "3")
        assert again.returncode == 0, again.stderr[-3000:]
        rerun = json.loads(again.stdout[again.stdout.index("{"):])
        assert rerun["calls"] == 0 and rerun["cache_hits"] == report["calls"]
        assert rerun["rows"] == report["rows"]
        verify = subprocess.run([sys.executable, "-m", "qscope_plugin.cli", "verify", str(out)], capture_output=True,
                                text=True, timeout=120)
        assert verify.returncode == 0 and "2 explanation(s)" in verify.stdout, verify.stderr
    finally:
        server.kill()


def test_a_run_whose_server_dies_resumes_from_the_cache(served_model, texts, tmp_path):
    out, cache = tmp_path / "e.jsonl", tmp_path / "e.jsonl.cache"
    server = Server(served_model, tmp_path / "server.log")
    try:
        run = subprocess.Popen([sys.executable, "-m", "qscope_plugin.cli", "explain", "--layers", "3", "--data",
                                str(texts), "--llm", server.url, "--out", str(out), "--json", "--top", "4",
                                "--retries", "0", "--timeout", "20", "--concurrency", "1", *SMALL],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and run.poll() is None:
            if cache.exists() and len(cache.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        server.kill()  # mid-run: answers so far are cached
        _, err = run.communicate(timeout=300)
        assert run.returncode == 1 and "rerun to resume from the cache" in err, err[-3000:]
        cached = len(cache.read_text().splitlines())
        assert cached >= 3 and not out.exists()
    finally:
        server.kill()
    server = Server(served_model, tmp_path / "server2.log")  # a new server, another port, the same model
    try:
        resumed = _explain(server.url, texts, out, "--top", "4")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        report = json.loads(resumed.stdout[resumed.stdout.index("{"):])
        assert report["cache_hits"] == cached and report["calls"] > 0
        assert len(out.read_text().splitlines()) == 4
    finally:
        server.kill()
