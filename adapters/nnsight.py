"""nnsight adapter: Qwen3 / Qwen3.5 ``LanguageModel``s with Qwen-Scope features, locally or on NDIF.

On the embedded demo (a real model: ``load("Qwen/Qwen3-1.7B-Base")`` with its release's SAEs):

    >>> from qscope_plugin import load_sae
    >>> from qscope_plugin.adapters.nnsight import load, read_features, steered_generate
    >>> from qscope_plugin.models import default_model
    >>> lm, sae = load(default_model()), load_sae("qscope-demo-qwen3-4l", 3)
    >>> with lm.trace("我今天很开心"):
    ...     values, features = read_features(lm, sae)          # inside the trace: (1, T, k) each
    ...     values, features = values.save(), features.save()
    >>> values.shape == features.shape and values.shape[-1] == sae.cfg.k
    True
    >>> ids = steered_generate(lm, "The weather today", 3, -20 * sae.direction(28), max_new_tokens=20)

Loading always passes a tokenizer: nnsight's default lazy (meta) load cannot guess one on transformers 5.x
(docs/upstream.md §3.1). Steering uses a bounded ``tracer.iter[:N]`` and reads the result in its own invoke, so a
generation that reaches EOS early still returns. For remote runs
(``remote=True``, NDIF) only what is needed travels: the decoder columns to steer with and the encoder rows of
the features to read, never whole SAE matrices; ``check_remote`` fails fast, in one clear error, when the hub or
NDIF cannot be reached.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from qscope_plugin.backends import Backend, generation_options, register_backend
from qscope_plugin.errors import QScopeError
from qscope_plugin.hooks import LAYER_PATHS, resolve_layers
from qscope_plugin.models import model_load_error
from qscope_plugin.sae import QwenScopeSAE

__all__ = ["NNsightBackend", "add_vector", "block", "check_remote", "load", "read_features", "residual",
           "steered_generate"]


class RemoteUnavailableError(QScopeError, ConnectionError):
    """NDIF or the Hugging Face hub cannot be used for a remote run."""


def load(model: str | nn.Module, *, tokenizer=None, **kwargs: Any):
    """A working nnsight text-generation model for any Qwen3 / Qwen3.5 model (hub id, local folder or loaded model).

    nnsight >= 0.8.1 gives a ``TransformersModel(..., task="text-generation")``: its ``LanguageModel`` is a deprecated
    alias that warns on every load. Older nnsight, which lacks ``TransformersModel``, gives a ``LanguageModel``.
    ``kwargs`` go to that class (e.g. ``dispatch=True``, ``device_map="auto"``, ``dtype``).
    """
    from transformers import AutoTokenizer

    try:
        from nnsight import TransformersModel
    except ImportError:  # nnsight 0.8.0: LanguageModel is the text-generation class and does not warn
        from nnsight import LanguageModel as TransformersModel
    else:
        kwargs.setdefault("task", "text-generation")
    try:
        if tokenizer is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            tokenizer = AutoTokenizer.from_pretrained(name)
        return TransformersModel(model, tokenizer=tokenizer, **kwargs)
    except OSError as e:  # offline and not cached, a typo, a folder without weights: transformers' raw OSError
        raise model_load_error(model, e) from None


def _layers_path(lm) -> str:
    """Which of the spec's layer paths this model uses (the envoy tree mirrors the module tree)."""
    module = lm._module
    layers = resolve_layers(module)
    for path in LAYER_PATHS:
        obj = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is layers:
            return path
    raise QScopeError("layer list not found on the envoy tree")  # unreachable: resolve_layers found one


def block(lm, layer: int):
    """The envoy of decoder block ``layer``, for the text-only and the multimodal layout alike."""
    envoy = lm
    for part in _layers_path(lm).split("."):
        envoy = getattr(envoy, part)
    return envoy[layer]


def residual(lm, layer: int):
    """Block ``layer``'s output inside a trace: a plain ``(batch, seq, d_model)`` tensor proxy (not ``[0]``)."""
    return block(lm, layer).output


def read_features(lm, sae: QwenScopeSAE, features: list[int] | None = None):
    """Inside a trace: the SAE's ``(values, indices)`` at its layer, or for ``features`` their activations.

    With ``features`` only those encoder rows are used (what a remote run should send), moved to the layer
    output's device and computed in float32: the result is ReLU(pre-activation), which equals z_f whenever f is
    among the top-k (the full TopK needs every row). Without ``features`` the whole SAE encodes on its own device
    (``sae.to(device)`` first to keep a GPU model's activations on the GPU).
    """
    h = residual(lm, sae.cfg.layer)
    if features is None:
        return sae.encode_sparse(h)
    rows, bias = sae.encoder_rows(features)
    return torch.relu(h.float() @ rows.to(h.device).T + bias.to(h.device))


def add_vector(lm, layer: int, vector: torch.Tensor) -> None:
    """Inside a trace: add ``vector`` ``(d_model,)`` in place to every position of block ``layer``'s output.

    The vector is moved to the output's device and cast to its dtype first, so a bfloat16 or GPU model gets
    exactly ``h + vector.to(h)`` as :func:`qscope_plugin.hooks.add_to_residual` gives in plain transformers.
    """
    out = residual(lm, layer)
    out[:] += vector.to(device=out.device, dtype=out.dtype)


def steered_generate(lm, prompt: str, layer: int, vector: torch.Tensor, *, max_new_tokens: int = 20,
                     remote: bool = False, **generate_kwargs: Any) -> torch.Tensor:
    """Greedy generation with ``vector`` added to block ``layer``'s output at every position of every step.

    Only ``vector`` (one d_model column) is sent when ``remote=True``.
    """
    if remote:
        check_remote(lm)
    generate_kwargs.setdefault("do_sample", False)
    with warnings.catch_warnings():
        # A generation that reaches EOS first leaves the loop's next step unreached: expected, not a problem.
        warnings.filterwarnings("ignore", message=".*was never reached", category=UserWarning)
        with lm.generate(max_new_tokens=max_new_tokens, remote=remote, **generate_kwargs) as tracer:
            with tracer.invoke(prompt):
                for _ in tracer.iter[:max_new_tokens]:
                    add_vector(lm, layer, vector)
            # Its own invoke: code after a loop whose last step never comes (EOS) does not run.
            with tracer.invoke():
                ids = tracer.result.save()
    return ids


def _reachable(url: str, timeout: float) -> str | None:
    """None if a TCP connection to ``url``'s host opens within ``timeout`` seconds, else the reason."""
    import socket

    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return str(e) or type(e).__name__


def check_remote(lm_or_id, *, timeout: float = 3.0) -> str:
    """Fail fast, with one clear error, when a remote (NDIF) run cannot work; returns the hub id.

    nnsight first asks the Hugging Face hub about the model (a local path or ``HF_HUB_OFFLINE`` fail there), and
    an unreachable host costs minutes of retries; this checks both hosts with a short timeout first.
    """
    from huggingface_hub import constants, is_offline_mode
    from nnsight import CONFIG

    repo_id = lm_or_id if isinstance(lm_or_id, str) else getattr(lm_or_id._module.config, "_name_or_path", "")
    if not repo_id or Path(repo_id).exists() or repo_id.count("/") != 1:
        raise RemoteUnavailableError(f"remote execution needs a hub model id like 'Qwen/Qwen3-8B-Base', not "
                                     f"{repo_id!r}: NDIF runs models it hosts, not local folders")
    if is_offline_mode():
        raise RemoteUnavailableError("remote execution needs the Hugging Face hub, but HF_HUB_OFFLINE is set; "
                                     "unset it (and TRANSFORMERS_OFFLINE) for remote runs")
    for name, url in (("the Hugging Face hub", constants.ENDPOINT), ("NDIF", CONFIG.API.HOST)):
        reason = _reachable(url, timeout)
        if reason:
            raise RemoteUnavailableError(f"{name} at {url} cannot be reached ({reason}); check the network, or "
                                         "set NDIF_HOST / HF_ENDPOINT, and run locally meanwhile (remote=False)")
    if CONFIG.API.APIKEY is None:
        raise RemoteUnavailableError("no NDIF API key: set NDIF_API_KEY or call nnsight.CONFIG.set_default_api_key()")
    return repo_id


def _is_nnsight(obj: object) -> bool:
    envoy = sys.modules.get("nnsight.intervention.envoy")  # no nnsight model can exist before it is imported
    return envoy is not None and isinstance(obj, envoy.Envoy) and isinstance(getattr(obj, "_module", None), nn.Module)


class NNsightBackend(Backend):
    """An nnsight model for recipes: logits from a ``trace``, generation from nnsight's ``generate``."""

    def __init__(self, lm) -> None:
        super().__init__(lm, lm._module)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               last: int | None = None) -> torch.Tensor:
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(self.device)}
        with self.model.trace(input_ids.to(self.device), logits_to_keep=last or 0, **kwargs):
            out = self.model.output.save()
        return out.logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        ids = input_ids.to(self.device)
        options = generation_options(do_sample, temperature, top_p, eos_token_id, pad_token_id)
        if attention_mask is not None:
            options["attention_mask"] = attention_mask.to(self.device)
        with self.model.generate(ids, max_new_tokens=max_new_tokens, **options) as tracer:
            out = tracer.result.save()
        return out[:, ids.shape[1]:]


register_backend(_is_nnsight, NNsightBackend)
