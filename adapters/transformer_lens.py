"""TransformerLens adapter: all four Qwen families in ``TransformerBridge``, exact against transformers.

    >>> from qscope_plugin.adapters.transformer_lens import boot, attach_sae, steer
    >>> bridge = boot("Qwen/Qwen3-1.7B-Base")                  # hub id, local folder or a loaded HF model
    >>> logits, cache = bridge.run_with_cache(tokens, names_filter="blocks.14.hook_resid_post")
    >>> with steer(bridge, 14, alpha * sae.direction(6159)):
    ...     bridge.generate(tokens, max_new_tokens=20)

``boot`` applies the version-gated fixes in ``_fixes`` (silent KV-cache bug in cached ``generate``; Qwen3.5
Gated DeltaNet crash; SAE-bridge hook aliases), boots published multimodal Qwen3.5 checkpoints as their text
tower (no torchvision needed), and never mutates the caller's tokenizer (the bridge sets its ``bos_token``).
Hooks use the canonical ``blocks.{n}.hook_out`` (``hook_resid_post`` is its alias).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qscope_plugin.adapters._fixes import apply_all, fix_tl_bridge_kv_cache_kwarg, fix_tl_gated_delta_net_functions
from qscope_plugin.backends import Backend, register_backend
from qscope_plugin.errors import QScopeError
from qscope_plugin.models import check_device, model_load_error
from qscope_plugin.sae import QwenScopeSAE

__all__ = ["BridgeBackend", "attach_sae", "boot", "load_hooked", "register", "steer"]

QWEN_FAMILIES = ("qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe")


class BootError(QScopeError, ValueError):
    """A model that cannot be booted in TransformerLens."""


def register(*, saes: bool = True) -> dict[str, bool]:
    """Apply the upstream fixes this installation needs (idempotent).

    ``saes=False`` applies the TransformerLens fixes only, leaving SAELens unimported: a plain bridge does not
    need it, and its import (seconds, ~1 GiB) was most of the bridge's boot overhead over ``from_pretrained``.
    """
    if saes:
        return apply_all()
    return {fix.__name__: fix() for fix in (fix_tl_bridge_kv_cache_kwarg, fix_tl_gated_delta_net_functions)}


def hook_name(layer: int) -> str:
    """Canonical bridge hook of block ``layer``'s output (``hook_resid_post`` aliases it)."""
    return f"blocks.{layer}.hook_out"


def _text_tower(model: nn.Module) -> nn.Module:
    """The text-only ``*ForCausalLM`` view of a loaded ``*ForConditionalGeneration`` model, sharing its modules.

    The wrapper is built on the meta device from a copy of ``config.text_config`` and then given the caller's
    ``language_model`` and ``lm_head`` (no weights are copied, the vision tower is left out, and the caller's
    model and config are not changed). Any other model is returned as is.
    """
    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", None)
    text_config = getattr(model.config, "text_config", None)
    if language_model is None or text_config is None or not hasattr(model, "lm_head"):
        return model
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(text_config)
    cfg.architectures = None
    cfg._name_or_path = model.config._name_or_path
    with torch.device("meta"):
        text = AutoModelForCausalLM.from_config(cfg)
    text.model = language_model
    text.lm_head = model.lm_head
    text.generation_config = copy.deepcopy(model.generation_config)
    # what the wrapper did not take from the caller's model (compared by identity: a meta-device model, built to
    # check shapes without memory, is meta throughout)
    taken = {id(t) for t in [*model.parameters(), *model.buffers()]}
    leftover = [name for name, t in [*text.named_parameters(), *text.named_buffers()] if id(t) not in taken]
    if leftover:  # a text class with more top-level modules than language_model + lm_head
        raise BootError(f"cannot take the text tower of {type(model).__name__}: {leftover} not found on the model; "
                        "load it with AutoModelForCausalLM.from_pretrained(path) instead")
    return text.train(model.training)


def _text_model(model: str | nn.Module, device: str | torch.device | None, dtype: torch.dtype | None,
                **hf_kwargs: Any) -> nn.Module:
    """The text-only ``*ForCausalLM`` on ``device`` in ``dtype``.

    ``AutoModelForCausalLM`` maps published Qwen3.5 checkpoints to it; a loaded ``*ForConditionalGeneration``
    is reduced to its text tower (:func:`_text_tower`). A loaded model is moved / cast **in place** when
    ``device`` / ``dtype`` differ from where it is (the bridge wraps its modules in any case).
    """
    if isinstance(model, nn.Module):
        if hf_kwargs:
            raise BootError(f"{sorted(hf_kwargs)} only apply when boot loads the model; got a loaded model")
        hf = _text_tower(model)
    else:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype or torch.float32, **hf_kwargs).eval()
    if device is not None:
        if getattr(hf, "hf_device_map", None):
            raise BootError("device= conflicts with a model dispatched with device_map; leave device=None")
        hf.to(device)
    if dtype is not None and next(hf.parameters()).dtype != dtype:
        from transformer_lens.utilities.multi_gpu import maybe_cast_floating_params

        maybe_cast_floating_params(hf, dtype)  # parameters only: float32 buffers (rotary inv_freq) stay, as in HF
    return hf


def _settings_copy(tokenizer) -> Any:
    """A copy of ``tokenizer`` whose settings (special tokens, padding side) change without touching the original.

    The bridge sets ``bos_token`` / ``pad_token`` / ``padding_side`` on the object it is given. A deepcopy of a
    Qwen tokenizer takes ~7 s (its 151,643-entry vocabulary and merges, object by object): most of the bridge's
    boot overhead at real size (docs/benchmarks_real_size.md). Those tables and the Rust tokenizer are only
    read, so they are shared; every other container attribute is copied.
    """
    clone = copy.copy(tokenizer)
    for name, value in vars(tokenizer).items():
        if isinstance(value, (dict, list, set)) and len(value) <= 4096:
            setattr(clone, name, copy.deepcopy(value))
    return clone


def _tokenizer(model: str | nn.Module, tokenizer) -> Any:
    if tokenizer is not None:
        return _settings_copy(tokenizer)  # the bridge sets bos_token on the object it is given
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
    if not name:
        raise BootError("pass tokenizer=... for a model object without a name_or_path")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def boot(model: str | nn.Module, *, saes: bool = False, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, tokenizer=None, **hf_kwargs: Any):
    """A ``TransformerBridge`` (``SAETransformerBridge`` with ``saes=True``) for any Qwen3 / Qwen3.5 model.

    Args:
        model: hub id, local folder, or a loaded transformers model (its modules are reused, not copied; a
            loaded ``*ForConditionalGeneration`` is booted as its text tower, without torchvision).
        saes: boot SAELens' ``SAETransformerBridge`` so ``run_with_saes`` / ``saes()`` work.
        device: where the model runs; None keeps a loaded model where it is (a path loads on CPU unless
            ``device_map`` is given). A loaded model is moved **in place** (``model.to(device)``).
        dtype: parameter dtype; None keeps a loaded model's dtype (a path loads float32). A loaded model is
            cast **in place**. Pass a copy (``copy.deepcopy(model)``) to keep the original untouched.
        tokenizer: used as a copy; by default loaded from the model's folder or hub id.
        hf_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``device_map="auto"``).

    ``bridge.cfg.device`` is always the device of the model's input embedding (where its parameters are).
    """
    register(saes=saes)
    if device is not None and hf_kwargs.get("device_map") is not None:
        raise BootError("pass either device= or device_map=, not both")
    check_device(None if device is None else str(device))
    try:
        hf = _text_model(model, device, dtype, **hf_kwargs)
    except OSError as e:  # offline and not cached, a typo, a folder without weights: transformers' raw OSError
        raise model_load_error(model, e) from None
    family = getattr(hf.config, "model_type", "").removesuffix("_text")
    if family not in QWEN_FAMILIES:
        raise BootError(f"{type(hf).__name__} ({family!r}) is not a Qwen3 / Qwen3.5 model; expected one of "
                        f"{QWEN_FAMILIES}")
    try:
        tokenizer = _tokenizer(model, tokenizer)
    except OSError as e:
        raise model_load_error(model, e) from None
    if saes:
        from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge as Bridge
    else:
        from transformer_lens.model_bridge import TransformerBridge as Bridge
    name = model if isinstance(model, str) else (hf.config._name_or_path or type(hf).__name__)
    weight = hf.get_input_embeddings().weight
    # The adapter is chosen from config.architectures: name the class actually loaded (the text tower), so a
    # published *ForConditionalGeneration checkpoint does not pull in the multimodal adapter (and torchvision).
    # As an override it lands on the bridge's copy of the config, never on the model's own config.
    # device: without it TransformerLens sets cfg.device from get_device() (CUDA on a GPU box) while a model
    # it is handed stays where it is.
    return Bridge.boot_transformers(name, hf_model=hf, tokenizer=tokenizer,
                                    hf_config_overrides={"architectures": [type(hf).__name__]},
                                    device=str(weight.device), dtype=weight.dtype)


@contextmanager
def steer(bridge, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Add ``vector`` to block ``layer``'s output on every forward, prefill and each decode step."""

    def add(resid: torch.Tensor, hook) -> torch.Tensor:
        return resid + vector.to(device=resid.device, dtype=resid.dtype)

    with bridge.hooks(fwd_hooks=[(hook_name(layer), add)]):
        yield


def attach_sae(bridge, sae: QwenScopeSAE, *, use_error_term: bool = False):
    """Attach ``sae`` (its SAELens view, no copy) at its block's output on an ``SAETransformerBridge``.

    With ``use_error_term=True`` the model's output is unchanged and the SAE's hooks only observe.
    """
    if sae.cfg.layer is None:
        raise BootError("this SAE has no layer; load it with load_sae(release, layer) or QwenScopeSAE.from_file(..., "
                        "layer=n)")
    register()  # SAELens' fixes, for an SAE bridge built without boot(saes=True)
    view = sae.to_sae_lens()
    view.use_error_term = use_error_term
    view.cfg.metadata.hook_name = hook_name(sae.cfg.layer)
    bridge.add_sae(view, use_error_term=use_error_term)
    return view


def load_hooked(model: str, *, hf_model: nn.Module | None = None, tokenizer=None, sae_hooks: bool = False,
                **kwargs: Any):
    """Classic ``HookedTransformer`` (or ``HookedSAETransformer``) for dense Qwen3 checkpoints.

    TransformerLens 3.9 lists neither ``Qwen3-1.7B-Base`` nor ``Qwen3-8B-Base`` (the backbones Qwen-Scope pairs
    with) and refuses local folders; this registers the name and resolves the config from the local folder or
    cache. MoE and Qwen3.5 have no HookedTransformer implementation: use :func:`boot`.
    """
    from transformers import AutoConfig

    cfg = hf_model.config if hf_model is not None else AutoConfig.from_pretrained(model)
    arch = (cfg.architectures or [type(hf_model).__name__ if hf_model is not None else "?"])[0]
    if arch != "Qwen3ForCausalLM":
        raise BootError(f"{model!r} is {arch}; classic HookedTransformer supports only dense Qwen3. Use "
                        "qscope_plugin.adapters.transformer_lens.boot(...) (TransformerBridge) for MoE and Qwen3.5")
    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens import supported_models

    for names in (supported_models.OFFICIAL_MODEL_NAMES, loading.OFFICIAL_MODEL_NAMES):
        if model not in names:
            names.append(model)
    if sae_hooks:
        from sae_lens import HookedSAETransformer as Hooked
    else:
        from transformer_lens import HookedTransformer as Hooked
    tok = copy.deepcopy(tokenizer) if tokenizer is not None else _tokenizer(model, None)
    return Hooked.from_pretrained_no_processing(model, hf_model=hf_model, tokenizer=tok, **kwargs)


def _is_bridge(obj: object) -> bool:
    bridge = sys.modules.get("transformer_lens.model_bridge.bridge")  # no bridge can exist before it is imported
    return bridge is not None and isinstance(obj, bridge.TransformerBridge)


class BridgeBackend(Backend):
    """A ``TransformerBridge`` for recipes: logits and generation through the bridge's own forward and loop."""

    def __init__(self, bridge) -> None:
        super().__init__(bridge, bridge.original_model)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               last: int | None = None) -> torch.Tensor:
        mask = None if attention_mask is None else attention_mask.to(self.device)
        out = self.model(input_ids.to(self.device), return_type="logits", attention_mask=mask)
        return out[:, -last:] if last else out  # the bridge's forward always unembeds every position

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        ids = input_ids.to(self.device)
        mask = None if attention_mask is None else attention_mask.to(self.device)
        out = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p if do_sample and top_p < 1 else None, use_past_kv_cache=True,
                                  return_type="tokens", verbose=False, eos_token_id=eos_token_id,
                                  attention_mask=mask)  # eos None: the bridge's tokenizer's EOS, as HF's default
        return out[:, ids.shape[1]:]


register_backend(_is_bridge, BridgeBackend)
