"""TransformerBridge parity with transformers for all four Qwen families (and the published multimodal layout)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from qscope_testing import FAMILIES, make_sae_tensors, qwen3_tokenizer, tiny_model

from qscope_plugin.adapters.transformer_lens import BootError, attach_sae, boot, load_hooked, steer
from qscope_plugin.hooks import add_to_residual, capture_residual, edit_residual
from qscope_plugin.sae import QScopeSAEConfig, QwenScopeSAE

CASES = [(f, False) for f in FAMILIES] + [("qwen3_5", True), ("qwen3_5_moe", True)]
N_NEW = 20


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}{'-multimodal' if m else ''}" for f, m in CASES])
def booted(request, tok, tmp_path_factory):
    """(bridge, untouched HF reference): the bridge wraps the modules of the model it is given."""
    family, multimodal = request.param
    model = tiny_model(family, multimodal=multimodal)
    if multimodal:  # the published layout on disk, booted by path as its text tower
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        from transformers import AutoModelForCausalLM

        return boot(str(path)), AutoModelForCausalLM.from_pretrained(path).eval()
    return boot(copy.deepcopy(model), tokenizer=tok), model


def prompt_ids(tok):
    return tok("The quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]


def test_logits_and_every_resid_post_equal_transformers(booted, tok):
    bridge, hf = booted
    ids = prompt_ids(tok)
    n_layers = hf.config.get_text_config().num_hidden_layers
    with capture_residual(hf, range(n_layers)) as blocks:
        out = hf(ids, output_hidden_states=True)
    logits, cache = bridge.run_with_cache(ids)
    assert (logits - out.logits).abs().max() <= 1e-5
    for n in range(n_layers):
        assert (cache[f"blocks.{n}.hook_resid_post"] - blocks[n]).abs().max() <= 1e-5
    # the last-layer trap: hidden_states[-1] is post-norm, not block L-1's output
    assert (out.hidden_states[-1] - blocks[n_layers - 1]).abs().max() > 1e-2


def greedy_hf(hf, ids):
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                      pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def greedy_bridge(bridge, ids):
    out = bridge.generate(ids, max_new_tokens=N_NEW, do_sample=False, use_past_kv_cache=True,
                          return_type="tokens", verbose=False, stop_at_eos=False)
    return out[0, ids.shape[1]:].tolist()


def test_cached_greedy_generation_is_token_identical(booted, tok):
    bridge, hf = booted
    ids = prompt_ids(tok)
    expected = greedy_hf(hf, ids)
    assert len(set(expected)) > 1  # not one repeated token, so the comparison means something
    assert greedy_bridge(bridge, ids) == expected


def test_steered_generation_is_token_identical(booted, tok):
    bridge, hf = booted
    ids = prompt_ids(tok)
    vector = 4.0 * torch.randn(64, generator=torch.Generator().manual_seed(1))
    with add_to_residual(hf, 1, vector):
        expected = greedy_hf(hf, ids)
    assert expected != greedy_hf(hf, ids)
    with steer(bridge, 1, vector):
        assert greedy_bridge(bridge, ids) == expected


def tiny_sae(layer: int) -> QwenScopeSAE:
    return QwenScopeSAE(make_sae_tensors(64, 256, seed=layer), QScopeSAEConfig(64, 256, 16, layer))


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5"])
def test_run_with_saes_equals_the_spliced_reconstruction(family, tok):
    hf = tiny_model(family)
    bridge = boot(copy.deepcopy(hf), saes=True, tokenizer=tok)
    sae = tiny_sae(2)
    ids = prompt_ids(tok)
    with edit_residual(hf, {2: lambda h, n: sae.reconstruct(h)}):
        expected = hf(ids).logits
    view = sae.to_sae_lens()
    view.cfg.metadata.hook_name = "blocks.2.hook_out"
    assert (bridge.run_with_saes(ids, saes=[view]) - expected).abs().max() <= 1e-4
    attach_sae(bridge, sae, use_error_term=True)  # error term: the model's output is unchanged
    assert (bridge(ids) - hf(ids).logits).abs().max() <= 1e-5
    calls = []
    bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: calls.append(a.shape))])
    assert calls  # the alias reaches its hook on the SAE bridge (upstream drops it silently)


def test_a_plain_bridge_boots_without_importing_sae_lens():
    """SAELens' import (seconds, ~1 GiB) was most of the bridge's boot overhead at real size; only an SAE bridge
    needs it. A fresh process, since other tests import SAELens."""
    import subprocess
    import sys

    code = ("import sys; from qscope_testing import qwen3_tokenizer, tiny_model; "
            "from qscope_plugin.adapters.transformer_lens import boot; "
            "bridge = boot(tiny_model('qwen3'), tokenizer=qwen3_tokenizer()); "
            "print('sae_lens' in sys.modules, type(bridge).__name__)")
    tests = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tests, check=True)
    assert out.stdout.split()[-2:] == ["False", "TransformerBridge"]


def test_tokenizer_is_not_mutated(tok):
    """The bridge changes special tokens and padding on its copy; the copy shares only the read-only tables
    (a deepcopy took ~7 s at Qwen's vocabulary size)."""
    def state():
        return (tok.bos_token, tok.pad_token, tok.eos_token, tok.padding_side, dict(tok.special_tokens_map),
                tok._tokenizer.to_str(), tok(["one two", "three"], padding=True)["input_ids"])

    before = state()
    bridge = boot(tiny_model("qwen3"), tokenizer=tok)
    bridge.tokenizer.padding_side, bridge.tokenizer.bos_token = "left", "<|im_start|>"
    assert bridge.tokenizer is not tok and state() == before


def test_non_qwen_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(BootError, match="not a Qwen3 / Qwen3.5 model"):
        boot(llama, tokenizer=object())


def test_classic_hooked_transformer_for_dense_qwen3(tok, tmp_path):
    hf = tiny_model("qwen3")
    hf.save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")
    hooked = load_hooked(str(tmp_path / "qwen3"), hf_model=copy.deepcopy(hf), tokenizer=tok)
    ids = prompt_ids(tok)
    with capture_residual(hf, 2) as blocks:
        ref = hf(ids).logits
    logits, cache = hooked.run_with_cache(ids)
    assert (logits - ref).abs().max() <= 1e-4
    assert (cache["blocks.2.hook_resid_post"] - blocks[2]).abs().max() <= 1e-4
    moe = tiny_model("qwen3_moe")
    with pytest.raises(BootError, match="use.*boot|Use.*boot"):
        load_hooked("tiny-moe", hf_model=moe, tokenizer=tok)


def test_dtype_is_applied_to_a_loaded_model_and_the_bridge_runs(tok):
    hf = tiny_model("qwen3", n_layers=2)
    ref = copy.deepcopy(hf)
    ref.set_attn_implementation("eager")  # as the bridge forces; sdpa rounds differently in bf16
    for p in ref.parameters():  # what boot should do: parameters cast, float32 buffers (rotary) kept
        p.data = p.data.to(torch.bfloat16)
    bridge = boot(hf, dtype=torch.bfloat16, tokenizer=tok)
    assert {p.dtype for p in bridge.original_model.parameters()} == {torch.bfloat16}
    assert bridge.cfg.dtype == torch.bfloat16
    ids = prompt_ids(tok)
    logits = bridge(ids)
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, ref(ids).logits)


def test_cfg_device_is_where_the_parameters_are(tok, monkeypatch):
    import transformer_lens.model_bridge.sources.transformers as tl_source

    # on a GPU machine TransformerLens defaults cfg.device to CUDA while a model it is handed stays on CPU
    monkeypatch.setattr(tl_source, "get_device", lambda: torch.device("cuda"))
    bridge = boot(tiny_model("qwen3", n_layers=2), tokenizer=tok)
    devices = {str(p.device) for p in bridge.original_model.parameters()}
    assert devices == {"cpu"} and bridge.cfg.device == "cpu"
    assert bridge(prompt_ids(tok)).device.type == "cpu"


def test_loaded_multimodal_model_boots_its_text_tower(tok):
    mm = tiny_model("qwen3_5", multimodal=True)
    ref = copy.deepcopy(mm)
    config_before = mm.config.to_dict()
    bridge = boot(mm, tokenizer=tok)  # the multimodal adapter would need torchvision
    assert "Multimodal" not in type(bridge.adapter).__name__
    assert mm.config.to_dict() == config_before  # architectures not overwritten on the caller's config
    assert hasattr(mm.model, "visual") and mm.model.language_model is bridge.original_model.model
    ids = prompt_ids(tok)
    n_layers = mm.config.text_config.num_hidden_layers
    with capture_residual(ref, n_layers - 1) as blocks:
        expected = ref(ids).logits
    logits, cache = bridge.run_with_cache(ids)
    assert (logits - expected).abs().max() <= 1e-5
    assert (cache[f"blocks.{n_layers - 1}.hook_resid_post"] - blocks[n_layers - 1]).abs().max() <= 1e-5
