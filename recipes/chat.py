"""A chat model as the text-in, text-out callables of safety synthesis (explainer, judge, generators).

    >>> chat = ChatModel(model, tok)                  # a local model: chat template applied, <think> blocks stripped
    >>> chat = ChatModel(llm=OpenAIChat("http://127.0.0.1:8000/v1"))   # or any client of qscope_plugin.llm
    >>> chat.judge()("mentions weapons")              # the judge template's answer, read by parse_score
    >>> targets = build_targets(model, tok, saes, features, corpus, chat.explainer(), chat.judge())

Kept apart from ``safety_synthesis`` because the method only needs callables; any other model or API can stand in.
The clients, their cache and retry policy, and the ``parse_*`` answer readers live in ``qscope_plugin.llm`` (shared
with feature explanations); they are re-exported here for existing imports.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from qscope_plugin.llm import LLM, LLMError, LocalChat, parse_category, parse_score, strip_thinking
from qscope_plugin.recipes.discovery import Context
from qscope_plugin.recipes.safety_synthesis import (
    RISK_CATEGORIES,
    TEMPLATES,
    Explainer,
    Generators,
    Judge,
    SynthesisError,
)

__all__ = ["ChatModel", "parse_category", "parse_score", "strip_thinking"]


class ChatModel:
    """The safety-synthesis templates over one text-in, text-out client of ``qscope_plugin.llm``.

    ``ChatModel(model, tokenizer, ...)`` wraps a local model in a ``LocalChat`` (options as there); ``llm=`` takes
    any client instead (e.g. ``OpenAIChat``), with its cache and concurrency.
    """

    def __init__(self, model=None, tokenizer=None, *, max_new_tokens: int = 64, templates: str | Path = TEMPLATES,
                 chat_template: bool | None = None, enable_thinking: bool = False,
                 categories: Sequence[str] = RISK_CATEGORIES, llm: LLM | None = None) -> None:
        templates = Path(templates)
        if not templates.is_dir():
            raise SynthesisError(f"templates {str(templates)!r} is not a folder; copy the installed {TEMPLATES} and "
                                 "edit the copy")
        if (llm is None) == (model is None):
            raise SynthesisError("pass either a model and its tokenizer, or llm= (a qscope_plugin.llm client)")
        if llm is None:
            try:
                llm = LocalChat(model, tokenizer, max_new_tokens=max_new_tokens, chat_template=chat_template,
                                enable_thinking=enable_thinking)
            except LLMError as e:
                raise SynthesisError(str(e)) from None
        self.llm, self.templates, self.categories = llm, templates, tuple(categories)

    def render(self, text: str) -> str:
        """The exact text a local model is given for a prompt (an HTTP endpoint applies its own template)."""
        return self.llm.render(text) if isinstance(self.llm, LocalChat) else text

    def __call__(self, text: str, *, sample_seed: int | None = None) -> str:
        """The client's answer: greedy; with ``sample_seed``, seeded sampling (temperature 1, top-p 0.95)."""
        return self.llm(text, sample_seed=sample_seed)

    def template(self, name: str) -> str:
        return (self.templates / f"{name}.txt").read_text(encoding="utf-8")

    def provenance(self) -> dict:
        """How this model writes: decoding settings and a hash of the template files, for synthesized rows."""
        digest = hashlib.sha256()
        for path in sorted(self.templates.glob("*.txt")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        settings = self.llm.settings()
        return {"chat_model": settings.pop("model"), **settings, "templates": str(self.templates),
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
