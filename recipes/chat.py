"""A local chat model as the text-in, text-out callables of safety synthesis (explainer, judge, generators).

    >>> chat = ChatModel(model, tok)                  # chat template applied, <think> blocks stripped
    >>> chat.judge()("mentions weapons")              # the judge template's answer, read by parse_score
    >>> targets = build_targets(model, tok, saes, features, corpus, chat.explainer(), chat.judge())

Kept apart from ``safety_synthesis`` because the method only needs callables; any other model or API can stand in.
The ``parse_*`` functions read free-text answers, so they serve any chat model, not only this one.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from qscope_plugin.backends import as_backend
from qscope_plugin.recipes.discovery import Context
from qscope_plugin.recipes.safety_synthesis import (
    RISK_CATEGORIES,
    TEMPLATES,
    Explainer,
    Generators,
    Judge,
    SynthesisError,
)

_THINK = re.compile(r"<think>.*?</think>|<think>.*\Z", re.DOTALL)
_NUMBER = re.compile(r"(?<![\w.\-])(\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*(\d+(?:\.\d+)?)|\s*(%))?")
_SCALE = re.compile(r"(?<![\w.])0(?:\.0+)?\s*(?:-|–|to|and)\s*1(?:\.0+)?(?![\w.%/])", re.IGNORECASE)
"""An echo of the scale ("between 0 and 1", "0-1", "0 to 1"), which is not a score."""


def strip_thinking(text: str) -> str:
    """Drop ``<think>...</think>`` blocks (and an unclosed ``<think>`` cut off by the token limit) from an answer."""
    return _THINK.sub("", text).strip()


def parse_score(answer: str) -> float:
    """The judge's relevance s ∈ [0, 1] from a free-text answer, after ``strip_thinking``.

    Numbers are read in order; the first usable one wins: ``x/N`` (e.g. "8/10") gives x/N, ``x%`` gives x/100,
    and a bare number counts only if it lies in [0, 1]. Out-of-range and negative numbers ("8", "2024", "-0.4")
    are skipped, never clipped, and so is an echo of the scale ("0 to 1: 0.8" gives 0.8); an answer with no
    usable number scores 0.
    """
    for m in _NUMBER.finditer(_SCALE.sub(" ", strip_thinking(answer))):
        value = float(m.group(1))
        if m.group(2) is not None:
            denominator = float(m.group(2))
            value = value / denominator if denominator > 0 else -1.0
        elif m.group(3):
            value /= 100
        if 0.0 <= value <= 1.0:
            return value
    return 0.0


def parse_category(answer: str, categories: Sequence[str], default: str = "uncategorized") -> str:
    """The listed category named earliest in the answer (after ``strip_thinking``; case-insensitive, whole words,
    the longer name on a tie), else ``default``, which counts as harmful (a refusal) in ``synthesize``."""
    text, best = strip_thinking(answer).lower(), None
    for category in categories:
        m = re.search(rf"(?<![\w-]){re.escape(category.lower())}(?![\w-])", text)
        if m and (best is None or (m.start(), -len(category)) < best[0]):
            best = ((m.start(), -len(category)), category)
    return best[1] if best else default


class ChatModel:
    """A local ``transformers`` causal LM as the text-in, text-out callable every pluggable piece needs.

    Each prompt goes in as one user turn through the tokenizer's chat template when it has one (``chat_template``
    None = auto; False = raw text always), rendered with ``enable_thinking`` (default False, so Qwen3 templates
    skip the reasoning block; other templates ignore it). Answers are decoded without ``<think>`` blocks.
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 64, templates: str | Path = TEMPLATES,
                 chat_template: bool | None = None, enable_thinking: bool = False,
                 categories: Sequence[str] = RISK_CATEGORIES) -> None:
        templates = Path(templates)
        if not templates.is_dir():
            raise SynthesisError(f"templates {str(templates)!r} is not a folder; copy the installed {TEMPLATES} and "
                                 "edit the copy")
        self.model, self.tokenizer, self.max_new_tokens, self.templates = model, tokenizer, max_new_tokens, templates
        self.backend = as_backend(model)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise SynthesisError("chat_template=True but the tokenizer has no chat template; pass None or False")
        self.chat_template = has_template if chat_template is None else chat_template
        self.enable_thinking, self.categories = enable_thinking, tuple(categories)

    def render(self, text: str) -> str:
        """The exact text the model is given for a prompt."""
        if not self.chat_template:
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=self.enable_thinking)

    def __call__(self, text: str, *, sample_seed: int | None = None) -> str:
        """Greedy decoding; with ``sample_seed``, seeded sampling (the global torch RNG is left as it was)."""
        import torch

        ids = self.tokenizer(self.render(text), return_tensors="pt", add_special_tokens=False)["input_ids"]
        sampling = {}
        with torch.random.fork_rng(devices=[self.backend.device] if self.backend.device.type == "cuda" else []):
            if sample_seed is not None:
                torch.manual_seed(sample_seed)
                sampling = {"do_sample": True, "temperature": 1.0, "top_p": 0.95}
            new = self.backend.generate(ids, max_new_tokens=self.max_new_tokens,
                                        pad_token_id=self.tokenizer.pad_token_id, **sampling)[0].tolist()
        end = self.tokenizer.convert_tokens_to_ids("</think>")
        if isinstance(end, int) and end != self.tokenizer.unk_token_id and end in new:
            new = new[len(new) - new[::-1].index(end):]  # after the last </think>, even if decode would drop it
        return strip_thinking(self.tokenizer.decode(new, skip_special_tokens=True))

    def template(self, name: str) -> str:
        return (self.templates / f"{name}.txt").read_text(encoding="utf-8")

    def provenance(self) -> dict:
        """How this model writes: decoding settings and a hash of the template files, for synthesized rows."""
        digest = hashlib.sha256()
        for path in sorted(self.templates.glob("*.txt")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return {"chat_model": self.backend.name,
                "max_new_tokens": self.max_new_tokens, "chat_template": self.chat_template,
                "enable_thinking": self.enable_thinking, "templates": str(self.templates),
                "templates_sha256": digest.hexdigest()}

    def explainer(self) -> Explainer:
        def explain(contexts: Sequence[Context]) -> str:
            examples = "\n".join(f"- {c.snippet}" for c in contexts)
            return self(self.template("explain").format(examples=examples)) or "(no explanation)"

        return explain

    def judge(self) -> Judge:
        """Scores an explanation with the ``judge`` template; the answer is read by ``parse_score``."""

        def score(explanation: str) -> float:
            return parse_score(self(self.template("judge").format(explanation=explanation)))

        return score

    def categorizer(self, categories: Sequence[str] | None = None,
                    default: str = "uncategorized") -> Callable[[str], str]:
        """Risk category of an explanation among ``categories`` (default: this model's list, ``RISK_CATEGORIES``)
        with the ``categorize`` template; the answer is read by ``parse_category``. For ``build_targets``."""
        names = tuple(categories or self.categories)

        def categorize(explanation: str) -> str:
            prompt = self.template("categorize").format(explanation=explanation, categories=", ".join(names))
            return parse_category(self(prompt), names, default)

        return categorize

    def generators(self, *, sample: bool = True, seed: int = 0) -> Generators:
        """The four generators on this model's templates.

        With ``sample`` (default), prompts are drawn as the random-synthesis baseline draws its own (temperature 1,
        top-p 0.95), so the comparison differs in guidance and verification, not in decoding. Each draw's seed is
        derived from ``seed`` and the generator's input, so runs are reproducible and a resumed run regenerates
        nothing differently. ``sample=False`` decodes greedily. Responses are always greedy.
        """

        def draw(text: str) -> str:
            return self(text, sample_seed=zlib.crc32(f"{seed}/{text}".encode()) if sample else None)

        return Generators(
            vanilla=lambda explanation: draw(self.template("vanilla").format(explanation=explanation)),
            adversarial=lambda prompt, style: draw(self.template("adversarial").format(prompt=prompt, style=style)),
            response=lambda prompt, label: self(self.template(f"response_{label}").format(prompt=prompt)),
            random=lambda i: self(self.template("random"), sample_seed=i),
        )
