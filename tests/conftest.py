"""Shared fixtures. Tests never reach the network: the hub is a local cache read through hf_hub_download.

``make test`` runs everything, spread over the CPUs (pytest-xdist); ``make test-fast`` (``pytest -m "not slow"``)
only the modules in ``FAST_MODULES``: pure math, parsing, files and errors, a loop of well under a minute. Every
other module is marked ``slow`` here, so a new module is in the full run and out of the fast loop until it is
listed. Session fixtures (``demo_model``, ``qwen3_tok``) load what many modules read once per test process; tests must
not change them (steer inside ``with`` blocks, copy before editing weights).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported

import pytest
from qscope_testing import FakeHubCache

FAST_MODULES = {
    "test_catalogue.py", "test_docs.py", "test_first_run.py", "test_sae.py", "test_security.py", "test_store.py",
    "recipes/test_data.py", "recipes/test_redundancy.py", "test_tokens.py",
}
"""Modules (relative to tests/) in the fast loop: no model forward beyond the embedded demo's tokenizer, no
subprocess of the CLI, no browser."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        if item.path.relative_to(root).as_posix() not in FAST_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHubCache:
    """An empty offline hub cache that ``hf_hub_download`` (and so the plugin) reads from."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    from qscope_plugin.store import DEFAULT_CACHE

    DEFAULT_CACHE.clear()
    yield FakeHubCache(root)
    DEFAULT_CACHE.clear()


@pytest.fixture(scope="session")
def demo_model():
    """``(model, tokenizer)``: the embedded demo model, loaded once per test process."""
    from qscope_plugin.models import default_model, load_model

    return load_model(default_model())


@pytest.fixture(scope="session")
def qwen3_tok():
    """Qwen3's real tokenizer (``qscope_testing.qwen3_tokenizer``), loaded once per test process."""
    from qscope_testing import qwen3_tokenizer

    return qwen3_tokenizer()
