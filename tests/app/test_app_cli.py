"""`qscope app`'s argument errors: one line, exit 2, before any model loads; a port in use is a runtime failure."""

from __future__ import annotations

import json
import socket

import pytest

from qscope_plugin.app import explorer as explorer_module
from qscope_plugin.cli import main


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if a command gets as far as loading a model."""
    import qscope_plugin.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(qscope_plugin.models, "load_model", refuse)


@pytest.mark.parametrize(("argv", "message"), [
    (["--port", "0"], "'0' is not a port; pass a number in 1..65535"),
    (["--port", "http"], "'http' is not a port"),
    (["--device", "cpu", "--json"], "unrecognized arguments: --json"),
])
def test_bad_arguments_exit_2(no_model, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["app", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_gradio_names_the_extra(no_model, monkeypatch, capsys):
    from qscope_plugin.cli import app

    monkeypatch.setattr(app, "find_spec", lambda name: None if name == "gradio" else object())
    assert main(["app"]) == 2
    assert capsys.readouterr().err.strip() == ("qscope app: error: the web app needs Gradio; install the extra: "
                                               "pip install 'qscope-plugin[app]'")


def test_a_bad_release_is_refused_before_the_model_loads(no_model, tmp_path, capsys):
    assert main(["app", "--release", "no-such-release"]) == 2
    assert "qscope app: error: " in capsys.readouterr().err
    assert main(["app", "--release", str(tmp_path)]) == 2
    assert "holds no layer{n}.sae.pt file" in capsys.readouterr().err


def test_unusable_data_exits_2(no_model, tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    assert main(["app", "--data", str(path)]) == 2
    assert "has no column 'text'; pass one of ['body']" in capsys.readouterr().err
    assert main(["app", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "qscope app: error: cannot load dataset" in capsys.readouterr().err


def test_a_port_in_use_is_one_runtime_error(monkeypatch, capsys):
    from qscope_testing import qwen3_tokenizer, tiny_qwen3

    from qscope_plugin.store import DEMO_RELEASE

    tiny = explorer_module.Explorer(tiny_qwen3(n_layers=4), qwen3_tokenizer(), DEMO_RELEASE, ["a text"])
    monkeypatch.setattr(explorer_module.Explorer, "load", lambda *a, **k: tiny)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"qscope app: error: cannot serve on 127.0.0.1:{port}" in err and "pass a free --port" in err
