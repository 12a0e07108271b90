"""Offline or without a GPU, loading a real model or moving an SAE to CUDA fails with the project's one-line error.

transformers raises a raw ``OSError`` for a hub id that is neither cached nor downloadable, and torch a
``RuntimeError`` (or ``AssertionError``) for a CUDA device on a machine without one.
"""

from __future__ import annotations

import pytest
import torch

from qscope_plugin import load_sae
from qscope_plugin.models import DeviceError, ModelLoadError

NOT_CACHED = "Qwen/Qwen3-1.7B-Base"


@pytest.fixture
def empty_offline_hub(tmp_path, monkeypatch):
    """An empty hub cache, offline: no real model can be found, whatever this machine has cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("transformers.utils.hub.is_offline_mode", lambda: True, raising=False)


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message
    return message


def test_boot_of_an_uncached_model_offline_is_one_line(empty_offline_hub):
    from qscope_plugin.adapters.transformer_lens import boot

    with pytest.raises(ModelLoadError) as caught:
        boot(NOT_CACHED)
    assert NOT_CACHED in _one_line(caught.value) and "local cache" in str(caught.value)


def test_nnsight_load_of_an_uncached_model_offline_is_one_line(empty_offline_hub):
    from qscope_plugin.adapters.nnsight import load

    with pytest.raises(ModelLoadError) as caught:
        load(NOT_CACHED)
    assert NOT_CACHED in _one_line(caught.value) and "local cache" in str(caught.value)


def test_a_device_this_machine_lacks_is_one_line():
    sae = load_sae("qscope-demo-qwen3-4l", 0)
    missing = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in missing:
        for dtype in (None, torch.bfloat16):
            with pytest.raises(DeviceError, match=f"device '{device}' cannot be used here") as caught:
                sae.to(device, dtype)
            _one_line(caught.value)
    from qscope_plugin.adapters.transformer_lens import boot

    with pytest.raises(DeviceError, match="cannot be used here"):
        boot("never-loaded", device="cuda:99")
