"""nnsight LanguageModel parity with transformers for all four families, steering, SAE reading, remote preflight."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from qscope_testing import FAMILIES, make_sae_tensors, qwen3_tokenizer, tiny_model

from qscope_plugin.adapters.nnsight import (
    RemoteUnavailableError,
    add_vector,
    check_remote,
    load,
    read_features,
    residual,
    steered_generate,
)
from qscope_plugin.hooks import add_to_residual, capture_residual
from qscope_plugin.sae import QScopeSAEConfig, QwenScopeSAE

CASES = [(f, False) for f in FAMILIES] + [("qwen3_5", True)]
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}{'-multimodal' if m else ''}" for f, m in CASES])
def models(request, tok):
    family, multimodal = request.param
    hf = tiny_model(family, multimodal=multimodal)
    return load(copy.deepcopy(hf), tokenizer=tok), hf


def test_logits_and_residual_equal_transformers(models, tok):
    lm, hf = models
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    n_layers = hf.config.get_text_config().num_hidden_layers
    with capture_residual(hf, range(n_layers)) as blocks:
        ref = hf(ids).logits
    saved = []
    with lm.trace(PROMPT):  # a plain loop: nnsight re-executes the block's source, comprehensions lose scope
        for n in range(n_layers):
            saved.append(residual(lm, n).save())
        logits = lm.lm_head.output.save()
    assert (logits - ref).abs().max() <= 1e-5
    for n in range(n_layers):
        assert (saved[n] - blocks[n]).abs().max() <= 1e-5


def test_steered_generation_is_token_identical(models, tok):
    lm, hf = models
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    vector = 0.5 * torch.randn(64, generator=torch.Generator().manual_seed(1))

    def greedy(**kw):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                           pad_token_id=0, **kw)[0, ids.shape[1]:].tolist()

    plain = greedy()
    with add_to_residual(hf, 1, vector):
        expected = greedy()
    assert expected != plain and len(set(expected)) > 1
    out = steered_generate(lm, PROMPT, 1, vector, max_new_tokens=20)
    assert out[0, ids.shape[1]:].tolist() == expected
    with lm.generate(PROMPT, max_new_tokens=20, do_sample=False) as tracer:
        unsteered = tracer.result.save()
    assert unsteered[0, ids.shape[1]:].tolist() == plain


def test_read_features_inside_a_trace(tok):
    hf = tiny_model("qwen3")
    lm = load(copy.deepcopy(hf), tokenizer=tok)
    sae = QwenScopeSAE(make_sae_tensors(64, 256, seed=2), QScopeSAEConfig(64, 256, 16, 2))
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with capture_residual(hf, 2) as blocks:
        hf(ids)
    with lm.trace(PROMPT):
        values, indices = read_features(lm, sae)
        values, indices = values.save(), indices.save()
        some = read_features(lm, sae, [3, 7]).save()
    z = sae.encode(blocks[2])
    assert torch.allclose(torch.zeros_like(z).scatter_(-1, indices, values), z, atol=1e-5)
    in_topk = z[..., [3, 7]] > 0
    assert torch.allclose(some[in_topk], z[..., [3, 7]][in_topk], atol=1e-5)  # exact where f is in the top-k


def test_remote_preflight_fails_fast_and_clearly(monkeypatch, tmp_path):
    from huggingface_hub import constants
    from nnsight import CONFIG

    with pytest.raises(RemoteUnavailableError, match="not local folders"):
        check_remote(str(tmp_path))
    with pytest.raises(RemoteUnavailableError, match="HF_HUB_OFFLINE is set"):
        check_remote("Qwen/Qwen3-8B-Base")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port on this machine
    start = time.monotonic()
    with pytest.raises(RemoteUnavailableError, match="Hugging Face hub at http://127.0.0.1:9 cannot be reached"):
        check_remote("Qwen/Qwen3-8B-Base", timeout=2)
    assert time.monotonic() - start < 5
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:9")
    with pytest.raises(RemoteUnavailableError, match="NDIF at http://127.0.0.1:9"):
        check_remote("Qwen/Qwen3-8B-Base", timeout=2)
    monkeypatch.setattr(CONFIG.API, "HOST", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(RemoteUnavailableError, match="no NDIF API key"):
        check_remote("Qwen/Qwen3-8B-Base", timeout=2)
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key")
    assert check_remote("Qwen/Qwen3-8B-Base", timeout=2) == "Qwen/Qwen3-8B-Base"
    server.close()


def test_bfloat16_model_steering_and_feature_reading(tok):
    """float32 vectors and SAE rows are cast to the layer output's dtype (and moved to its device)."""
    hf = tiny_model("qwen3", n_layers=2).to(torch.bfloat16)
    lm = load(copy.deepcopy(hf), tokenizer=tok)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    vector = 3.0 * torch.randn(64, generator=torch.Generator().manual_seed(3))  # float32
    with add_to_residual(hf, 1, vector), capture_residual(hf, [0, 1]) as blocks:
        hf(ids)
    sae = QwenScopeSAE(make_sae_tensors(64, 256, seed=2), QScopeSAEConfig(64, 256, 16, 0))
    with lm.trace(PROMPT):
        some = read_features(lm, sae, [3, 7]).save()
        add_vector(lm, 1, vector)
        steered = residual(lm, 1).save()
    assert steered.dtype == torch.bfloat16
    assert torch.equal(steered, blocks[1])  # h + vector.to(bf16), not bf16(h + float32 vector)
    assert torch.allclose(some, sae.pre_acts(blocks[0])[..., [3, 7]].relu(), atol=1e-4)

    def greedy():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                           pad_token_id=0)[0, ids.shape[1]:].tolist()

    with add_to_residual(hf, 1, vector):
        expected = greedy()
    assert expected != greedy()
    assert steered_generate(lm, PROMPT, 1, vector, max_new_tokens=10)[0, ids.shape[1]:].tolist() == expected


def test_load_by_local_path(tok, tmp_path):
    """The default lazy (meta) load of a folder: nnsight alone cannot pick a tokenizer on transformers 5.x."""
    hf = tiny_model("qwen3", n_layers=2)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load(str(tmp_path))
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with lm.trace(PROMPT):
        logits = lm.lm_head.output.save()
    assert (logits - hf(ids).logits).abs().max() <= 1e-5


def test_load_avoids_the_deprecated_language_model(tok, tmp_path):
    """nnsight 0.8.1 warns on every ``LanguageModel``; ``load`` gives its replacement, which traces and generates."""
    import warnings

    from nnsight import NNsightDeprecationWarning

    hf = tiny_model("qwen3", n_layers=2)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                           pad_token_id=0)[0, ids.shape[1]:].tolist()
    for source in (copy.deepcopy(hf), str(tmp_path)):  # a loaded model, and the lazy (meta) load of a folder
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lm = load(source, tokenizer=tok)
        assert not [w for w in caught if issubclass(w.category, NNsightDeprecationWarning)]
        with lm.trace(PROMPT):
            logits = lm.lm_head.output.save()
        assert (logits - hf(ids).logits).abs().max() <= 1e-5
        with lm.generate(PROMPT, max_new_tokens=5, do_sample=False) as tracer:
            out = tracer.result.save()
        assert out[0, ids.shape[1]:].tolist() == expected


def test_load_falls_back_to_language_model_on_older_nnsight(tok, monkeypatch):
    """nnsight 0.8.0 has no ``TransformersModel``: ``load`` then builds the ``LanguageModel`` it does have."""
    import nnsight

    monkeypatch.delattr(nnsight, "TransformersModel", raising=False)
    monkeypatch.setattr(nnsight, "_LAZY_IMPORTS", {k: v for k, v in nnsight._LAZY_IMPORTS.items()
                                                   if k != "TransformersModel"})
    hf = tiny_model("qwen3", n_layers=2)
    lm = load(copy.deepcopy(hf), tokenizer=tok)
    assert type(lm) is nnsight.LanguageModel
    with lm.trace(PROMPT):
        logits = lm.lm_head.output.save()
    assert (logits - hf(tok(PROMPT, return_tensors="pt")["input_ids"]).logits).abs().max() <= 1e-5
