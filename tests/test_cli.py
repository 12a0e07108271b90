from __future__ import annotations

import pytest

from qscope_plugin.cli import main, parse_layers
from qscope_plugin.errors import QScopeError

REPO = "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"
RELEASE = "qwen-scope-3-1.7b-base-w32k-l50"


def test_releases(capsys):
    assert main(["releases"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 15 and "qwen-scope-3.5-27b-w80k-l50" in out[-4] and "(instruct)" in out[-4]


def test_info_lists_cached_layers(hub_cache, capsys):
    for n in (3, 4, 5, 9):
        hub_cache.add_sae(REPO, n, d_model=8, d_sae=64)
    assert main(["info", RELEASE]) == 0
    out = capsys.readouterr().out
    assert "cached layers    3-5,9" in out and "537,010,176" in out and "license" in out


def test_fetch_validates(hub_cache, capsys):
    hub_cache.add_sae(REPO, 10, d_model=8, d_sae=64)
    hub_cache.add_sae(REPO, 11, d_model=8, d_sae=64)
    assert main(["fetch", RELEASE, "--layers", "10-11"]) == 0
    assert "2 layer(s)" in capsys.readouterr().out


def test_fetch_removes_a_corrupt_file(hub_cache, capsys):
    import torch
    from qscope_testing import make_sae_tensors

    tensors = make_sae_tensors(d_model=8, d_sae=64)
    tensors["W_dec"][0, 0] = float("inf")
    staging = hub_cache.root / "s.pt"
    torch.save(tensors, staging)
    path = hub_cache.add_file(REPO, "layer12.sae.pt", staging.read_bytes())
    assert main(["fetch", RELEASE, "--layers", "12"]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not path.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "qwen-scope-nope"], "unknown Qwen-Scope release"),
        (["fetch", RELEASE, "--layers", "30"], r"layer 30 is out of range for release .*28 layers: 0\.\.27"),
        (["fetch", RELEASE, "--layers", "a-b"], "--layers 'a-b' cannot be read"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(hub_cache, capsys, argv, message):
    import re

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err) and "Traceback" not in err


def test_fetch_with_an_empty_offline_cache_is_a_runtime_failure_exit_1(hub_cache, capsys):
    """NotCachedError (an OSError): the arguments were fine, the environment was not."""
    assert main(["fetch", RELEASE, "--layers", "3"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.err
    assert err.startswith("qscope fetch: error: layer3.sae.pt of ") and "not in the local cache" in err


@pytest.mark.parametrize(
    ("error", "status", "hint"),
    [
        (RuntimeError("CUDA out of\nmemory"), 1, "(RuntimeError; rerun with --debug for the traceback)"),
        (PermissionError(13, "Permission denied"), 1, ""),
        (ValueError("a library's own check"), 1, "(ValueError; rerun with --debug"),
    ],
)
def test_other_failures_are_one_line_and_exit_1(monkeypatch, capsys, error, status, hint):
    import qscope_plugin.cli.hub as hub

    def fail(args):
        raise error

    monkeypatch.setattr(hub, "cmd_releases", fail)
    assert main(["releases"]) == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("qscope releases: error: ") and hint in err
    with pytest.raises(type(error)):
        main(["--debug", "releases"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frobnicate"], r"^qscope: error: argument command: invalid choice: 'frobnicate' .*`qscope --help`"),
        ([], r"^qscope: error: the following arguments are required: command"),
        (["fetch"], r"^qscope fetch: error: the following arguments are required: release "
                    r"\(see `qscope fetch --help`\)$"),
        (["fetch", RELEASE, "--layers"], r"^qscope fetch: error: argument --layers: expected one argument"),
        (["info", RELEASE, "--bogus"], r"^qscope: error: unrecognized arguments: --bogus"),
        (["classify"], r"^qscope classify: error: the following arguments are required: verb"),
    ],
)
def test_argparse_errors_are_one_line_and_exit_2(capsys, argv, message):
    import re

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and len(err.splitlines()) == 1 and re.search(message, err), err


def test_hub_error_is_one_line_and_exit_1(hub_cache, monkeypatch, capsys):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RevisionNotFoundError

    def missing_revision(repo_id, filename, **kwargs):
        request = httpx2.Request("GET", f"https://huggingface.co/{repo_id}/resolve/v9/{filename}")
        raise RevisionNotFoundError("Invalid rev id: v9\nrequest id: 1", response=httpx2.Response(404, request=request))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing_revision)
    assert main(["fetch", RELEASE, "--layers", "3", "--revision", "v9"]) == 1  # HubError: an OSError, at run time
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qscope fetch: error: revision 'v9' does not exist")


def test_parse_layers():
    assert parse_layers("3,5,7-9", 28) == [3, 5, 7, 8, 9]
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers(" 2 - 4 ,9", 28) == [2, 3, 4, 9]
    for bad, message in (("5-3", "reversed range"), ("3-", "--layers '3-' cannot be read"),
                         ("-3", "--layers '-3' cannot be read"), ("1,,2", "--layers '1,,2' cannot be read"),
                         ("1" * 19, "more than 18 digits"),
                         ("28", r"layer 28 is out of range for this release \(28 layers: 0..27\)")):
        with pytest.raises(QScopeError, match=message):
            parse_layers(bad, 28)


def test_cli_modules_hold_no_model_code():
    """Each command parses arguments and calls recipes: no cli module imports torch or runs the model itself."""
    import ast
    from pathlib import Path

    import qscope_plugin.cli as cli

    modules = sorted(Path(cli.__file__).parent.glob("*.py"))
    assert {m.stem for m in modules} >= {"__init__", "_options", "hub", "demo", "discovery", "steering", "classify",
                                         "benchmarks", "safety"}
    for module in modules:
        tree = ast.parse(module.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in ("torch", "numpy") for a in node.names), module.name
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in ("torch", "numpy"), module.name
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                assert name not in ("generate", "model", "forward", "encode", "decode", "no_grad"), \
                    f"{module.name}:{node.lineno} calls {name}()"
        commands = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("cmd_")]
        for command in commands:  # every command reaches a recipe or the core through a qscope_plugin import
            imports = [n.module for n in ast.walk(command) if isinstance(n, ast.ImportFrom)]
            assert any(m and m.startswith("qscope_plugin.") for m in imports) or module.stem == "hub", command.name


def _corrupt(path) -> None:
    from test_store import _flip_float_byte

    _flip_float_byte(path)


def test_verify_command_names_the_corrupted_layer_and_the_repair(hub_cache, capsys):
    for n in (0, 1, 2):
        hub_cache.add_sae(REPO, n, d_model=8, d_sae=64, seed=n)
    snapshot = hub_cache.snapshot(REPO)
    assert main(["verify", RELEASE, "--layers", "0-3"]) == 0
    assert [line.split()[:3] for line in capsys.readouterr().out.splitlines()] == [
        ["layer", "0", "OK"], ["layer", "1", "OK"], ["layer", "2", "OK"], ["layer", "3", "not"]]
    _corrupt((snapshot / "layer1.sae.pt").resolve())
    assert main(["verify", RELEASE, "--layers", "0-2"]) == 1
    captured = capsys.readouterr()
    assert [line.split()[2] for line in captured.out.splitlines()] == ["OK", "CORRUPTED", "OK"]
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qscope verify: error: 1 of 3 layer(s)")
    assert f"`qscope fetch {RELEASE} --layers 1 --force-download`" in err


def test_checksum_then_verify_a_folder(tmp_path, capsys):
    import json

    from qscope_testing import write_sae_file

    for n in (0, 1):
        write_sae_file(tmp_path / f"layer{n}.sae.pt", d_model=8, d_sae=32, seed=n)
    assert main(["verify", str(tmp_path)]) == 1  # no SHA256SUMS yet: says how to write one
    assert "`qscope checksum" in capsys.readouterr().err
    assert main(["checksum", str(tmp_path)]) == 0 and (tmp_path / "SHA256SUMS").is_file()
    capsys.readouterr()
    _corrupt(tmp_path / "layer0.sae.pt")
    assert main(["verify", str(tmp_path), "--json"]) == 1
    captured = capsys.readouterr()
    assert [c["status"] for c in json.loads(captured.out)] == ["corrupted", "ok"]
    assert "restore them from their source" in captured.err
    assert main(["checksum", str(tmp_path / "layer0.sae.pt")]) == 2


def test_fetch_of_a_corrupted_download_leaves_nothing_behind(hub_cache, monkeypatch, capsys):
    """The transfer delivers bytes that do not match the SHA-256 the blob is named by (as huggingface_hub names
    LFS blobs by the server's hash): fetch must not report success, and must not keep the blob."""
    import huggingface_hub
    from qscope_testing import write_sae_file

    staging = hub_cache.root / "s.pt"
    write_sae_file(staging, d_model=8, d_sae=64)
    good = staging.read_bytes()
    repo = hub_cache.repo(REPO)
    calls = []

    def corrupted_download(repo_id, filename, **kwargs):
        calls.append(kwargs)
        blob = hub_cache.add_blob(repo_id, good)
        blob.write_bytes(good[:-100] + bytes(100))  # the last block overwritten in transit
        return str(hub_cache.link(repo_id, filename, blob))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", corrupted_download)
    assert main(["fetch", RELEASE, "--layers", "4", "--force-download"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layer 4 (layer4.sae.pt) is corrupted" in err and "removed" in err
    assert calls[0]["force_download"] is True
    assert not list(repo.rglob("*.sae.pt")) and not list((repo / "blobs").iterdir())


def test_a_device_torch_cannot_use_is_one_usage_error(capsys):
    assert main(["analyze", "hi", "--device", "nan"]) == 2  # refused before the model loads
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qscope analyze: error: device 'nan' cannot be used here")


@pytest.mark.parametrize("argv", [
    ["analyze", "hi", "--layers", "9"],
    ["compare", "--positive", "a", "--negative", "b", "--layers", "2-9"],
    ["steer", "hi", "--layer", "9", "--feature", "0", "--alpha", "1"],
    ["repetition", "features", "a a a", "--out", "{tmp}/f.json", "--layers", "9"],
    ["sasft", "features", "--texts", "{tmp}/texts.json", "--target", "zh", "--out", "{tmp}/f.json", "--layers", "9"],
    ["footprints", "{tmp}/data.jsonl", "--column", "q", "--layers", "9", "--out", "{tmp}/fp.safetensors"],
])
def test_a_bad_layer_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, argv):
    """The backbone is the slow part (minutes at real size): a typo in --layers must not wait for it."""
    import json

    import qscope_plugin.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --layers was checked")

    monkeypatch.setattr(qscope_plugin.models, "load_model", no_model)
    (tmp_path / "texts.json").write_text(json.dumps({"zh": ["你好"], "en": ["hello"]}))
    (tmp_path / "data.jsonl").write_text('{"q": "hello"}\n')
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layer 9" in err, err


def test_the_parser_and_the_catalogue_do_not_import_torch():
    """`qscope --help` and `qscope releases` answer at once: torch (seconds) loads only with a model or an SAE."""
    import subprocess
    import sys

    code = ("import sys; from qscope_plugin.cli import main; main(['releases']); "
            "import qscope_plugin as qs; qs.release('qwen-scope-3-1.7b-base-w32k-l50'); "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert qs.load_sae.__module__ == 'qscope_plugin.store' and 'torch' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("argv", [
    ["steer", "hi", "--layer", "3", "--feature", "1", "--alpha", "1", "--max-new-tokens", "99999999999"],
    ["steer", "hi", "--layer", "3", "--feature", "1", "--alpha", "nan"],
    ["steer", "hi", "--layer", "3", "--feature", "1", "--alpha", "1", "--positions", "0-" + "9" * 40],
    ["steer", "hi", "--layer", "99999999999999999999", "--feature", "1", "--alpha", "1"],
    ["analyze", "hi", "--top", "1e308"],
    ["analyze", "hi", "--layers", "0-999999999"],
    ["compare", "--positive", "a", "--negative", "b", "--top-k", "-1"],
    ["evaluate", "--data", "x.jsonl", "--batch-size", "999999999999"],
    ["evaluate", "--data", "x.jsonl", "--limit", "0"],
    ["dashboard", "--layer", "3", "--features", "0-99999999999", "--data", "x.jsonl", "--out", "d.html"],
])
def test_huge_numbers_and_ranges_are_refused_before_the_model_loads(argv, monkeypatch, capsys):
    """Exit 2 and one line, from the option's text alone: no model is loaded, nothing is materialised."""
    from qscope_plugin import models

    def no_load(*args, **kwargs):
        raise AssertionError(f"the model loaded for {argv}")

    monkeypatch.setattr(models, "load_model", no_load)
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize(("prompt", "argv", "message"), [
    ("今天早上", ["--positions", "0-999999999"],
     r"position 999999999 is out of range for the model's context \(512 positions: 0..511\)"),
    ("hi " * 400, ["--max-new-tokens", "32"],
     r"the prompt is 801 tokens and 32 new ones are asked for, 833 in all, past the model's context of 512"),
])
def test_steer_past_the_models_context_is_refused(prompt, argv, message, capsys):
    """A huge position range is checked from its ends against the demo's 512 positions; a prompt plus new tokens
    past the context is refused, not cut (a cut prompt would steer another text)."""
    import re

    assert main(["steer", prompt, "--layer", "3", "--feature", "28", "--alpha", "5", *argv]) == 2
    err = capsys.readouterr().err.strip()  # transformers' weight-loading bar may come first
    assert err.count(": error: ") == 1 and re.search(message, err.splitlines()[-1]), err
