"""adapters.trl configs: precision chosen per device, so the README's ``sft_config(...)`` / ``dapo_config(...)``
validate on a machine without bf16, where TRL's own defaults raise."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import transformers.training_args
from trl import GRPOConfig, SFTConfig

import qscope_plugin.adapters.trl as trl_adapter
from qscope_plugin.adapters.trl import autocast, dapo_config, sft_config


@pytest.fixture
def bf16_capable(monkeypatch: pytest.MonkeyPatch):
    """Force the capability check TrainingArguments makes (and the one the adapter reads) to a given answer."""

    def force(available: bool) -> None:
        monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: available)
        monkeypatch.setattr(trl_adapter, "is_torch_bf16_gpu_available", lambda: available)

    return force


@pytest.mark.parametrize(("ours", "theirs"), [(sft_config, SFTConfig), (dapo_config, GRPOConfig)])
def test_without_bf16_trl_raises_and_ours_trains_in_fp32(tmp_path, bf16_capable, ours, theirs):
    bf16_capable(False)
    with pytest.raises(ValueError, match="doesn't support bf16/gpu"):
        theirs(output_dir=str(tmp_path))  # TRL 1.16's default bf16=True, on a machine without bf16
    config = ours(str(tmp_path))
    assert (config.bf16, config.fp16, autocast(config)) == (False, False, None)


@pytest.mark.parametrize("make", [sft_config, dapo_config])
def test_bf16_on_an_accelerator_that_has_it_fp32_on_cpu(tmp_path, bf16_capable, make):
    bf16_capable(True)
    assert autocast(make(str(tmp_path))) == "bf16"
    assert autocast(make(str(tmp_path), use_cpu=True)) is None  # CPU: fp32 unless asked
    assert autocast(make(str(tmp_path), use_cpu=True, bf16=True)) == "bf16"  # asked
    assert autocast(make(str(tmp_path), fp16=True)) == "fp16"
