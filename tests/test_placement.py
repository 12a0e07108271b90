"""SAEs encode beside their layer's activations: the rule on CPU, the meta device (a second device with real
shapes and dtypes, no memory) and, where there is one, CUDA."""

from __future__ import annotations

import gc

import pytest
import torch
from qscope_testing import qwen3_tokenizer, tiny_qwen3, tiny_saes

from qscope_plugin import placement
from qscope_plugin.placement import pin, placed, release, resident
from qscope_plugin.recipes import _harvest
from qscope_plugin.recipes._harvest import harvest

TEXTS = ["The cat sat on the mat.", "我妹妹昨天买了一只小白猫。", "Rain again today", "一二三四五六七八九十"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny():
    model = tiny_qwen3(n_layers=3)
    return model, qwen3_tokenizer(), tiny_saes(model, d_sae=128, k=8)


def test_cpu_activations_use_the_sae_itself_whatever_the_model_dtype(tiny):
    """The zero-copy path: a float32 file encodes bf16 CPU activations with no copy of its weights."""
    _, _, saes = tiny
    for dtype in (torch.float32, torch.bfloat16):
        assert placed(saes[0], torch.zeros(2, 64, dtype=dtype)) is saes[0]
    assert resident(saes[0]) == []


def test_other_devices_get_one_kept_copy_in_the_models_dtype(tiny):
    _, _, saes = tiny
    sae = pin(saes[1], None)  # None: unchanged
    assert sae is saes[1]
    hidden = torch.zeros(3, 64, device="meta", dtype=torch.bfloat16)
    copy = placed(sae, hidden)
    assert (copy.device, copy.dtype) == (torch.device("meta"), torch.bfloat16)
    assert placed(sae, hidden) is copy and resident(sae) == [copy]  # made once, reused
    assert copy.W_enc.shape == sae.W_enc.shape and copy.W_dec.T.is_contiguous()  # feature-major decoder
    fp16 = placed(sae, hidden.half())
    assert fp16.dtype == torch.float16 and len(resident(sae)) == 2
    release([sae])
    assert resident(sae) == [] and placed(sae, hidden) is not copy
    release([sae])


def test_a_pinned_sae_encodes_on_its_device_and_shares_the_source_tensors(tiny):
    _, _, saes = tiny
    pinned = pin(saes, "meta")
    assert pinned[0].W_enc is saes[0].W_enc and placement.home(pinned[0]) == torch.device("meta")
    assert placed(pinned[0], torch.zeros(2, 64)).device.type == "meta"  # CPU activations, SAE sent to meta
    assert placed(saes[0], torch.zeros(2, 64), "meta").device.type == "meta"  # the same, per call
    assert placed(pin(saes[0], "cpu"), torch.zeros(2, 64, device="meta")) is not None
    release([pinned[0], saes[0]])


def test_copies_die_with_their_sae():
    model = tiny_qwen3(n_layers=1)
    sae = tiny_saes(model, d_sae=32, k=4)[0]
    placed(sae, torch.zeros(1, 64, device="meta"))
    assert len(placement._COPIES) >= 1
    before = len(placement._COPIES)
    del sae
    gc.collect()
    assert len(placement._COPIES) == before - 1


def test_every_hook_encodes_with_the_placed_sae(tiny, monkeypatch):
    """A bf16 model on CPU: each hook's SAE is the file itself (zero copy), the activations never change device."""
    model, tok, saes = tiny
    model = tiny_qwen3(n_layers=3).to(torch.bfloat16)
    used = []

    def spy(sae, hidden, device=None):
        chosen = placed(sae, hidden, device)
        used.append((sae, chosen, hidden.device, hidden.dtype))
        return chosen

    monkeypatch.setattr(_harvest, "placed", spy)
    harvest(model, tok, TEXTS, saes, pooling="max", batch_size=2)
    assert len(used) == 2 * 3  # two batches, three layers
    for sae, chosen, device, dtype in used:
        assert chosen is sae and device.type == "cpu" and dtype == torch.bfloat16


@pytest.mark.parametrize("pooling", ["tokens", "max", "last"])
def test_layer_passes_give_the_one_pass_result(tiny, pooling):
    model, tok, saes = tiny
    one = harvest(model, tok, TEXTS, saes, pooling=pooling, batch_size=3)
    passes = harvest(model, tok, TEXTS, saes, pooling=pooling, batch_size=3, layers_per_pass=2)
    if pooling == "max":
        assert all((one[n] != passes[n]).nnz == 0 for n in saes)
    elif pooling == "last":
        assert all(all((a == b).all() for a, b in zip(one[n], passes[n], strict=True)) for n in saes)
    else:
        for a, b in zip(one, passes, strict=True):
            assert all(torch.equal(a.values[n], b.values[n]) and torch.equal(a.indices[n], b.indices[n])
                       for n in saes)


def test_a_bad_layers_per_pass_is_refused(tiny):
    model, tok, saes = tiny
    with pytest.raises(_harvest.HarvestError, match="layers_per_pass"):
        harvest(model, tok, TEXTS, saes, layers_per_pass=0)


@cuda
@pytest.mark.gpu
def test_on_cuda_the_sae_copy_sits_beside_the_layer_in_bf16(tiny):
    model, tok, saes = tiny
    on_gpu = tiny_qwen3(n_layers=3).to("cuda", torch.bfloat16)
    codes = harvest(on_gpu, tok, TEXTS, saes, pooling="max")
    for n, sae in saes.items():
        (copy,) = resident(sae)
        assert copy.device.type == "cuda" and copy.dtype == torch.bfloat16
        assert codes[n].shape == (len(TEXTS), sae.cfg.d_sae)
    release(saes.values())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_split_over_two_gpus_encodes_each_layer_on_its_own_gpu(tiny):
    model, tok, saes = tiny
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.norm": 1, "lm_head": 1}
    split = dispatch_model(tiny_qwen3(n_layers=3).to(torch.bfloat16), device_map)  # what device_map="auto" does
    harvest(split, tok, TEXTS[:1], {0: saes[0], 2: saes[2]}, pooling="max")
    assert [c.device for c in resident(saes[0])] == [torch.device("cuda:0")]
    assert [c.device for c in resident(saes[2])] == [torch.device("cuda:1")]
    release(saes.values())


def test_every_model_command_takes_sae_device(capsys):
    """``--sae-device`` comes with the model options of every command; an unknown device is a usage error."""
    from qscope_plugin.cli import build_parser, main

    commands = build_parser()._subparsers._group_actions[0].choices
    with_model = [name for name, p in commands.items() if any("--model" in a.option_strings for a in p._actions)]
    without = [name for name in with_model if name != "plan" and not any(
        "--sae-device" in a.option_strings for a in commands[name]._actions)]
    assert with_model and not without, without
    assert main(["analyze", "我今天很开心 but tired", "--layers", "3", "--sae-device", "cpu", "--json"]) == 0
    assert main(["analyze", "text", "--layers", "3", "--sae-device", "nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
