"""Shared fixtures. Tests never reach the network: the hub is a local cache read through hf_hub_download."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported

import pytest
from qscope_testing import FakeHubCache


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
