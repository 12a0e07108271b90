"""Language models as text-in, text-out clients: one cache, one concurrency limit and one retry policy for every
LLM use of the project (feature explanations and their scores, safety synthesis' explainer, judge and generators).

    >>> llm = LocalChat(model, tokenizer)                         # a transformers causal LM, chat template applied
    >>> llm = OpenAIChat("http://127.0.0.1:8000/v1", "Qwen/Qwen3-8B", concurrency=8)  # vLLM, SGLang, ollama, ...
    >>> llm = open_llm("http://127.0.0.1:8000/v1")                # the same, from a CLI's --llm value
    >>> llm.use_cache("explain-cache.jsonl")                      # a re-run or a resumed run asks nothing again
    >>> llm("Say hi"), llm.map(["a", "b"], scope=("release", 3, 12))

Every answer is cached under the SHA-256 of ``(scope, model, settings, prompt)``, where ``scope`` is what the prompt is
about (e.g. ``(release, layer, feature)``): the cache file is append-only JSON lines, each answer written and
flushed as soon as it arrives, so a run killed at any moment resumes with every finished answer (a torn last line
is skipped). The HTTP client goes through the official ``openai`` package (``pip install qscope-plugin[explain]``),
which retries 408/409/429/5xx and connection errors with exponential backoff and honours ``Retry-After``;
``max_retries`` and ``timeout`` set that policy, ``concurrency`` bounds the requests in flight.

The ``parse_*`` functions read free-text answers, so they serve any model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qscope_plugin.errors import QScopeError

__all__ = ["LLM", "LLMError", "LocalChat", "OpenAIChat", "ResponseCache", "open_llm", "parse_category",
           "parse_score", "strip_thinking"]

MAX_CONCURRENCY = 256
"""Requests in flight at most: each holds a thread and a connection."""


class LLMError(QScopeError, ValueError):
    """A model or endpoint that cannot be used as asked (bad option, missing chat template, missing extra)."""


class LLMRequestError(QScopeError, OSError):
    """An endpoint that kept failing after every retry (a runtime failure, not a usage error)."""


_THINK = re.compile(r"<think>.*?</think>|<think>.*\Z", re.DOTALL)
_NUMBER = re.compile(r"(?<![\w.\-])(\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*(\d+(?:\.\d+)?)|\s*(%))?")
_SCALE = re.compile(r"(?<![\w.])0(?:\.0+)?\s*(?:-|–|to|and)\s*1(?:\.0+)?(?![\w.%/])", re.IGNORECASE)
"""An echo of the scale ("between 0 and 1", "0-1", "0 to 1"), which is not a score."""


def strip_thinking(text: str) -> str:
    """Drop ``<think>...</think>`` blocks (and an unclosed ``<think>`` cut off by the token limit) from an answer."""
    return _THINK.sub("", text).strip()


def parse_score(answer: str) -> float:
    """A relevance s ∈ [0, 1] from a free-text answer, after ``strip_thinking``.

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
    the longer name on a tie), else ``default``."""
    text, best = strip_thinking(answer).lower(), None
    for category in categories:
        m = re.search(rf"(?<![\w-]){re.escape(category.lower())}(?![\w-])", text)
        if m and (best is None or (m.start(), -len(category)) < best[0]):
            best = ((m.start(), -len(category)), category)
    return best[1] if best else default


class ResponseCache:
    """Answers by key in an append-only JSON-lines file, thread-safe.

    Each answer is one ``{"key", "answer"}`` line written with a single ``write`` and flushed at once: a kill
    can only tear the last line, which loading skips. ``hits`` / ``misses`` count this process' look-ups.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._answers: dict[str, str] = {}
        self.hits = self.misses = 0
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._answers[str(row["key"])] = str(row["answer"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill, or not ours: asked again
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> str | None:
        with self._lock:
            answer = self._answers.get(key)
            if answer is None:
                self.misses += 1
            else:
                self.hits += 1
            return answer

    def put(self, key: str, answer: str) -> None:
        line = json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n"
        with self._lock:
            self._answers[key] = answer
            with open(self.path, "a", encoding="utf-8") as f:
                if f.tell() and not self._ends_with_newline():
                    f.write("\n")  # after a torn line: start a fresh one
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


class LLM:
    """A text-in, text-out model with a cache and a concurrency limit; subclasses implement ``_complete``."""

    name: str = "llm"
    concurrency: int = 1

    def __init__(self) -> None:
        self.cache: ResponseCache | None = None
        self.calls = 0
        """Prompts this process sent to the model (cache hits excluded)."""

    def settings(self) -> dict:
        """What besides the prompt shapes an answer (model, decoding): part of each cache key and of provenance."""
        return {"model": self.name}

    def use_cache(self, cache: str | Path | ResponseCache | None) -> LLM:
        """Keep answers in ``cache`` (a JSON-lines file, shared by clients); ``None`` turns caching off."""
        self.cache = cache if cache is None or isinstance(cache, ResponseCache) else ResponseCache(cache)
        return self

    def key(self, prompt: str, scope: Sequence = (), sample_seed: int | None = None) -> str:
        payload = [list(scope), self.settings(), sample_seed, prompt]
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def __call__(self, prompt: str, *, scope: Sequence = (), sample_seed: int | None = None) -> str:
        """The model's answer (``<think>`` blocks removed); greedy, or seeded sampling with ``sample_seed``."""
        key = self.key(prompt, scope, sample_seed) if self.cache is not None else ""
        if self.cache is not None and (cached := self.cache.get(key)) is not None:
            return cached
        answer = strip_thinking(self._complete(prompt, sample_seed))
        self.calls += 1
        if self.cache is not None:
            self.cache.put(key, answer)
        return answer

    def map(self, prompts: Sequence[str], *, scope: Sequence = (), scopes: Sequence[Sequence] | None = None,
            progress: str | None = None) -> list[str]:
        """Answers to ``prompts`` in order, at most ``concurrency`` in flight, each cached as it arrives.

        ``scopes`` gives each prompt its own scope (default: ``scope`` for all); ``progress`` names a progress bar.
        """
        from tqdm.auto import tqdm

        scopes = [scope] * len(prompts) if scopes is None else list(scopes)
        if len(scopes) != len(prompts):
            raise LLMError(f"{len(scopes)} scopes for {len(prompts)} prompts; pass one scope per prompt")
        bar = tqdm(total=len(prompts), desc=progress, disable=progress is None, unit="prompt")
        answers: list[str] = [""] * len(prompts)

        def ask(i: int) -> None:
            answers[i] = self(prompts[i], scope=scopes[i])
            bar.update()

        try:
            if self.concurrency <= 1 or len(prompts) <= 1:
                for i in range(len(prompts)):
                    ask(i)
            else:
                with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
                    futures = [pool.submit(ask, i) for i in range(len(prompts))]
                    try:
                        for done in futures:
                            done.result()  # the first failure raises; answers so far are already cached
                    except BaseException:
                        pool.shutdown(wait=True, cancel_futures=True)  # no new request after a failure
                        raise
        finally:
            bar.close()
        return answers

    def _complete(self, prompt: str, sample_seed: int | None) -> str:
        raise NotImplementedError


class LocalChat(LLM):
    """A local ``transformers`` causal LM (or any model ``backends.as_backend`` takes).

    Each prompt goes in as one user turn through the tokenizer's chat template when it has one (``chat_template``
    None = auto; False = raw text always), rendered with ``enable_thinking`` (default False, so Qwen3 templates
    skip the reasoning block; other templates ignore it). Runs one prompt at a time (one model, one device).
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 64, chat_template: bool | None = None,
                 enable_thinking: bool = False, name: str | None = None) -> None:
        from qscope_plugin.backends import as_backend

        super().__init__()
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.backend = as_backend(model)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise LLMError("chat_template=True but the tokenizer has no chat template; pass None or False")
        self.chat_template = has_template if chat_template is None else chat_template
        self.enable_thinking = enable_thinking
        self.name = name or self.backend.name or type(self.backend.module).__name__
        self._lock = threading.Lock()

    def settings(self) -> dict:
        return {"model": self.name, "max_new_tokens": self.max_new_tokens, "chat_template": self.chat_template,
                "enable_thinking": self.enable_thinking}

    def render(self, text: str) -> str:
        """The exact text the model is given for a prompt."""
        if not self.chat_template:
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=self.enable_thinking)

    def _complete(self, prompt: str, sample_seed: int | None) -> str:
        """Greedy decoding; with ``sample_seed``, seeded sampling (the global torch RNG is left as it was)."""
        import torch

        tok = self.tokenizer
        ids = tok(self.render(prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
        self.backend.check_generation(ids.shape[1], self.max_new_tokens)
        sampling = {}
        with self._lock, torch.random.fork_rng(
                devices=[self.backend.device] if self.backend.device.type == "cuda" else []):
            if sample_seed is not None:
                torch.manual_seed(sample_seed)
                sampling = {"do_sample": True, "temperature": 1.0, "top_p": 0.95}
            new = self.backend.generate(ids, max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id,
                                        **sampling)[0].tolist()
        end = tok.convert_tokens_to_ids("</think>")
        if isinstance(end, int) and end != tok.unk_token_id and end in new:
            new = new[len(new) - new[::-1].index(end):]  # after the last </think>, even if decode would drop it
        return tok.decode(new, skip_special_tokens=True)


class OpenAIChat(LLM):
    """Any OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp server, ollama, ``transformers serve``).

    ``model`` None asks the endpoint for its first listed model. ``api_key`` defaults to ``OPENAI_API_KEY`` (local
    servers take any value). Retries (429, 5xx, timeouts, dropped connections) and their exponential backoff are
    the ``openai`` client's; after ``max_retries`` the call raises ``LLMRequestError``.
    """

    def __init__(self, base_url: str, model: str | None = None, *, concurrency: int = 4, max_retries: int = 4,
                 timeout: float = 120.0, max_tokens: int = 128, temperature: float = 0.0,
                 api_key: str | None = None, enable_thinking: bool = False) -> None:
        try:
            import openai
        except ImportError:
            raise LLMError("an HTTP --llm needs the `openai` package; pip install 'qscope-plugin[explain]'") from None
        super().__init__()
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY:
            raise LLMError(f"concurrency={concurrency!r}; expected 1..{MAX_CONCURRENCY} requests in flight")
        if not (isinstance(max_retries, int) and 0 <= max_retries <= 20) or not 0 < timeout <= 3600:
            raise LLMError(f"max_retries={max_retries!r}, timeout={timeout!r}; expected 0..20 retries and a timeout "
                           "in (0, 3600] seconds")
        self.base_url, self.concurrency, self.max_tokens, self.temperature = base_url, concurrency, max_tokens, \
            temperature
        self.enable_thinking = enable_thinking
        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"),
                                    max_retries=max_retries, timeout=timeout)
        self.name = model or self._first_model()

    def _first_model(self) -> str:
        try:
            listed = [m.id for m in self.client.models.list()]
        except self._openai.OpenAIError as e:
            raise LLMRequestError(f"cannot list the models of {self.base_url} ({type(e).__name__}: {e}); start the "
                                  "server, or name the model (--llm-model)") from None
        if not listed:
            raise LLMRequestError(f"{self.base_url} lists no model; name one (--llm-model)")
        return listed[0]

    def settings(self) -> dict:
        return {"model": self.name, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "enable_thinking": self.enable_thinking}

    def _complete(self, prompt: str, sample_seed: int | None) -> str:
        sampling = ({"temperature": 1.0, "top_p": 0.95, "seed": sample_seed} if sample_seed is not None
                    else {"temperature": self.temperature})
        try:
            reply = self.client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": prompt}], max_tokens=self.max_tokens,
                extra_body={"chat_template_kwargs": {"enable_thinking": self.enable_thinking}}, **sampling)
        except self._openai.BadRequestError as e:
            detail = " ".join(e.response.text.split())[:500]
            raise LLMError(f"{self.base_url} refused the request for model {self.name!r} ({e.status_code}: {detail}); "
                           "shorten the prompts (fewer or shorter contexts) or check the model name") from None
        except self._openai.OpenAIError as e:
            raise LLMRequestError(f"{self.base_url} failed after {self.client.max_retries} retries "
                                  f"({type(e).__name__}: {e}); rerun to resume from the cache") from None
        return reply.choices[0].message.content or ""


def open_llm(spec: str, *, model: str | None = None, device: str | None = None, concurrency: int = 4,
             max_new_tokens: int = 128, timeout: float = 120.0, max_retries: int = 4) -> LLM:
    """The client a CLI's ``--llm`` names: an ``http(s)://`` URL (an OpenAI-compatible ``/v1`` endpoint, ``model``
    its model name) or a local model folder / cached hub id loaded with transformers."""
    if re.match(r"https?://", spec):
        return OpenAIChat(spec, model, concurrency=concurrency, timeout=timeout, max_retries=max_retries,
                          max_tokens=max_new_tokens)
    from qscope_plugin.models import load_model

    loaded, tokenizer = load_model(spec, device=device)
    return LocalChat(loaded, tokenizer, max_new_tokens=max_new_tokens, name=model or Path(spec).name)
