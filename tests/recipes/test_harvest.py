"""The shared harvest: every pooling equals each text run alone, on all four families and all three backends."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from qscope_testing import FAMILIES, qwen3_tokenizer, tiny_model, tiny_saes

from qscope_plugin.errors import LayerOutOfRangeError
from qscope_plugin.hooks import capture_residual
from qscope_plugin.recipes import harvest
from qscope_plugin.recipes._harvest import EmptyInputError, dense_codes

TEXTS = ["What is 2 + 2?", "我今天很开心", "Translate to French: the cat sleeps on the warm mat all day long.",
         "def f(x):\n    return x", "A", "Which planet is the largest in the solar system, and why is it so big?",
         "长城有多长？", "List three prime numbers."]
LAYERS = (1, 2)


def hf(model, tok):
    return model


def bridge(model, tok):
    from qscope_plugin.adapters.transformer_lens import boot

    return boot(copy.deepcopy(model), tokenizer=tok)  # the bridge takes over the modules it is given


def nnsight(model, tok):
    from qscope_plugin.adapters.nnsight import load

    return load(copy.deepcopy(model), tokenizer=tok)


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


@torch.no_grad()
def alone(model, tok, text: str, saes) -> dict[int, torch.Tensor]:
    """The definition, no batching: one text, full forward, dense SAE codes ``(T, d_sae)`` of every token."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with capture_residual(model, list(saes)) as acts:
        model(input_ids=ids)
    return {n: sae.encode(acts[n][0]) for n, sae in saes.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tok):
    """A tiny random model of each family, its SAEs at two layers and every text's codes computed alone."""
    model = tiny_model(request.param)
    saes = {n: sae for n, sae in tiny_saes(model, d_sae=96, k=8).items() if n in LAYERS}
    return model, saes, [alone(model, tok, text, saes) for text in TEXTS]


@pytest.mark.parametrize("make_backend", [hf, bridge, nnsight], ids=["hf", "bridge", "nnsight"])
def test_every_pooling_equals_each_text_alone(family, tok, make_backend):
    model, saes, reference = family
    backend = make_backend(model, tok)
    assert any(bool((ref[2][-1] > 0).any()) for ref in reference)  # non-vacuous: features do fire
    for batch_size, side in ((1, "right"), (3, "left"), (8, "right")):
        where = (batch_size, side)
        codes = harvest(backend, tok, TEXTS, saes, batch_size=batch_size, padding_side=side)
        maxes = harvest(backend, tok, TEXTS, saes, pooling="max", batch_size=batch_size, padding_side=side)
        skip0 = harvest(backend, tok, TEXTS, saes, pooling="max", batch_size=batch_size, padding_side=side,
                        exclude_first_token=True)
        last = harvest(backend, tok, TEXTS, saes, pooling="last", batch_size=batch_size, padding_side=side)
        for i, ref in enumerate(reference):
            for n in LAYERS:
                assert torch.allclose(dense_codes(codes[i], n, 96), ref[n], atol=1e-4), where
                expected_max = ref[n].max(0).values.clamp(min=0)
                assert torch.allclose(torch.from_numpy(maxes[n][i].toarray()[0]), expected_max, atol=1e-4), where
                expected_skip = ref[n][1:].max(0).values.clamp(min=0) if len(ref[n]) > 1 else torch.zeros(96)
                assert torch.allclose(torch.from_numpy(skip0[n][i].toarray()[0]), expected_skip, atol=1e-4), where
                assert set(last[n][i].tolist()) == set(torch.nonzero(ref[n][-1] > 0).flatten().tolist()), where


def test_the_forward_stops_after_the_deepest_layer(tok):
    model = tiny_model("qwen3")
    saes = {1: tiny_saes(model)[1]}
    ran = []
    handles = [model.model.layers[2].register_forward_hook(lambda *a: ran.append("layer 2")),
               model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))]
    try:
        harvest(model, tok, TEXTS, saes, pooling="max")
    finally:
        for handle in handles:
            handle.remove()
    assert ran == []


def test_truncation_side_keeps_the_start_or_the_end(tok):
    model = tiny_model("qwen3")
    saes = {0: tiny_saes(model)[0]}
    text = "one two three four five six seven eight nine ten"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    head = harvest(model, tok, [text], saes, max_length=4)[0]
    tail = harvest(model, tok, [text], saes, max_length=4, truncation_side="left")[0]
    assert head.token_ids.tolist() == ids[:4] and tail.token_ids.tolist() == ids[-4:]
    expected = alone(model, tok, tok.decode(ids[-4:]), saes)[0]
    assert torch.allclose(dense_codes(tail, 0, 128), expected, atol=1e-4)  # the kept end runs from position 0


def test_empty_texts_and_bad_arguments(tok):
    model = tiny_model("qwen3")
    saes = tiny_saes(model)
    codes = harvest(model, tok, ["", "hello"], saes)
    assert codes[0].token_ids.numel() == 0 and codes[0].values[0].shape == (0, 8)
    maxes = harvest(model, tok, ["", "hello"], saes, pooling="max")
    assert maxes[0].shape == (2, 128) and maxes[0][0].nnz == 0 and maxes[0][1].nnz > 0
    with pytest.raises(EmptyInputError, match="tokenize to nothing"):
        harvest(model, tok, ["", "hello"], saes, pooling="last")
    with pytest.raises(LayerOutOfRangeError, match=r"layer 9 is out of range .*4 layers: 0..3"):
        harvest(model, tok, ["hello"], {9: saes[0]})
    with pytest.raises(ValueError, match="pooling='mean'"):
        harvest(model, tok, ["hello"], saes, pooling="mean")
    assert isinstance(harvest(model, tok, ["hello"], saes, pooling="last")[3][0], np.ndarray)


def test_texts_longer_than_the_context_are_cut_to_it_with_one_warning(tok):
    """A position past ``max_position_embeddings`` is one the model never saw: such texts are cut to the context
    (whatever ``max_length`` says), once warned, and their codes equal those of the cut text alone."""
    from qscope_plugin.errors import QScopeWarning

    model = tiny_model("qwen3")
    model.config.max_position_embeddings = 16  # what the backend reads as the context
    saes = {n: sae for n, sae in tiny_saes(model, d_sae=96, k=8).items() if n in LAYERS}
    long_text, short_text = "one two three four five six seven eight nine ten " * 3, "short"
    with pytest.warns(QScopeWarning, match=r"1 of 2 texts are longer than the model.s context of 16 tokens .*"
                                           r"--max-length") as caught:
        codes = harvest(model, tok, [long_text, short_text], saes, max_length=512)
    assert len(caught) == 1 and len(codes[0].token_ids) == 16 and len(codes[1].token_ids) < 16
    cut = tok.decode(tok(long_text, add_special_tokens=False)["input_ids"][:16])
    reference = alone(model, tok, cut, saes)
    for n in saes:
        assert torch.allclose(dense_codes(codes[0], n, 96), reference[n], atol=1e-5)
