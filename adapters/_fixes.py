"""WARNING: these functions patch upstream classes for the whole process (as TransformerLens' own compat shims do).

One function per upstream defect that breaks Qwen3 / Qwen3.5 with transformers 5.x today (docs/upstream.md §2).
Each one:
- is applied only when the defect is detected (by probing behaviour or code, never by version strings);
- is idempotent: it returns True when it patched, False when nothing was needed or it already ran;
- is named after what it fixes, and says when it can be deleted.
``tests/adapters/test_fixes.py`` reproduces each defect without its fix.
"""

from __future__ import annotations

import functools
import inspect
import sys
from types import SimpleNamespace
from typing import Any

import torch

_PATCHED = "_qscope_fix"


def _already(func: Any) -> bool:
    return getattr(func, _PATCHED, False)


def fix_tl_bridge_kv_cache_kwarg() -> bool:
    """Make TransformerLens' attention bridge use the KV cache that transformers 5 passes as ``cache=``.

    Symptom: ``bridge.generate()`` with the default KV cache gives silently wrong tokens on every Qwen family:
        each decode step attends only to itself (logit drift 0.2–0.75 from step 1 on).
    Detected by: calling ``AttentionBridge._update_kv_cache`` with a probe passed as ``cache=``; the defect is
        present when the probe's ``update`` is never called.
    Upstream: TransformerLens 3.9 / 4.3 ``AttentionBridge._update_kv_cache`` reads only ``past_key_values`` /
        ``layer_past``; transformers 5.x decoder layers pass ``cache`` (``past_key_values`` is a deprecated
        alias until 5.40). No upstream issue or PR found; the code path came with
        https://github.com/TransformerLensOrg/TransformerLens/pull/1232 (KV cache for AttentionBridge).
        Details and measurements: docs/upstream.md §2.3.
    Remove when: the probe sees ``update`` called without the patch.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache
    if _already(original) or not _kv_cache_kwarg_ignored(original):
        return False

    @functools.wraps(original)
    def _update_kv_cache(self, k, v, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return original(self, k, v, **kwargs)

    setattr(_update_kv_cache, _PATCHED, True)
    AttentionBridge._update_kv_cache = _update_kv_cache
    return True


def _kv_cache_kwarg_ignored(update_kv_cache) -> bool:
    calls = []

    class Probe:
        def update(self, k, v, layer_idx):
            calls.append(layer_idx)
            return k, v

    # real (empty) tensors: under runtime type checking (jaxtyping + beartype) ``k: torch.Tensor`` rejects None
    empty = torch.empty(1, 1, 0, 1)
    update_kv_cache(SimpleNamespace(_layer_idx=0, name="probe"), empty, empty, cache=Probe())
    return not calls


def fix_tl_gated_delta_net_functions() -> bool:
    """Let TransformerLens' GatedDeltaNet bridge run Qwen3.5's linear-attention layers on transformers 5.24.

    Symptom: every Qwen3.5 / Qwen3.5-MoE forward through the bridge crashes with ``AttributeError:
        'Qwen3_5GatedDeltaNet' object has no attribute 'causal_conv1d_fn'``; and cached generation, which
        transformers now signals with ``cache=``, is not recognised (the bridge looks for ``cache_params``).
    Detected by: the bridge's prefill path reading ``hf.chunk_gated_delta_rule`` while transformers' module no
        longer defines it (it became a module-level function with a torch fallback).
    Upstream: TransformerLens 3.9 ``GatedDeltaNetBridge`` (``gated_delta_net.py``); 4.3 fixes the attribute
        crash (``_resolve_hf_fn``) but still keys generation on ``cache_params``. No upstream issue or PR found;
        TransformerLens 4 needs https://github.com/decoderesearch/SAELens/issues/738 (sae-lens on TL 4) first.
        Details: docs/upstream.md §2.4.
    Remove when: transformer-lens >= 4 is usable with sae-lens and the generation check accepts ``cache``.
    """
    from transformer_lens.model_bridge.generalized_components.gated_delta_net import GatedDeltaNetBridge

    original = GatedDeltaNetBridge.forward
    if _already(original) or not _gated_delta_net_functions_missing(GatedDeltaNetBridge):
        return False

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        hf = self.original_component
        if hf is not None and not hasattr(hf, "chunk_gated_delta_rule"):
            modeling = sys.modules[type(hf).__module__]
            hf.causal_conv1d_fn = None  # the bridge then uses the module's own conv1d + SiLU
            hf.chunk_gated_delta_rule = modeling.torch_chunk_gated_delta_rule
        if kwargs.get("cache_params") is None and kwargs.get("cache") is not None:
            return self._native_forward(*args, **kwargs)  # generation: HF's recurrent path with its cache
        return original(self, *args, **kwargs)

    setattr(forward, _PATCHED, True)
    GatedDeltaNetBridge.forward = forward
    return True


def _gated_delta_net_functions_missing(bridge_cls) -> bool:
    try:
        from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling
    except ImportError:
        return False
    reads_attribute = "hf.chunk_gated_delta_rule" in inspect.getsource(bridge_cls._hooked_forward)
    sets_attribute = "self.chunk_gated_delta_rule" in inspect.getsource(modeling.Qwen3_5GatedDeltaNet.__init__)
    return reads_attribute and not sets_attribute and hasattr(modeling, "torch_chunk_gated_delta_rule")


def fix_saelens_bridge_hook_aliases() -> bool:
    """Make ``SAETransformerBridge`` honour hook aliases such as ``blocks.N.hook_resid_post``.

    Symptom: ``run_with_hooks`` / ``hooks()`` with an alias name make zero hook calls and raise nothing;
        ``run_with_cache(names_filter=alias)`` returns an empty cache. Plain ``TransformerBridge`` is fine.
    Detected by: ``SAETransformerBridge.hook_dict`` being overridden without adding the aliases back.
    Upstream: sae-lens 6.54 ``SAETransformerBridge.hook_dict`` rebuilds the dict from ``_hook_registry`` and
        skips TransformerBridge's ``_add_aliases_to_hooks``. No upstream issue or PR found.
        Details: docs/upstream.md §2.5.
    Remove when: that property calls ``_add_aliases_to_hooks``.
    """
    from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge

    prop = SAETransformerBridge.__dict__.get("hook_dict")
    if not isinstance(prop, property) or _already(prop.fget):
        return False
    if "_add_aliases_to_hooks" in inspect.getsource(prop.fget):
        return False
    from transformer_lens.hook_points import HookPoint

    original = prop.fget

    @functools.wraps(original)
    def hook_dict(self):
        hooks = original(self)
        aliases: dict = {}
        self._add_aliases_to_hooks(aliases)
        for alias, hook in aliases.items():
            if isinstance(hook, HookPoint):  # an alias onto an attached SAE stays unresolved, as before
                hooks.setdefault(alias, hook)
        return hooks

    setattr(hook_dict, _PATCHED, True)
    SAETransformerBridge.hook_dict = property(hook_dict)
    return True


def fix_saelens_save_model_non_contiguous() -> bool:
    """Let SAELens' ``save_model`` write a ``TopKSAE`` whose parameters are views (the plugin's zero-copy loads).

    Symptom: ``sae.save_model(path)`` raises ``ValueError: You are trying to save a non contiguous tensor: W_dec``.
    Detected by: a tiny ``TopKSAE`` state dict holding a transposed view, passed through
        ``process_state_dict_for_saving``, is refused by ``safetensors.torch.save``.
    Upstream: sae-lens 6.54 ``SAE.save_model`` hands ``state_dict()`` to safetensors' ``save_file``, which refuses
        non-contiguous tensors, although SAELens itself fills SAEs with ``load_state_dict(assign=True)``.
    Remove when: the probe saves without the patch.
    The copies are made at save time only: the loaded SAE keeps its memory-mapped views.
    """
    from sae_lens import TopKSAE

    original = TopKSAE.process_state_dict_for_saving
    if _already(original) or not _saving_refuses_views(TopKSAE):
        return False

    @functools.wraps(original)
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        original(self, state_dict)
        for key, value in state_dict.items():
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                state_dict[key] = value.contiguous()

    setattr(process_state_dict_for_saving, _PATCHED, True)
    TopKSAE.process_state_dict_for_saving = process_state_dict_for_saving
    return True


def _saving_refuses_views(sae_cls) -> bool:
    from sae_lens import TopKSAEConfig
    from safetensors.torch import save

    sae = sae_cls(TopKSAEConfig(d_in=2, d_sae=2, k=1, device="cpu"))
    state = sae.state_dict()
    state["W_dec"] = state["W_dec"].T
    sae.process_state_dict_for_saving(state)
    try:
        save(state)
    except ValueError:
        return True
    return False


def apply_all() -> dict[str, bool]:
    """Apply every fix whose defect is present; returns which ones patched now."""
    return {fix.__name__: fix() for fix in (fix_tl_bridge_kv_cache_kwarg, fix_tl_gated_delta_net_functions,
                                            fix_saelens_bridge_hook_aliases, fix_saelens_save_model_non_contiguous)}
