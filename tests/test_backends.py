"""The backend layer: one way to run plain transformers, TransformerLens bridges and nnsight models."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from qscope_testing import qwen3_tokenizer, tiny_model

from qscope_plugin.backends import Backend, BackendError, as_backend
from qscope_plugin.errors import LayerOutOfRangeError
from qscope_plugin.hooks import capture_residual

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def setup():
    from qscope_plugin.adapters.nnsight import load
    from qscope_plugin.adapters.transformer_lens import boot

    model, tok = tiny_model("qwen3"), qwen3_tokenizer()
    backends = {"hf": as_backend(model), "bridge": as_backend(boot(copy.deepcopy(model), tokenizer=tok)),
                "nnsight": as_backend(load(copy.deepcopy(model), tokenizer=tok))}
    return model, tok, backends


def test_each_framework_gets_its_backend(setup):
    from qscope_plugin.adapters.nnsight import NNsightBackend
    from qscope_plugin.adapters.transformer_lens import BridgeBackend

    model, _, backends = setup
    assert type(backends["hf"]) is Backend and backends["hf"].module is model
    assert isinstance(backends["bridge"], BridgeBackend) and isinstance(backends["nnsight"], NNsightBackend)
    for backend in backends.values():
        assert isinstance(backend.module, torch.nn.Module) and backend.n_layers == 4
        assert as_backend(backend) is backend
    with pytest.raises(BackendError, match="cannot run a str; pass a transformers model"):
        as_backend("Qwen/Qwen3-1.7B-Base")


def test_capture_equals_a_full_forward_and_stops_early(setup):
    model, tok, backends = setup
    ids = tok(["one two three", "four"], return_tensors="pt", padding=True)
    with capture_residual(model, [1, 2]) as full:
        model(**ids)
    ran = []
    handle = model.model.layers[3].register_forward_hook(lambda *a: ran.append(3))
    try:
        for name, backend in backends.items():
            got = backend.capture(ids["input_ids"], ids["attention_mask"], layers=[2, 1])
            assert set(got) == {1, 2}
            real = ids["attention_mask"].bool()  # what padding positions hold is the framework's business
            assert all(torch.allclose(got[n][real], full[n][real], atol=1e-5) for n in (1, 2)), name
    finally:
        handle.remove()
    assert ran == []  # the bridge and nnsight copies own their own modules; the HF capture never ran block 3
    reduced = backends["hf"].capture(ids["input_ids"], layers=[0], reduce=lambda h, n: (n, h.shape))
    assert reduced == {0: (0, torch.Size([2, 3, 64]))}


def test_edit_sees_layer_kwargs_and_applies_to_every_backend(setup):
    model, tok, backends = setup
    ids = tok("one two three four", return_tensors="pt")["input_ids"]
    clean = model(ids).logits
    seen = []

    def shift_position_2(hidden, layer, kwargs):
        seen.append(kwargs["position_ids"].tolist())
        return hidden + 5.0 * (kwargs["position_ids"] == 2).unsqueeze(-1).to(hidden)

    for backend in backends.values():
        with backend.edit({1: shift_position_2}):
            logits = backend.logits(ids)
        changed = (logits - clean).abs().amax(-1)[0] > 1e-3
        assert changed.tolist() == [False, False, True, True]
    assert seen and all(s == [[0, 1, 2, 3]] for s in seen)
    with pytest.raises(LayerOutOfRangeError, match=r"layer 4 is out of range .*4 layers: 0..3"):
        backends["hf"].edit({4: shift_position_2}).__enter__()


def test_logits_of_the_last_positions_only(setup):
    """``last=n`` equals the full logits' last n positions; on transformers the LM head sees only those n."""
    model, tok, backends = setup
    ids = tok(["one two three four five", "six"], return_tensors="pt", padding=True)
    full = model(**ids).logits
    real = ids["attention_mask"][:, -2:].bool()  # what padding positions hold is the framework's business
    for name, backend in backends.items():
        got = backend.logits(ids["input_ids"], ids["attention_mask"], last=2)
        assert got.shape == (2, 2, full.shape[-1]) and torch.allclose(got[real], full[:, -2:][real], atol=1e-5), name
    rows = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    try:
        backends["hf"].logits(ids["input_ids"], last=2)
        backends["hf"].logits(ids["input_ids"])
    finally:
        handle.remove()
    assert rows == [2, ids["input_ids"].shape[1]]


def test_generate_is_identical_on_every_backend_and_a_left_padded_batch(setup):
    model, tok, backends = setup
    prompts = ["Once upon a time", "The weather"]
    singles = [backends["hf"].generate(tok(p, return_tensors="pt")["input_ids"], max_new_tokens=6)[0].tolist()
               for p in prompts]
    assert singles[0] != singles[1]
    for backend in backends.values():
        assert backend.generate(tok(prompts[0], return_tensors="pt")["input_ids"],
                                max_new_tokens=6)[0].tolist() == singles[0]
    tok.padding_side = "left"
    try:
        batch = tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    out = backends["hf"].generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6,
                                  pad_token_id=tok.pad_token_id)
    assert out.tolist() == singles


def test_sampling_is_seeded_and_differs_from_greedy(setup):
    _, tok, backends = setup
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(backends["hf"].generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5).tolist())
    assert draws[0] == draws[1] != backends["hf"].generate(ids, max_new_tokens=8).tolist()


def test_unembed_is_the_final_norm_and_lm_head_of_every_backend(setup):
    """Random residual vectors against RMSNorm and W_U by hand; the last block's output against each framework's
    own logits (so unembed is exactly how the model's forward ends)."""
    model, tok, backends = setup
    hidden = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    by_hand = (normed * model.model.norm.weight) @ model.lm_head.weight.T
    ids = tok(["one two three", "four five"], return_tensors="pt", padding=True)
    for name, backend in backends.items():
        assert torch.allclose(backend.unembed(hidden), by_hand, atol=1e-5), name
        last = backend.capture(ids["input_ids"], ids["attention_mask"], layers=[3])[3]
        own = backend.logits(ids["input_ids"], ids["attention_mask"])
        real = ids["attention_mask"].bool()
        assert torch.allclose(backend.unembed(last)[real], own[real], atol=1e-5), name


@pytest.mark.parametrize(("family", "multimodal"), [("qwen3_moe", False), ("qwen3_5", False), ("qwen3_5", True)])
def test_unembed_finds_the_final_norm_of_every_layout(family, multimodal):
    """Qwen3.5's norm scales by (1 + weight) and sits in ``model.language_model`` when multimodal."""
    model = tiny_model(family, multimodal=multimodal, n_layers=4, vocab_size=512)
    backend = as_backend(model)
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    last = backend.capture(ids, layers=[3])[3]
    assert torch.allclose(backend.unembed(last), backend.logits(ids), atol=1e-5)


def _names(tree: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.py")), ids=lambda p: p.name)
def test_no_recipe_tells_frameworks_apart_or_runs_its_own_loop(path):
    """Recipes reach models only through qscope_plugin.backends: no framework types or attributes, no hooks of
    their own, no forward or generate calls on a model object."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & {"qscope_plugin.hooks", "transformer_lens", "nnsight"}
    assert not _names(tree) & {"original_model", "_module", "register_forward_hook", "run_with_hooks", "trace"}
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
        if call.func.attr in ("generate", "forward"):
            assert isinstance(call.func.value, ast.Attribute | ast.Name), ast.unparse(call)
            assert "backend" in ast.unparse(call.func.value), f"{path.name}: {ast.unparse(call)}"
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
        if call.func.id in ("isinstance", "hasattr") and call.args:
            assert ast.unparse(call.args[0]) not in ("model", "module", "self.model"), ast.unparse(call)
