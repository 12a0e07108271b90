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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qscope_plugin.adapters._fixes import apply_all
from qscope_plugin.errors import QScopeError
from qscope_plugin.sae import QwenScopeSAE

__all__ = ["attach_sae", "boot", "load_hooked", "register", "steer"]

QWEN_FAMILIES = ("qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe")


class BootError(QScopeError, ValueError):
    """A model that cannot be booted in TransformerLens."""


def register() -> dict[str, bool]:
    """Apply the upstream fixes this installation needs (idempotent)."""
    return apply_all()


def hook_name(layer: int) -> str:
    """Canonical bridge hook of block ``layer``'s output (``hook_resid_post`` aliases it)."""
    return f"blocks.{layer}.hook_out"


def _text_model(model: str | nn.Module, dtype: torch.dtype | None, **hf_kwargs: Any) -> nn.Module:
    """The text-only ``*ForCausalLM``: ``AutoModelForCausalLM`` maps published Qwen3.5 checkpoints to it."""
    if isinstance(model, nn.Module):
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype or torch.float32, **hf_kwargs).eval()


def _tokenizer(model: str | nn.Module, tokenizer) -> Any:
    if tokenizer is not None:
        return copy.deepcopy(tokenizer)  # the bridge sets bos_token on the object it is given
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
    if not name:
        raise BootError("pass tokenizer=... for a model object without a name_or_path")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def boot(model: str | nn.Module, *, saes: bool = False, device: str | None = None, dtype: torch.dtype | None = None,
         tokenizer=None, **hf_kwargs: Any):
    """A ``TransformerBridge`` (``SAETransformerBridge`` with ``saes=True``) for any Qwen3 / Qwen3.5 model.

    Args:
        model: hub id, local folder, or a loaded transformers model (reused, not copied).
        saes: boot SAELens' ``SAETransformerBridge`` so ``run_with_saes`` / ``saes()`` work.
        device, dtype: where and how the bridge runs (default float32 on the model's device).
        tokenizer: used as a copy; by default loaded from the model's folder or hub id.
        hf_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``device_map="auto"``).
    """
    register()
    hf = _text_model(model, dtype, **hf_kwargs)
    family = getattr(hf.config, "model_type", "").removesuffix("_text")
    if family not in QWEN_FAMILIES:
        raise BootError(f"{type(hf).__name__} ({family!r}) is not a Qwen3 / Qwen3.5 model; expected one of "
                        f"{QWEN_FAMILIES}")
    # The adapter is chosen from config.architectures: name the class actually loaded (the text tower), so a
    # published *ForConditionalGeneration checkpoint does not pull in the multimodal adapter (and torchvision).
    hf.config.architectures = [type(hf).__name__]
    if saes:
        from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge as Bridge
    else:
        from transformer_lens.model_bridge import TransformerBridge as Bridge
    name = model if isinstance(model, str) else (hf.config._name_or_path or type(hf).__name__)
    return Bridge.boot_transformers(name, hf_model=hf, tokenizer=_tokenizer(model, tokenizer), device=device,
                                    dtype=dtype or next(hf.parameters()).dtype)


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
