"""Code-switch ratio (R28) and the ablation check of report §7: does a language feature cause the switch?

    >>> report = code_switch_ratio(model, tok, english_prompts, languages=["zh"])
    >>> report.ratios["zh"], report.completions[0].first_switch          # r, token index of the first Han token
    >>> check = ablation_check(model, tok, english_prompts, saes, language="zh", feature=28, control_feature=7)
    >>> check.baseline, check.ablated, check.control                        # r before / after E6 at the switch

A completion "contains language l" when the detector says so. The default detector reads Unicode scripts (Han,
Hangul, kana, Cyrillic, Latin, Arabic, ...), which tells apart languages with different scripts only; pass any
``detector(text, language) -> bool`` (e.g. a fastText language-ID model) for the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qscope_plugin.backends import Backend, as_backend
from qscope_plugin.errors import QScopeError
from qscope_plugin.recipes._harvest import check_texts, pad, pad_id, tokenize
from qscope_plugin.sae import QwenScopeSAE

Detector = Callable[[str, str], bool]
"""``detector(text, language) -> bool``: does ``text`` contain language ``language``?"""

SCRIPTS = {
    "zh": r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",
    "ja": r"\u3040-\u30ff\u31f0-\u31ff",
    "ko": r"\u1100-\u11ff\u3130-\u318f\uac00-\ud7af",
    "ru": r"\u0400-\u04ff",
    "en": r"A-Za-z\u00c0-\u024f",
    "ar": r"\u0600-\u06ff\u0750-\u077f",
    "he": r"\u0590-\u05ff",
    "el": r"\u0370-\u03ff",
    "th": r"\u0e00-\u0e7f",
    "hi": r"\u0900-\u097f",
}
"""Language tag -> the Unicode ranges of its script (Han for zh, kana for ja, Latin for en, ...)."""
_PATTERNS = {lang: re.compile(f"[{ranges}]") for lang, ranges in SCRIPTS.items()}


class CodeSwitchError(QScopeError, ValueError):
    """A language the detector does not know, or no prompts."""


def script_detector(text: str, language: str) -> bool:
    """True when ``text`` holds a character of ``language``'s script (see ``SCRIPTS``)."""
    pattern = _PATTERNS.get(language)
    if pattern is None:
        raise CodeSwitchError(f"the script detector does not know language {language!r}; known: {sorted(SCRIPTS)}. "
                              "Pass detector=your_function(text, language) for other languages")
    return pattern.search(text) is not None


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    first_switch: dict[str, int | None]
    """Per language l, the index (in ``token_ids``) of the first generated token whose text brings in l."""


@dataclass(frozen=True)
class CodeSwitchReport:
    completions: list[Completion]
    ratios: dict[str, float]
    """r (R28) per language l: the share of completions that contain l."""

    def to_json(self) -> dict:
        return {"ratios": self.ratios, "completions": [vars(c) for c in self.completions]}


def _first_switch(tokenizer, ids: list[int], language: str, detector: Detector) -> int | None:
    """The first token index whose decoded prefix contains ``language`` (decoding prefixes keeps multi-token
    characters whole)."""
    if not detector(tokenizer.decode(ids, skip_special_tokens=True), language):
        return None
    for i in range(len(ids)):
        if detector(tokenizer.decode(ids[: i + 1], skip_special_tokens=True), language):
            return i
    return None


def _generate(backend: Backend, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
              progress: bool, batch_start: dict | None = None) -> list[list[int]]:
    """Greedy continuations of each prompt (left-padded batches, cut after the first EOS); ``batch_start["start"]``
    tells an active edit which prompt its batch's first row is."""
    encoded = tokenize(tokenizer, prompts, max_length=None)
    backend.check_generation(max(map(len, encoded), default=0), max_new_tokens)  # before the first batch runs
    padding = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    out = []
    for start in tqdm(range(0, len(encoded), batch_size), disable=not progress, desc="generate"):
        if batch_start is not None:
            batch_start["start"] = start
        ids, mask, _ = pad(encoded[start : start + batch_size], padding, "left")
        new = backend.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=padding)
        for row in new.tolist():
            out.append(row[: row.index(eos)] if eos is not None and eos in row else row)
    return out


def code_switch_ratio(model: object, tokenizer, prompts: Sequence[str], *, languages: Sequence[str],
                      max_new_tokens: int = 32, detector: Detector = script_detector, batch_size: int = 16,
                      progress: bool = False) -> CodeSwitchReport:
    """r (R28) for each language in ``languages``: greedy completions (through the backend), then the detector.

    Args:
        prompts: prompts whose answer should stay in the prompt's target language.
        languages: the unwanted languages l to look for.
    """
    prompts = check_texts(prompts, "prompts")
    for language in languages:
        detector("", language)  # an unknown tag fails before any generation
    new = _generate(as_backend(model), tokenizer, prompts, max_new_tokens, batch_size, progress)
    return _report(tokenizer, prompts, new, languages, detector)


def _report(tokenizer, prompts: list[str], new: list[list[int]], languages: Sequence[str],
            detector: Detector) -> CodeSwitchReport:
    completions = [Completion(p, tokenizer.decode(ids, skip_special_tokens=True), ids,
                              {lang: _first_switch(tokenizer, ids, lang, detector) for lang in languages})
                   for p, ids in zip(prompts, new, strict=True)]
    ratios = {lang: sum(c.first_switch[lang] is not None for c in completions) / len(completions)
              for lang in languages}
    return CodeSwitchReport(completions, ratios)


@dataclass(frozen=True)
class AblationCheck:
    """r with the language feature ablated (E6) just before each first switch, beside an unrelated feature."""

    layer: int
    feature: int
    control_feature: int
    strength: float
    baseline: float
    ablated: float
    control: float


def ablation_check(model: object, tokenizer, prompts: Sequence[str], saes: dict[int, QwenScopeSAE], *,
                   language: str, feature: int, control_feature: int, layer: int | None = None,
                   strength: float = 8.0, max_new_tokens: int = 32, detector: Detector = script_detector,
                   batch_size: int = 16) -> AblationCheck:
    """Report §7's causal check: h' = h - strength * d_feature (E6) at ``layer`` (default: the final one), only at
    the token just before each completion's first switch into ``language``; r again, and with ``control_feature``.

    Positions are chosen from the ``position_ids`` each layer receives (as steering does), so a batch ablates
    each row at its own position; completions without a switch are not edited.
    """
    prompts = check_texts(prompts, "prompts")
    detector("", language)
    backend = as_backend(model)
    layer = backend.n_layers - 1 if layer is None else backend.check_layers([layer])[0]
    if layer not in saes:
        raise CodeSwitchError(f"no SAE for layer {layer}; pass saes={{{layer}: load_sae(release, {layer})}}")
    base_new = _generate(backend, tokenizer, prompts, max_new_tokens, batch_size, False)
    base = _report(tokenizer, prompts, base_new, [language], detector)
    lengths = [len(ids) for ids in tokenize(tokenizer, prompts, max_length=None)]
    # the token before the first switching token t sits at absolute position plen + t - 1 (it predicts token t)
    where = [-1 if c.first_switch[language] is None else n + c.first_switch[language] - 1
             for c, n in zip(base.completions, lengths, strict=True)]

    def ratio_with(f: int) -> float:
        direction = saes[layer].direction(f).to(backend.device)
        state = {"start": 0}

        def ablate(hidden: torch.Tensor, n: int, kwargs: dict) -> torch.Tensor:
            pos = kwargs["position_ids"]
            pos = (pos[0] if pos.ndim == 3 else pos).expand(hidden.shape[0], -1)
            rows = slice(state["start"], state["start"] + hidden.shape[0])
            target = torch.tensor(where[rows], device=hidden.device)[:, None]
            hit = (pos.to(hidden.device) == target).unsqueeze(-1)
            return (hidden.float() - strength * hit * direction.to(hidden.device)).to(hidden.dtype)

        with backend.edit({layer: ablate}):
            new = _generate(backend, tokenizer, prompts, max_new_tokens, batch_size, False, state)
        return _report(tokenizer, prompts, new, [language], detector).ratios[language]

    return AblationCheck(layer, feature, control_feature, strength, base.ratios[language], ratio_with(feature),
                         ratio_with(control_feature))
