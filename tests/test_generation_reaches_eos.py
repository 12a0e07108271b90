"""Steered generation that reaches EOS before ``max_new_tokens`` stops there and returns, on every backend.

nnsight's bounded ``tracer.iter[:N]`` loop never gets its step after EOS, and code after such a loop does not run:
``steered_generate`` once raised ``UnboundLocalError`` there.
"""

from __future__ import annotations

import copy

import pytest
import torch
from qscope_testing import qwen3_tokenizer, tiny_model

from qscope_plugin.backends import as_backend
from qscope_plugin.hooks import add_to_residual

PROMPT, LAYER, MAX_NEW = "Once upon a time", 1, 16


@pytest.fixture(scope="module")
def setup():
    from qscope_plugin.adapters.nnsight import load
    from qscope_plugin.adapters.transformer_lens import boot

    model, tok = tiny_model("qwen3"), qwen3_tokenizer()
    frameworks = {"hf": model, "bridge": boot(copy.deepcopy(model), tokenizer=tok),
                  "nnsight": load(copy.deepcopy(model), tokenizer=tok)}
    vector = 0.5 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with add_to_residual(model, LAYER, vector):
        steered = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                 pad_token_id=0)[0, ids.shape[1]:].tolist()
    # EOS := the first steered token that did not come before: generation must stop right after it.
    stop = next(i for i in range(2, len(steered)) if steered[i] not in steered[:i])
    return frameworks, tok, ids, vector, steered[:stop + 1]


def test_every_backend_stops_at_eos_when_steered(setup):
    frameworks, _, ids, vector, expected = setup
    eos = expected[-1]
    assert len(expected) < MAX_NEW
    for name, model in frameworks.items():
        backend = as_backend(model)
        with backend.edit({LAYER: lambda h, n, kw: h + vector.to(h)}):
            out = backend.generate(ids, max_new_tokens=MAX_NEW, eos_token_id=eos)
        assert out[0].tolist() == expected, name


def test_framework_steering_helpers_stop_at_eos(setup):
    from qscope_plugin.adapters.nnsight import steered_generate
    from qscope_plugin.adapters.transformer_lens import steer

    frameworks, tok, ids, vector, expected = setup
    eos = expected[-1]
    out = steered_generate(frameworks["nnsight"], PROMPT, LAYER, vector, max_new_tokens=MAX_NEW, eos_token_id=eos,
                           pad_token_id=0)
    assert out[0, ids.shape[1]:].tolist() == expected
    bridge = frameworks["bridge"]
    with steer(bridge, LAYER, vector):
        tokens = bridge.generate(ids, max_new_tokens=MAX_NEW, eos_token_id=eos, use_past_kv_cache=True,
                                 return_type="tokens", verbose=False, do_sample=False)
    assert tokens[0, ids.shape[1]:].tolist() == expected
