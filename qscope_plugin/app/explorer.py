"""What each tab of ``qscope app`` does, without Gradio: inputs as the page sends them, HTML and a status back.

    >>> explorer = Explorer.load()                       # the embedded demo; or Explorer.load(model, release, ...)
    >>> table, status = explorer.analyze("今天早上 the weather", layer=3, top_n=5)
    >>> steered, unsteered, status = explorer.steer("The weather", layer=3, feature=12, preset="Medium")

Every computation is a call into ``qscope_plugin.recipes``; this module checks what the page sent, loads the SAEs
it needs (lazily, through the store's LRU) and turns results into HTML (``views``). Bad input comes back as a
message in the status, never as an exception, so the page shows it and the server keeps serving. One lock
serialises the model: a steering edit must never leak into another request's forward.

Every request's work is bounded before the model runs, so no request costs more than a fixed multiple of a
normal one: each text is measured in tokens and refused past ``max_tokens`` (default: the model's context,
``qscope app --max-tokens``), Compare's layers × tokens past ``max_layer_tokens`` (4 × ``max_tokens``), Steer's
prompt plus new tokens past the model's context, and every count and index range is read by the one bounded
parser (``qscope_plugin.indices``) against what it indexes.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape

from qscope_plugin.app.dashboard import card_html
from qscope_plugin.app.views import analysis_html, comparison_html, completion_html
from qscope_plugin.backends import as_backend
from qscope_plugin.errors import QScopeError, feature_out_of_range, layer_out_of_range
from qscope_plugin.indices import check_count, parse_indices
from qscope_plugin.placement import pin
from qscope_plugin.recipes.discovery import analyze, contrast
from qscope_plugin.recipes.inspection import Corpus, cards_from_corpus, harvest_corpus
from qscope_plugin.recipes.steering import Sampling, SteeringSpec, generate, strength_presets
from qscope_plugin.store import DEFAULT_CACHE, layer_count, load_sae

Differences = dict[tuple[int, int], float]
"""``(layer, feature) -> A − B`` of the last Compare, kept in the page's state to calibrate the Steer presets."""
PRESETS = ("Light", "Medium", "Strong", "Custom")
TOP_CANDIDATES = 10
"""Candidates shown per generated token, as the official app does."""
MAX_NEW_TOKENS = 256
SEARCH_RESULTS = 20
"""Features the search box lists at most."""
DEFAULT_MAX_TOKENS = 2048
"""Tokens per text when the model's config gives no context length."""
LAYER_TOKENS_PER_TEXT = 4
"""Compare's budget of layers × tokens, in texts of ``max_tokens``: four layers of a full-length text."""


class AppInputError(QScopeError, ValueError):
    """A value from the page that cannot be used (an empty choice, a number outside what the app accepts)."""


def status_html(error: Exception) -> str:
    """The error's message on one line, escaped, as the tab's status shows it."""
    message = " ".join(str(error).split()) or type(error).__name__
    return f'<div class="qs-error" role="alert">⚠ {escape(message)}</div>'


def shows_errors(blank: int) -> Callable:
    """Turn the plugin's input errors into ``blank`` empty outputs and a status message for the page.

    Only ``QScopeError`` is caught: the plugin's errors say what was wrong and what to do. Anything else, a
    ``ValueError`` from inside torch included, is a bug and propagates (Gradio logs it and shows its own toast).
    """
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except QScopeError as e:
                return *([""] * blank), status_html(e)
        return run
    return wrap


def _whole(value: object, low: int, high: int) -> int | None:
    """A whole number in ``low..high`` from a page field (Gradio sends floats, or None for an empty field)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
            and value == int(value) and low <= value <= high:
        return int(value)
    return None


def _real(value: object, what: str) -> float:
    """A number from a page field; NaN and infinities pass, for the recipe to refuse with its own message."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise AppInputError(f"{what} {value!r} is not a number; type one, e.g. 1.0")
    return float(value)


def demo_texts() -> list[str]:
    """The demo's own sentences (Chinese, English and mixed): the Feature tab's texts when no --data is given."""
    from qscope_plugin.demo.run import PROMPTS, SENTENCES

    groups = [lines for group in (PROMPTS, SENTENCES) for key, lines in group.items() if key != "_about"]
    return [t for lines in groups for t in ([lines] if isinstance(lines, str) else lines)]


def _layers_of(source: str) -> int:
    n_layers = layer_count(source)
    if n_layers == 0:
        raise AppInputError(f"{source!r} holds no layer{{n}}.sae.pt file; pass a release name (`qscope releases`) "
                            "or a folder of SAE files")
    return n_layers


@dataclass
class Explorer:
    """A backbone, an SAE source (release name or folder) and the texts the Feature tab reads (its cards)."""

    model: object
    tokenizer: object
    source: str
    texts: Sequence[str] = ()
    model_name: str = "a model"
    """How the page names the backbone."""
    max_tokens: int | None = None
    """Longest text (in tokens) any tab takes; None: the model's context (``max_position_embeddings``)."""
    sae_device: str | None = None
    """Where the SAEs encode (``--sae-device``); None: beside each layer (``qscope_plugin.placement``)."""
    n_layers: int = field(init=False)
    max_layer_tokens: int = field(init=False)
    """Compare's bound on layers × tokens of both texts."""
    _max_token_chars: int = field(init=False, repr=False)
    """The longest vocabulary entry: a text longer than ``max_tokens`` of them is refused without tokenizing."""
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _corpora: dict[int, Corpus] = field(default_factory=dict, init=False, repr=False)
    """The Feature tab's harvest of ``texts`` per layer: the texts are fixed, so each layer is harvested once."""
    explanations: Mapping[tuple[int, int], object] = field(default_factory=dict)
    """``(layer, feature) -> recipes.explain.FeatureExplanation`` (``qscope explain``): what the search box searches
    and what the Feature tab's cards show."""

    def __post_init__(self) -> None:
        self.n_layers = _layers_of(self.source)
        context = as_backend(self.model).context_length or DEFAULT_MAX_TOKENS
        if self.max_tokens is None:
            self.max_tokens = context
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise AppInputError(f"max_tokens={self.max_tokens!r}; pass a whole number of tokens >= 1, e.g. {context}")
        self.max_layer_tokens = LAYER_TOKENS_PER_TEXT * self.max_tokens
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        self._max_token_chars = max(map(len, vocab), default=64)

    @classmethod
    def load(cls, model: str | None = None, release: str | None = None, *, device: str | None = None,
             texts: Sequence[str] = (), max_tokens: int | None = None, explanations: str | None = None,
             sae_device: str | None = None) -> Explorer:
        """Load a backbone folder or cached hub id on ``device``; defaults: the embedded demo model, its SAEs and
        its sentences, and texts of at most the model's context. ``explanations``: a ``qscope explain`` file for
        the search box (read before the model)."""
        from qscope_plugin.models import check_device, default_model, default_release, load_model
        from qscope_plugin.recipes.explain import ExplainError, read_explanations

        rows = read_explanations(explanations) if explanations else []
        if other := sorted({r.release for r in rows} - {release or default_release()}):
            raise ExplainError(f"--explanations {explanations!r} explains the SAEs of {', '.join(other)}, not "
                               f"{release or default_release()!r}; pass the file `qscope explain` wrote for them")
        explained = {(r.layer, r.feature): r for r in rows}

        _layers_of(release or default_release())  # a bad release fails before the (slow) model load
        check_device(sae_device)
        backbone, tokenizer = load_model(model or default_model(), device=device)
        name = "the embedded demo model" if model in (None, default_model()) else model
        return cls(backbone, tokenizer, release or default_release(), texts or demo_texts(), model_name=name,
                   max_tokens=max_tokens, explanations=explained, sae_device=sae_device)

    # -- shared checks ---------------------------------------------------------------------------------------
    def _layer(self, value: object) -> int:
        layer = _whole(value, 0, self.n_layers - 1)
        if layer is None:
            raise layer_out_of_range(value, self.n_layers, f"{self.source!r}")
        return layer

    def _tokens(self, text: object, what: str) -> int:
        """The token count of a page's text, refused past ``max_tokens`` before the model sees it.

        A text longer than ``max_tokens`` of the vocabulary's longest entries cannot fit and is refused without
        tokenizing it (tokenizing 100 MB is itself a denial of service); text that is not UTF-8 (an unpaired
        surrogate from a JSON client) is refused with a message, not a tokenizer exception.
        """
        if not isinstance(text, str):
            raise AppInputError(f"{what} is {type(text).__name__}, not text; type a text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise AppInputError(f"{what} holds a character that is not valid Unicode text ({e.reason} at character "
                                f"{e.start}); remove it") from None
        limit = f"the app takes at most {self.max_tokens} tokens per text (`qscope app --max-tokens` changes it)"
        if len(text) > self.max_tokens * self._max_token_chars:
            raise AppInputError(f"{what} is {len(text)} characters, more than {self.max_tokens} tokens; {limit}")
        n_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_tokens > self.max_tokens:
            raise AppInputError(f"{what} is {n_tokens} tokens; {limit}; shorten it")
        return n_tokens

    def _saes(self, layers: Sequence[int]) -> dict:
        return pin({n: load_sae(self.source, n) for n in layers}, self.sae_device)

    def _feature(self, value: object, layer: int) -> int:
        d_sae = self._saes([layer])[layer].cfg.d_sae
        feature = _whole(value, 0, d_sae - 1)
        if feature is None:
            raise feature_out_of_range(value, d_sae, f"the SAE of layer {layer} of {self.source!r}")
        return feature

    # -- tabs ------------------------------------------------------------------------------------------------
    @shows_errors(blank=1)
    def analyze(self, text: str, layer: object, top_n: object = 5) -> tuple[str, str]:
        """Analyze: the ``top_n`` strongest features of every token of ``text`` at ``layer``."""
        layer, top_n = self._layer(layer), check_count(top_n, "top features per token", 1, 64)
        self._tokens(text, "the text")
        saes = self._saes([layer])
        with self._lock:
            rows = analyze(self.model, self.tokenizer, text, saes, top_n=top_n)
        return analysis_html(rows), ""

    def compare(self, text_a: str, text_b: str, first_layer: object, last_layer: object, top_k: object = 5,
                method: str = "rate", exclude_first_token: bool = True, drop_shared_tokens: bool = False,
                drop_common_prefix: bool = False, differences: Differences | None = None,
                ) -> tuple[str, Differences, str]:
        """Compare (R2, the official app; or R1's mean difference): the top-K features per layer of a range, ranked
        by |A − B|. The differences go to the page's state, where they calibrate the Steer presets; bad input
        keeps the previous ones."""
        try:
            n_tokens = 0
            for name, text in (("A", text_a), ("B", text_b)):
                n_tokens += self._tokens(text, f"text {name}")
                if not text.strip():
                    raise AppInputError(f"text {name} is empty; type a text on both sides to compare them")
            first, last = self._layer(first_layer), self._layer(last_layer)
            if first > last:
                raise AppInputError(f"layers {first}..{last} run backwards; put the lower layer first")
            if last - first + 1 > DEFAULT_CACHE.max_layers:
                raise AppInputError(f"layers {first}..{last} are {last - first + 1} SAEs; Compare loads at most "
                                    f"{DEFAULT_CACHE.max_layers} at once (the SAE cache); narrow the range")
            n_layers = last - first + 1
            if n_layers * n_tokens > self.max_layer_tokens:
                raise AppInputError(f"{n_layers} layers × {n_tokens} tokens is more work than one Compare does "
                                    f"({self.max_layer_tokens} layer-tokens: {LAYER_TOKENS_PER_TEXT} × --max-tokens); "
                                    "narrow the layer range or shorten the texts")
            top_k = check_count(top_k, "top-K", 1, 100)
            saes = self._saes(range(first, last + 1))
            with self._lock:
                ranking = contrast(self.model, self.tokenizer, [text_a], [text_b], saes, method=method,
                                   rank_by="abs", top_k=top_k, exclude_first_token=exclude_first_token,
                                   drop_shared_tokens=drop_shared_tokens, drop_common_prefix=drop_common_prefix)
        except QScopeError as e:
            return "", dict(differences or {}), status_html(e)
        found = {(layer, s.feature): s.score for layer, scores in ranking.items() for s in scores}
        return comparison_html(ranking, method), found, ""

    def presets_text(self, layer: object, feature: object, differences: Differences | None = None) -> str:
        """The Light / Medium / Strong strengths Steer would use for this feature, and where they come from."""
        r = (differences or {}).get((_whole(layer, 0, self.n_layers - 1), _whole(feature, 0, 2**31 - 1)))
        shown = " · ".join(f"{name} {value:.4g}" for name, value in strength_presets(r).items())
        if r is None or r == 0 or not math.isfinite(r):
            return f"Presets: {shown} (the official app's fixed strengths; Compare calibrates them)."
        return f"Presets: {shown} (0.5·r, 2·r, 10·r with r = {r:+.4g}, this feature's Compare difference)."

    @shows_errors(blank=2)
    def steer(self, prompt: str, layer: object, feature: object, preset: str = "Light", custom_alpha: object = 5.0,
              direction_norm: str = "raw", positions: str = "all", steer_generated: bool = True,
              decoding: str = "greedy", temperature: object = 1.0, top_p: object = 1.0, seed: object = 0,
              max_new_tokens: object = 32, differences: Differences | None = None) -> tuple[str, str, str]:
        """Steer (E5): the steered and unsteered completions side by side, each token with its probability and
        the top candidates."""
        layer = self._layer(layer)
        feature = self._feature(feature, layer)
        n_prompt = self._tokens(prompt, "the prompt")
        alpha = self._strength(layer, feature, preset, custom_alpha, differences or {})
        spec = SteeringSpec.single(layer, feature, alpha, direction_norm=direction_norm,
                                   **self._positions(positions, steer_generated, n_prompt))
        if decoding not in ("greedy", "sampled"):
            raise AppInputError(f"decoding {decoding!r}; expected 'greedy' or 'sampled'")
        sampling = None if decoding == "greedy" else Sampling(
            _real(temperature, "temperature"), _real(top_p, "top-p"), check_count(seed, "seed", 0, 2**31 - 1))
        n_new = check_count(max_new_tokens, "new tokens", 1, MAX_NEW_TOKENS)
        saes = self._saes([layer])
        with self._lock:
            result = generate(self.model, self.tokenizer, prompt, spec, saes, max_new_tokens=n_new,
                              top_alternatives=TOP_CANDIDATES, sampling=sampling)
        return (completion_html(f"Steered (α = {alpha:.4g}, {direction_norm} direction)", result.steered),
                completion_html("Unsteered", result.unsteered), "")

    def _strength(self, layer: int, feature: int, preset: str, custom: object, differences: Differences) -> float:
        if preset == "Custom":
            return _real(custom, "custom strength")  # a non-finite one is refused by the steering Term
        presets = strength_presets(differences.get((layer, feature)))
        if preset not in presets:
            raise AppInputError(f"strength preset {preset!r}; expected one of {', '.join(PRESETS)}")
        return presets[preset]

    @shows_errors(blank=1)
    def feature(self, layer: object, feature: object) -> tuple[str, str]:
        """Feature: the card of one feature over the app's texts (contexts, histogram, logit effects, co-firing)."""
        layer = self._layer(layer)
        feature = self._feature(feature, layer)
        sae = self._saes([layer])[layer]
        with self._lock:
            if layer not in self._corpora:
                self._corpora[layer] = harvest_corpus(self.model, self.tokenizer, self.texts, sae, layer=layer,
                                                      progress=False)
            (card,) = cards_from_corpus(self.model, self.tokenizer, self._corpora[layer], sae, [feature],
                                        explanations={feature: self.explanations[layer, feature]}
                                        if (layer, feature) in self.explanations else None)
        return card_html(card), ""

    def search(self, query: str, limit: int = SEARCH_RESULTS) -> list[tuple[str, str]]:
        """Features whose explanation holds every word of ``query`` (case-insensitive), best detection score
        first: ``(label, "layer:feature")`` pairs for the page's result list. A number also matches that feature
        id. Empty without an explanations file (``qscope app --explanations``)."""
        words = (query or "").lower().split()
        if not words:
            return []
        found = []
        for (layer, feature), row in self.explanations.items():
            text = f"{feature} {row.explanation}".lower()
            if all(w in text.split() if w.isdigit() else w in text for w in words):
                score = row.detection.value if row.detection is not None else -1.0
                found.append((-score, layer, feature, row))
        found.sort(key=lambda item: item[:3])
        return [(f"layer {layer} · #{feature} · {row.explanation}"
                 + (f" (detection {row.detection.value:.2f})" if row.detection is not None else ""),
                 f"{layer}:{feature}") for _, layer, feature, row in found[:limit]]

    @staticmethod
    def _positions(text: object, steer_generated: bool, n_prompt: int) -> Mapping[str, object]:
        """The app's positions box (``all`` or prompt indices like ``0,1,5`` / ``3-7``) and its "steer generated
        tokens" box, as ``SteeringSpec`` arguments. The box names prompt positions only, read by the one bounded
        parser against the prompt's ``n_prompt`` tokens: the words ``prompt`` and ``generated`` are refused, as
        the checkbox alone says whether generated tokens are steered."""
        if isinstance(text, str) and text.strip() in ("prompt", "generated"):
            raise AppInputError(f"positions {text.strip()!r}: the box takes 'all' or prompt indices such as '0,1,5'; "
                                "tick or untick 'steer generated tokens' to steer the generated tokens or not")
        mode = "all" if steer_generated else "prompt"
        if isinstance(text, str) and text.strip() == "all":
            return {"positions": mode}
        where = parse_indices(text, n_prompt, what="prompt position", subject="the prompt",
                              option="positions", all_word=None)
        return {"positions": mode, "prompt_positions": where}
