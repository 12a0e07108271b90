"""Steering with SAE feature directions (report §3, docs/method.md §2.4, E5): h' = h + α · Σ_i c_i · d_i at block n.

    >>> spec = SteeringSpec.single(layer=3, feature=417, alpha=-8.0, direction_norm="unit")
    >>> with steer(model, spec, saes):                          # HF model, TL bridge or nnsight model
    ...     model.generate(**batch, max_new_tokens=20)
    >>> result = generate(model, tok, "The weather today", spec, saes, max_new_tokens=20)
    >>> print(result.steered.text, result.unsteered.text)

Which positions are steered is decided from the ``position_ids`` each decoder layer receives (absolute positions
of the real tokens, also under left padding, KV caching and speculative decoding), never by counting calls as
the official app does. ``prompt`` = positions before each row's prompt length, ``generated`` = the rest; the prompt
length is re-read at every prefill (a forward starting at position 0), so one ``with steer(...)`` block may run
several prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from qscope_plugin.backends import Backend, as_backend
from qscope_plugin.errors import QScopeError
from qscope_plugin.indices import parse_indices
from qscope_plugin.placement import placed
from qscope_plugin.recipes._harvest import check_texts
from qscope_plugin.sae import QwenScopeSAE
from qscope_plugin.tokens import lone_token_texts, token_texts

Positions = Literal["all", "prompt", "generated"] | Sequence[int]

CHAT_TEMPLATES = {
    "thinking": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "no_thinking": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
}
"""The official app's optional wrappers (docs/method.md §2.5); raw text is the default."""


class SteeringError(QScopeError, ValueError):
    """A steering spec that cannot be applied."""


@dataclass(frozen=True)
class Term:
    """One feature to steer at one layer: add ``alpha · d`` or clamp its SAE activation to ``clamp``."""

    layer: int
    feature: int
    alpha: float = 1.0
    clamp: float | None = None
    """Set the feature's activation z_f to this value (write back (clamp − z_f) · W_dec[:, f]) instead of adding."""

    def __post_init__(self) -> None:
        # a NaN or infinite strength turns every steered residual into NaN, and generation into empty text
        for name in ("alpha", "clamp"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise SteeringError(f"{name}={value!r} for layer {self.layer} feature {self.feature} is not a finite "
                                    f"number; pass a finite {name}, e.g. {name}=-8.0")


@dataclass(frozen=True)
class SteeringSpec:
    terms: tuple[Term, ...]
    direction_norm: Literal["raw", "unit"] = "raw"
    """``raw``: the decoder column as the official app uses it; ``unit``: normalised, α in residual-norm units."""
    positions: Positions = "all"
    """``all`` | ``prompt`` | ``generated`` | explicit absolute positions (a list or range)."""
    prompt_positions: Sequence[int] | None = None
    """With ``all`` or ``prompt``: steer only these prompt positions (the official app's "0,1,5" / "3-7"); under
    ``all`` every generated token is still steered. ``None``: every prompt position."""
    layers: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.terms:
            raise SteeringError("a steering spec needs at least one Term(layer, feature, alpha)")
        if self.direction_norm not in ("raw", "unit"):
            raise SteeringError(f"direction_norm={self.direction_norm!r}; expected 'raw' or 'unit'")
        if isinstance(self.positions, str) and self.positions not in ("all", "prompt", "generated"):
            raise SteeringError(f"positions={self.positions!r}; expected 'all', 'prompt', 'generated' or indices")
        if self.prompt_positions is not None:
            if self.positions not in ("all", "prompt"):
                raise SteeringError(f"prompt_positions go with positions='all' or 'prompt', not {self.positions!r}; "
                                    "pass explicit absolute positions as positions=[...] instead")
            if not self.prompt_positions or min(self.prompt_positions) < 0:
                raise SteeringError(f"prompt_positions={list(self.prompt_positions)!r}; expected one or more "
                                    "indices >= 0, or None for the whole prompt")
        object.__setattr__(self, "layers", tuple(sorted({t.layer for t in self.terms})))

    @classmethod
    def single(cls, layer: int, feature: int, alpha: float, **kwargs) -> SteeringSpec:
        return cls(terms=(Term(layer, feature, alpha),), **kwargs)


def parse_positions(text: str, n_positions: int, subject: str = "the model's context") -> Positions:
    """``"all"``, ``"prompt"``, ``"generated"`` or indices such as ``"0,1,5"``, ``"3-7"``, ``"0,4-6"`` below
    ``n_positions`` (the model's context, or the prompt's length for prompt positions), read by the one bounded
    parser (``indices.parse_indices``): ``0-999999999`` is refused from its ends, never expanded."""
    if isinstance(text, str) and text.strip() in ("all", "prompt", "generated"):
        return text.strip()
    return parse_indices(text, n_positions, what="position", subject=subject, option="positions", all_word=None)


STRENGTH_PRESETS = {"Light": 5.0, "Medium": 20.0, "Strong": 100.0}
"""The official app's strengths on raw decoder columns (docs/method.md §2.4); its Custom default is 5."""
CALIBRATED_PRESETS = {"Light": 0.5, "Medium": 2.0, "Strong": 10.0}
"""Multiples of a Compare difference r that the official app uses instead, when one is known for the feature."""


def strength_presets(difference: float | None = None) -> dict[str, float]:
    """The app's Light / Medium / Strong strengths: fixed, or ``0.5·r, 2·r, 10·r`` for a Compare difference r.

    The official app scales by a firing-rate difference r ∈ [0, 1], which gives tiny strengths (a quirk kept for
    parity, docs/method.md §2.4); ``|r|`` is used, so a feature that fires more on the second text still amplifies.
    A difference of 0 or a non-finite one calibrates nothing: the fixed strengths are returned, never α = 0.
    """
    if difference is None or difference == 0 or not math.isfinite(difference):
        return dict(STRENGTH_PRESETS)
    return {name: factor * abs(difference) for name, factor in CALIBRATED_PRESETS.items()}


def steering_vectors(spec: SteeringSpec, saes: Mapping[int, QwenScopeSAE]) -> dict[int, torch.Tensor]:
    """The summed additive vector ``(d_model,)`` per layer (float32); clamp terms are applied separately."""
    vectors = {}
    for term in spec.terms:
        if term.layer not in saes:
            raise SteeringError(f"no SAE for layer {term.layer}; pass saes={{{term.layer}: load_sae(...)}}")
        if term.clamp is None:
            d = saes[term.layer].direction(term.feature, normalize=spec.direction_norm == "unit")
            vectors[term.layer] = vectors.get(term.layer, 0) + term.alpha * d
    return vectors


def _position_mask(kwargs: dict, hidden: torch.Tensor, spec: SteeringSpec,
                   state: dict) -> torch.Tensor | None:
    """``(batch, seq)`` bool mask of positions to steer, or None for every position."""
    if spec.positions == "all" and spec.prompt_positions is None:
        return None
    pos = kwargs.get("position_ids")
    if pos is None:
        raise SteeringError("this model's decoder layers receive no position_ids; only positions='all' works here")
    pos = pos[0] if pos.ndim == 3 else pos  # multimodal rope passes (3, batch, seq)
    pos = pos.expand(hidden.shape[0], -1).to(hidden.device)
    if not isinstance(spec.positions, str):
        return torch.isin(pos, torch.as_tensor(list(spec.positions), device=hidden.device))
    plen = state.get("prompt_length")
    if plen is None or not state.get("fixed"):
        # A row whose positions start at 0 is a prefill (no past cache): a new prompt, whose length holds until the
        # next prefill. Its last column is a real token even under left padding, whatever positions pads get.
        # Decided on the device with torch.where (no host sync per layer and step).
        fresh = pos[:, -1:] + 1
        if plen is None or plen.shape != fresh.shape:
            plen = fresh  # first forward in the block, or a new batch size: necessarily a prefill
        else:
            plen = torch.where((pos == 0).any(dim=-1, keepdim=True), fresh, plen.to(fresh.device))
        state["prompt_length"] = plen
    plen = torch.as_tensor(plen, device=hidden.device).reshape(-1, 1)
    prompt = pos < plen
    if spec.prompt_positions is not None:
        prompt &= torch.isin(pos, torch.as_tensor(list(spec.prompt_positions), device=hidden.device))
    if spec.positions == "prompt":
        return prompt
    if spec.positions == "all":
        return prompt | (pos >= plen)
    return pos >= plen  # "generated"


@contextmanager
def steer(model: object, spec: SteeringSpec, saes: Mapping[int, QwenScopeSAE], *,
          prompt_length: int | Sequence[int] | None = None) -> Iterator[None]:
    """Apply ``spec`` to every forward of ``model`` inside the block (prefill and each decode step).

    Args:
        model: a transformers model, a TransformerLens bridge, an nnsight model or a ``Backend`` (the edit goes on
            the transformers decoder layers underneath, so all of them steer identically).
        prompt_length: real prompt tokens per row, for ``prompt``/``generated``, fixed for the whole block;
            default: taken afresh from every prefill forward inside the block (one whose positions start at 0,
            i.e. no past cache), so consecutive ``generate`` calls on different prompts each steer their own
            prompt / generated positions.
    """
    vectors = steering_vectors(spec, saes)
    backend = as_backend(model)
    backend.check_layers(spec.layers)
    clamps = [t for t in spec.terms if t.clamp is not None]
    state: dict = {} if prompt_length is None else {"prompt_length": prompt_length, "fixed": True}
    on_device: dict[tuple, torch.Tensor] = {}

    def edit(hidden: torch.Tensor, layer: int, kwargs: dict) -> torch.Tensor:
        mask = _position_mask(kwargs, hidden, spec, state)
        delta = torch.zeros((), device=hidden.device, dtype=torch.float32)
        if layer in vectors:
            key = (layer, hidden.device)
            if key not in on_device:
                on_device[key] = vectors[layer].to(hidden.device)
            delta = delta + on_device[key]
        for term in (t for t in clamps if t.layer == layer):
            sae = placed(saes[layer], hidden)  # a copy beside the layer, made once (qscope_plugin.placement)
            z_f = sae.encode(hidden)[..., term.feature].float().to(hidden.device)
            delta = delta + (term.clamp - z_f).unsqueeze(-1) * sae.direction(term.feature).to(hidden.device)
        if mask is not None:
            delta = delta * mask.unsqueeze(-1)
        return (hidden.float() + delta).to(hidden.dtype)

    with backend.edit(dict.fromkeys(spec.layers, edit)):
        yield


class TokenChoice(NamedTuple):
    token: str
    """The generated token as text, in its sequence (``qscope_plugin.tokens``)."""
    prob: float
    alternatives: list[tuple[str, float]]
    """The most likely other tokens at that step (each shown alone), with their probabilities."""


class Completion(NamedTuple):
    text: str
    token_ids: list[int]
    tokens: list[TokenChoice]


class SteeringResult(NamedTuple):
    prompt: str
    steered: Completion
    unsteered: Completion


def format_prompt(prompt: str, chat: Literal["thinking", "no_thinking"] | None) -> str:
    if chat is None:
        return prompt
    if chat not in CHAT_TEMPLATES:
        raise SteeringError(f"chat={chat!r}; expected None (raw text), 'thinking' or 'no_thinking'")
    return CHAT_TEMPLATES[chat].format(prompt=prompt)


@torch.no_grad()
def _score(backend: Backend, tokenizer, prompt_ids: torch.Tensor, new_ids: list[int],
           n_alt: int) -> list[TokenChoice]:
    """Probability of each chosen token and the top alternatives, from one teacher-forced forward of the backend."""
    if not new_ids:
        return []
    ids = torch.cat([prompt_ids, torch.tensor([new_ids], device=prompt_ids.device)], dim=1)
    logits = backend.logits(ids, last=len(new_ids) + 1)[0, :-1].float()  # the positions that predict new_ids
    probs = logits.softmax(-1)
    choices = []
    for step, (tok, shown) in enumerate(zip(new_ids, token_texts(tokenizer, new_ids), strict=True)):
        top = probs[step].topk(n_alt + 1)
        alts = [(int(i), float(p)) for p, i in zip(top.values, top.indices, strict=True) if int(i) != tok][:n_alt]
        texts = lone_token_texts(tokenizer, [i for i, _ in alts])
        choices.append(TokenChoice(shown, float(probs[step, tok]),
                                   [(text, p) for text, (_, p) in zip(texts, alts, strict=True)]))
    return choices


@dataclass(frozen=True)
class Sampling:
    """Seeded sampling instead of greedy decoding; steered and unsteered runs start from the same seed, so they
    differ only by the steering (α = 0 gives the unsteered text)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SteeringError(f"temperature={self.temperature!r}; expected a finite number > 0, e.g. 0.7")
        if not 0 < self.top_p <= 1:
            raise SteeringError(f"top_p={self.top_p!r}; expected a number in (0, 1], e.g. 0.95")


def _continuation(backend: Backend, prompt_ids: torch.Tensor, max_new_tokens: int, eos: int | None,
                  sampling: Sampling | None) -> list[int]:
    """Greedy (or seeded sampled) continuation of one prompt through the backend's own generate, cut after the
    first EOS; sampling leaves the global torch RNG as it was."""
    if sampling is None:
        new = backend.generate(prompt_ids, max_new_tokens=max_new_tokens, eos_token_id=eos)
    else:
        with torch.random.fork_rng(devices=[backend.device] if backend.device.type == "cuda" else []):
            torch.manual_seed(sampling.seed)
            new = backend.generate(prompt_ids, max_new_tokens=max_new_tokens, eos_token_id=eos, do_sample=True,
                                   temperature=sampling.temperature, top_p=sampling.top_p)
    new = new[0].tolist()
    return new[: new.index(eos) + 1] if eos is not None and eos in new else new


def _completion(backend: Backend, tokenizer, prompt_ids: torch.Tensor, max_new_tokens: int,
                top_alternatives: int, sampling: Sampling | None = None) -> Completion:
    new = _continuation(backend, prompt_ids, max_new_tokens, tokenizer.eos_token_id, sampling)
    tokens = _score(backend, tokenizer, prompt_ids, new, top_alternatives)
    return Completion(tokenizer.decode(new, skip_special_tokens=True), new, tokens)


def generate(model: object, tokenizer, prompt: str, spec: SteeringSpec, saes: Mapping[int, QwenScopeSAE], *,
             max_new_tokens: int = 32, chat: Literal["thinking", "no_thinking"] | None = None,
             top_alternatives: int = 3, sampling: Sampling | None = None) -> SteeringResult:
    """Steered and unsteered completions side by side, with per-token probabilities and top alternatives.

    Greedy by default; ``sampling`` draws both from the same seed. The probabilities are the model's own
    (temperature 1), whichever way the tokens were chosen.

    Raises:
        SteeringError: ``spec.prompt_positions`` reach past the prompt.
        ContextLengthError: the prompt plus ``max_new_tokens`` past the model's context.
    """
    (prompt,) = check_texts([prompt], "prompt")
    text = format_prompt(prompt, chat)
    backend = as_backend(model)
    prompt_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(backend.device)
    n_prompt = prompt_ids.shape[1]
    backend.check_generation(n_prompt, max_new_tokens)
    if spec.prompt_positions is not None and max(spec.prompt_positions) >= n_prompt:
        raise SteeringError(f"prompt position {max(spec.prompt_positions)} is past the prompt, which has {n_prompt} "
                            f"tokens (0..{n_prompt - 1}); pass positions inside it or 'all'")
    with steer(backend, spec, saes, prompt_length=n_prompt):
        steered = _completion(backend, tokenizer, prompt_ids, max_new_tokens, top_alternatives, sampling)
    unsteered = _completion(backend, tokenizer, prompt_ids, max_new_tokens, top_alternatives, sampling)
    return SteeringResult(text, steered, unsteered)


@dataclass(frozen=True)
class SweepRow:
    """One strength of a sweep."""

    alpha: float
    steered: Completion
    mean_prob: float
    """Mean probability of the chosen tokens (NaN when nothing was generated); it falls as α derails the model."""


@dataclass(frozen=True)
class Sweep:
    """A strength sweep: every α beside the one unsteered completion they all share."""

    prompt: str
    """The text given to the model (after the ``chat`` wrapper)."""
    unsteered: Completion
    rows: tuple[SweepRow, ...]


def sweep(model: object, tokenizer, prompt: str, layer: int, feature: int, alphas: Sequence[float],
          saes: Mapping[int, QwenScopeSAE], *, max_new_tokens: int = 32,
          chat: Literal["thinking", "no_thinking"] | None = None, top_alternatives: int = 3,
          direction_norm: Literal["raw", "unit"] = "raw", positions: Positions = "all") -> Sweep:
    """Greedy completions of one feature steered at each strength in ``alphas`` (``qscope steer``).

    Same completions as ``generate`` with ``SteeringSpec.single(layer, feature, alpha, direction_norm=...,
    positions=...)`` per α, but the unsteered completion, the same for every α, is generated once.
    """
    if not alphas:
        raise SteeringError("no strengths to sweep; pass alphas, e.g. [-8.0, 0.0, 8.0]")
    specs = [SteeringSpec.single(layer, feature, alpha, direction_norm=direction_norm, positions=positions)
             for alpha in alphas]
    (prompt,) = check_texts([prompt], "prompt")
    text = format_prompt(prompt, chat)
    backend = as_backend(model)
    prompt_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(backend.device)
    backend.check_generation(prompt_ids.shape[1], max_new_tokens)
    rows = []
    for alpha, spec in zip(alphas, specs, strict=True):
        with steer(backend, spec, saes, prompt_length=prompt_ids.shape[1]):
            steered = _completion(backend, tokenizer, prompt_ids, max_new_tokens, top_alternatives)
        probs = [t.prob for t in steered.tokens]
        rows.append(SweepRow(alpha, steered, sum(probs) / len(probs) if probs else float("nan")))
    # after the steered ones: a bad layer or feature fails in steer() before anything is generated
    unsteered = _completion(backend, tokenizer, prompt_ids, max_new_tokens, top_alternatives)
    return Sweep(text, unsteered, tuple(rows))
