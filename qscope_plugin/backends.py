"""One way to run a model, whichever framework holds it: the layer every recipe runs models through.

    >>> backend = as_backend(model)            # a transformers model, a TransformerLens bridge or an nnsight model
    >>> picked = backend.capture(input_ids, attention_mask, layers=[3, 14])    # stops after block 14
    >>> with backend.edit({14: add_direction}):        # add_direction(hidden, layer, layer_kwargs) -> new hidden
    ...     new_ids = backend.generate(input_ids, max_new_tokens=20)

``as_backend`` is the only place that tells frameworks apart. Plain transformers models are handled here; each
adapter registers the Backend of its framework (``register_backend``) when it is imported, and ``as_backend``
imports the adapter of every framework already loaded in the process, so users never have to.

The split of work: captures and edits always run on the transformers decoder layers underneath (so the three
frameworks capture and steer bit-identically, and a capture can stop after the deepest block it needs), while
``logits`` and ``generate`` go through the framework's own forward and generate loop (so its own hooks, caches
and conventions apply, and recipes are checked against what a user of that framework actually gets).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from functools import cached_property
from typing import Any

import torch
from torch import nn

from qscope_plugin.errors import ContextLengthError, QScopeError, layer_out_of_range
from qscope_plugin.hooks import KwargsEdit, edit_residual, resolve_layers
from qscope_plugin.indices import MAX_NEW_TOKENS, check_count

Reduce = Callable[[torch.Tensor, int], Any]
"""``reduce(hidden, layer)``: what to keep of block ``layer``'s output ``(batch, seq, d_model)`` during a capture."""

FRAMEWORK_ADAPTERS = {"transformer_lens": "qscope_plugin.adapters.transformer_lens",
                      "nnsight": "qscope_plugin.adapters.nnsight"}
"""Framework module -> the adapter that registers its Backend (imported on demand, only if the framework is)."""


class BackendError(QScopeError, TypeError):
    """An object that no backend knows how to run."""


class _Stop(Exception):
    """Raised after the deepest captured block: nothing later needs computing."""


class Backend:
    """A plain transformers model (``*ForCausalLM`` or ``*ForConditionalGeneration``); base of every backend.

    Subclasses for other frameworks override ``logits`` and ``generate`` (and pass their underlying transformers
    module as ``module``); everything else runs on that module.
    """

    def __init__(self, model: object, module: nn.Module) -> None:
        self.model = model
        """What the user passed (returned unchanged by ``as_backend(backend)``)."""
        self.module = module
        """The transformers model underneath: its decoder layers are hooked, its config describes the model."""

    @cached_property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks (resolved on first use: naming a model needs no layers)."""
        return resolve_layers(self.module)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embedding (multi-device models move activations on)."""
        return self.module.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.get_input_embeddings().weight.dtype

    @property
    def name(self) -> str | None:
        """The backbone's ``name_or_path`` (hub id or folder), or None when it has none."""
        config = getattr(self.module, "config", None)
        name = getattr(self.module, "name_or_path", None) or getattr(config, "_name_or_path", None)
        return str(name) if name else None

    @property
    def context_length(self) -> int | None:
        """The most positions the model was built for (``max_position_embeddings`` of its text config), or None
        when its config does not say: the bound every text and generation is checked against."""
        config = getattr(self.module, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(text_config, "max_position_embeddings", None)
        return value if isinstance(value, int) and value > 0 else None

    def check_generation(self, n_prompt: int, max_new_tokens: int) -> None:
        """Refuse a prompt of ``n_prompt`` tokens (the padded width of a batch) plus ``max_new_tokens`` longer than
        the model's context, before anything runs: cutting the prompt would change what is generated from, and
        positions past the context are ones the model never saw (every generation path calls this)."""
        check_count(max_new_tokens, "max_new_tokens", 0, MAX_NEW_TOKENS)
        context = self.context_length
        if context is not None and n_prompt + max_new_tokens > context:
            raise ContextLengthError(f"the prompt is {n_prompt} tokens and {max_new_tokens} new ones are asked for, "
                                     f"{n_prompt + max_new_tokens} in all, past the model's context of {context} "
                                     "positions; pass a shorter prompt or fewer new tokens (--max-new-tokens)")

    def check_layers(self, layers: Iterable[int]) -> list[int]:
        """``layers`` as a list, each checked against this model's depth (one error class for every caller)."""
        layers = list(layers)
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
                raise layer_out_of_range(layer, self.n_layers, f"this {type(self.module).__name__}")
        return layers

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                layers: Iterable[int], reduce: Reduce | None = None,
                position_ids: torch.Tensor | None = None) -> dict[int, Any]:
        """One forward that keeps ``reduce(hidden, n)`` (default: the hidden state) of each block in ``layers``.

        The forward stops right after the deepest of them: later blocks and the LM head never run. ``reduce`` is
        applied inside the hook, so a recipe that keeps a few values per text never holds all layers' activations.
        """
        wanted = self.check_layers(layers)
        if not wanted:
            return {}
        deepest, kept = max(wanted), {}

        def keep(hidden: torch.Tensor, n: int) -> None:
            kept[n] = hidden if reduce is None else reduce(hidden, n)
            if n == deepest:
                raise _Stop

        inputs = {"input_ids": input_ids.to(self.device), "use_cache": False}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask.to(self.device)
        if position_ids is not None:
            inputs["position_ids"] = position_ids.to(self.device)
        with edit_residual(self.module, dict.fromkeys(wanted, keep)), suppress(_Stop):
            self.module(**inputs)
        return kept

    @contextmanager
    def edit(self, edits: Mapping[int, KwargsEdit]) -> Iterator[None]:
        """Run ``edits[n](hidden, n, layer_kwargs)`` on block n's output in every forward inside the block.

        ``layer_kwargs`` are the keyword arguments the decoder layer received (``position_ids`` among them), so
        an edit can choose positions by their absolute index under padding and KV caching. Applies to captures,
        ``logits`` and ``generate`` of this backend alike.
        """
        self.check_layers(edits)
        with edit_residual(self.module, edits, pass_kwargs=True):
            yield

    @contextmanager
    def tap(self, layers: Iterable[int], fn: Callable[[torch.Tensor, int, dict], None]) -> Iterator[None]:
        """Call ``fn(hidden, n, layer_kwargs)`` on block n's output in every forward inside the block, graph kept.

        Unlike ``capture`` (no_grad, stops early) the forward runs whole and ``hidden`` carries gradients, so a
        training loss can read the residual stream (SASFT's penalty) without changing it.
        """
        with self.edit(dict.fromkeys(self.check_layers(layers), fn)):  # fn returns None: the output is unchanged
            yield

    def forward(self, **inputs: Any) -> Any:
        """The transformers module's forward with gradients (a training step), outputs as transformers returns
        them (``.loss`` when ``labels`` are given)."""
        return self.module(**inputs)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               last: int | None = None) -> torch.Tensor:
        """``(batch, seq, vocab)`` logits of the framework's own forward; with ``last``, only the last ``last``
        positions ``(batch, last, vocab)``: the LM head then runs on those alone (at a real vocabulary, 151,936
        or 248,320 floats per position, the full tensor is the largest one of the forward)."""
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.module(input_ids=input_ids.to(self.device), attention_mask=mask, logits_to_keep=last or 0).logits

    @torch.no_grad()
    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., vocab)`` logits of residual vectors ``(..., d_model)`` through the final norm and the LM head.

        The same two modules the model's forward ends with (the norm next to the decoder blocks, then
        ``get_output_embeddings()``), so ``unembed`` of the last block's output equals ``logits``: what a feature's
        decoder direction promotes and suppresses (its logit effects).
        """
        return self.module.get_output_embeddings()(self._final_norm(hidden.to(self.device, self.dtype)))

    @cached_property
    def _final_norm(self) -> nn.Module:
        """The norm of the backbone that owns the decoder blocks (``model.norm``, ``model.language_model.norm``)."""
        for owner in self.module.modules():
            if getattr(owner, "layers", None) is self.layers and isinstance(getattr(owner, "norm", None), nn.Module):
                return owner.norm
        raise BackendError(f"no final norm found next to the decoder blocks of {type(self.module).__name__}; "
                           "expected a Qwen3 / Qwen3.5 backbone with a `norm` beside its `layers`")

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        """New tokens ``(batch, n_new)`` from the framework's own generate loop (KV cache on); left-pad batches.

        Rows that end early are filled with ``pad_token_id`` (or ``eos_token_id``) after their end.
        """
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)
        options = generation_options(do_sample, temperature, top_p, eos_token_id, pad_token_id)
        out = self.module.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, **options)
        return out[:, ids.shape[1]:]


def generation_options(do_sample: bool, temperature: float, top_p: float, eos_token_id: int | None,
                       pad_token_id: int | None) -> dict[str, Any]:
    """transformers ``generate`` keyword arguments; an unset token id is left out, so the model's generation
    config (its own EOS) applies instead of being overwritten with None."""
    options: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    if eos_token_id is not None:
        options["eos_token_id"] = eos_token_id
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    if pad is not None:
        options["pad_token_id"] = pad
    return options


_REGISTRY: list[tuple[Callable[[object], bool], Callable[[object], Backend]]] = []


def register_backend(matches: Callable[[object], bool], make: Callable[[object], Backend]) -> None:
    """Let ``as_backend`` run objects for which ``matches(obj)`` holds with ``make(obj)`` (idempotent per pair)."""
    if (matches, make) not in _REGISTRY:
        _REGISTRY.append((matches, make))


def as_backend(model: object) -> Backend:
    """The Backend for ``model``: a transformers model, a TransformerLens bridge, an nnsight model or a Backend."""
    if isinstance(model, Backend):
        return model
    for framework, adapter in FRAMEWORK_ADAPTERS.items():
        if framework in sys.modules:  # an object of that framework can only exist once it is imported
            importlib.import_module(adapter)
    for matches, make in _REGISTRY:
        if matches(model):
            return make(model)
    if isinstance(model, nn.Module):
        return Backend(model, model)
    raise BackendError(f"cannot run a {type(model).__name__}; pass a transformers model (e.g. Qwen3ForCausalLM), "
                       "a TransformerLens TransformerBridge or an nnsight LanguageModel")
