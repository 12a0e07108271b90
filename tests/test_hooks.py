"""Plain-PyTorch residual hooks (qscope_plugin.hooks): layer resolution, tuple outputs, cleanup, generate."""

from __future__ import annotations

import pytest
import torch
from qscope_testing import tiny_model
from torch import nn

from qscope_plugin.errors import QScopeError
from qscope_plugin.hooks import (
    LayerResolutionError,
    add_to_residual,
    capture_residual,
    edit_residual,
    resolve_layers,
)

VOCAB = 1000


def ids(n: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(0))


def test_resolve_layers_text_and_multimodal_layouts():
    text = tiny_model("qwen3", n_layers=2, vocab_size=VOCAB)
    assert resolve_layers(text) is text.model.layers
    mm = tiny_model("qwen3_5", multimodal=True, vocab_size=VOCAB)
    assert resolve_layers(mm) is mm.model.language_model.layers
    assert resolve_layers(mm, n_layers=4) is mm.model.language_model.layers
    with pytest.raises(LayerResolutionError, match="of length 3"):
        resolve_layers(text, n_layers=3)
    with pytest.raises(LayerResolutionError, match="model.language_model.layers"):
        resolve_layers(nn.Linear(2, 2))


class TupleLayer(nn.Module):
    """A decoder layer in the transformers-4 style: returns ``(hidden, extra)``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.proj(h), "extra"


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([TupleLayer(), TupleLayer()])

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        extras = []
        for layer in self.model.layers:
            h, extra = layer(h)
            extras.append(extra)
        return h, extras


def test_tuple_layer_outputs_are_captured_and_edited():
    model = TupleModel()
    x = torch.randn(1, 3, 4)
    first = model.model.layers[0](x)[0]
    with capture_residual(model, 0) as acts:
        clean, _ = model(x)
    assert torch.equal(acts[0], first)
    v = torch.tensor([1.0, -2.0, 3.0, 0.5])
    with add_to_residual(model, 0, v):
        steered, extras = model(x)
    assert extras == ["extra", "extra"]  # the rest of the tuple is kept
    assert torch.allclose(steered, model.model.layers[1](first + v)[0])
    assert not torch.allclose(steered, clean)


def test_hooks_are_removed_when_the_body_raises():
    model = tiny_model("qwen3", n_layers=2, vocab_size=VOCAB)
    clean = model(ids()).logits
    with pytest.raises(RuntimeError, match="boom"), add_to_residual(model, 1, torch.full((64,), 5.0)):
        assert (model(ids()).logits - clean).abs().max() > 1e-3  # the hook is active inside
        raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in model.model.layers)
    assert torch.equal(model(ids()).logits, clean)
    with pytest.raises(QScopeError, match="out of range"), edit_residual(model, {2: lambda h, n: h}):
        pass


def test_add_to_residual_steers_every_generated_token():
    model = tiny_model("qwen3", n_layers=2, vocab_size=VOCAB)
    prompt, n_new = ids(), 10
    vector = 4.0 * torch.randn(64, generator=torch.Generator().manual_seed(1))

    def greedy() -> torch.Tensor:
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                              do_sample=False, pad_token_id=0)

    plain = greedy()
    with add_to_residual(model, 1, vector), capture_residual(model, 1) as acts:
        steered = greedy()
    assert acts[1].shape[1] == prompt.shape[1] + n_new - 1  # prefill + every decode step went through the hook
    assert not torch.equal(steered, plain)
    # teacher forcing: one uncached forward, steered at every position, predicts every generated token
    with add_to_residual(model, 1, vector):
        logits = model(steered[:, :-1]).logits
    assert logits[0, prompt.shape[1] - 1:].argmax(-1).tolist() == steered[0, prompt.shape[1]:].tolist()
