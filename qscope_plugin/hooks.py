"""Plain-PyTorch hooks on the residual stream of any Qwen3 / Qwen3.5 model, text or multimodal layout.

    >>> with capture_residual(model, [10, 14]) as acts:
    ...     model(**batch)
    >>> acts[14].shape                      # (batch, seq, d_model): raw output of block 14
    >>> with add_to_residual(model, 14, alpha * sae.direction(f)):
    ...     model.generate(**batch, max_new_tokens=20)

SAE ``layer{n}`` reads the raw output of decoder block n (docs/method.md §2.1). ``output_hidden_states[-1]`` is *not*
that for the last block (the final RMSNorm is applied), so everything here hooks the block itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from qscope_plugin.errors import QScopeError, layer_out_of_range

# Search order of docs/method.md §2.2: text-only CausalLM, multimodal ConditionalGeneration, wrappers, bare backbone.
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.layers",
    "language_model.model.layers",
    "model.text_model.layers",
    "layers",
    "base_model.model.model.layers",  # a PEFT PeftModel (LoRA) around a CausalLM
    "base_model.model.model.language_model.layers",
)


class LayerResolutionError(QScopeError, AttributeError):
    """No decoder-layer list was found on a model."""


def _get_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def resolve_layers(model: nn.Module, n_layers: int | None = None) -> nn.ModuleList:
    """The decoder-layer list of ``model``; with ``n_layers`` only a list of that length is accepted.

    Raises:
        LayerResolutionError: listing every path tried.
    """
    for path in LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and (n_layers is None or len(layers) == n_layers):
            return layers
    want = "" if n_layers is None else f" of length {n_layers}"
    raise LayerResolutionError(
        f"no decoder layer list{want} found on {type(model).__name__}; tried {', '.join(LAYER_PATHS)}. "
        "Pass a Qwen3 / Qwen3.5 transformers model (CausalLM or ConditionalGeneration)"
    )


def _residual(output: object) -> torch.Tensor:
    """The hidden state in a layer output: transformers 5 returns a tensor, older versions a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _replace_residual(output: object, hidden: torch.Tensor) -> object:
    """Same structure as ``output`` (tensor vs tuple) with the hidden state swapped."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


ResidualEdit = Callable[[torch.Tensor, int], torch.Tensor | None]
"""``edit(hidden, layer) -> new hidden or None`` where hidden is ``(batch, seq, d_model)``."""
KwargsEdit = Callable[[torch.Tensor, int, dict], torch.Tensor | None]
"""``edit(hidden, layer, layer_kwargs)``: also sees the keyword arguments the block got (``position_ids``, ...)."""


@contextmanager
def edit_residual(model: nn.Module, edits: Mapping[int, ResidualEdit | KwargsEdit], *,
                  pass_kwargs: bool = False) -> Iterator[None]:
    """Run ``edits[n]`` on the output of block n during every forward (prefill and each decode step).

    With ``pass_kwargs`` each edit is called as ``edit(hidden, n, layer_kwargs)``. Hooks are removed on exit,
    also when the body raises.
    """
    layers = resolve_layers(model)
    for n in edits:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < len(layers):
            raise layer_out_of_range(n, len(layers), f"this {type(model).__name__}")

    def make_hook(n: int, edit):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            new = edit(_residual(output), n, kwargs) if pass_kwargs else edit(_residual(output), n)
            return None if new is None else _replace_residual(output, new)

        return hook

    handles = [layers[n].register_forward_hook(make_hook(n, edit), with_kwargs=True) for n, edit in edits.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_residual(model: nn.Module, layers: int | Sequence[int], *,
                     detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the raw output of each block in ``layers``: ``{n: (batch, seq, d_model)}``.

    With generation, each decode step's positions are concatenated along ``seq``.
    """
    wanted = [layers] if isinstance(layers, int) else list(layers)
    acts: dict[int, torch.Tensor] = {}

    def record(hidden: torch.Tensor, n: int) -> None:
        h = hidden.detach() if detach else hidden
        acts[n] = h if n not in acts else torch.cat([acts[n], h], dim=1)

    with edit_residual(model, dict.fromkeys(wanted, record)):
        yield acts


@contextmanager
def add_to_residual(model: nn.Module, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Add ``vector`` ``(d_model,)`` to every position of block ``layer``'s output (h' = h + v).

    The vector is moved to the block's device and dtype once per call (multi-device models work).
    """

    def add(hidden: torch.Tensor, n: int) -> torch.Tensor:
        return hidden + vector.to(device=hidden.device, dtype=hidden.dtype)

    with edit_residual(model, {layer: add}):
        yield
