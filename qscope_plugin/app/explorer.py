"""What each tab of ``qscope app`` does, without Gradio: inputs as the page sends them, HTML and a status back.

    >>> explorer = Explorer.load()                       # the embedded demo; or Explorer.load(model, release, ...)
    >>> table, status = explorer.analyze("今天早上 the weather", layer=3, top_n=5)
    >>> steered, unsteered, status = explorer.steer("The weather", layer=3, feature=12, preset="Medium")

Every computation is a call into ``qscope_plugin.recipes``; this module checks what the page sent, loads the SAEs
it needs (lazily, through the store's LRU) and turns results into HTML (``views``). Bad input comes back as a
message in the status, never as an exception, so the page shows it and the server keeps serving. One lock
serialises the model: a steering edit must never leak into another request's forward.
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
from qscope_plugin.errors import QScopeError, feature_out_of_range, layer_out_of_range
from qscope_plugin.placement import pin
from qscope_plugin.recipes.discovery import analyze, contrast
from qscope_plugin.recipes.inspection import Corpus, cards_from_corpus, harvest_corpus
from qscope_plugin.recipes.steering import Sampling, SteeringSpec, generate, parse_positions, strength_presets
from qscope_plugin.store import DEFAULT_CACHE, layer_count, load_sae

Differences = dict[tuple[int, int], float]
"""``(layer, feature) -> A − B`` of the last Compare, kept in the page's state to calibrate the Steer presets."""
PRESETS = ("Light", "Medium", "Strong", "Custom")
TOP_CANDIDATES = 10
"""Candidates shown per generated token, as the official app does."""
MAX_NEW_TOKENS = 256


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


def _integer(value: object, what: str, low: int, high: int) -> int:
    number = _whole(value, low, high)
    if number is None:
        raise AppInputError(f"{what} {value!r} cannot be used; pass a whole number in {low}..{high}")
    return number


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
    sae_device: str | None = None
    """Where the SAEs encode (``--sae-device``); None: beside each layer (``qscope_plugin.placement``)."""
    n_layers: int = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _corpora: dict[int, Corpus] = field(default_factory=dict, init=False, repr=False)
    """The Feature tab's harvest of ``texts`` per layer: the texts are fixed, so each layer is harvested once."""

    def __post_init__(self) -> None:
        self.n_layers = _layers_of(self.source)

    @classmethod
    def load(cls, model: str | None = None, release: str | None = None, *, device: str | None = None,
             texts: Sequence[str] = (), sae_device: str | None = None) -> Explorer:
        """Load a backbone folder or cached hub id on ``device``; defaults: the embedded demo model, its SAEs and
        its sentences."""
        from qscope_plugin.models import check_device, default_model, default_release, load_model

        _layers_of(release or default_release())  # a bad release fails before the (slow) model load
        check_device(sae_device)
        backbone, tokenizer = load_model(model or default_model(), device=device)
        name = "the embedded demo model" if model in (None, default_model()) else model
        return cls(backbone, tokenizer, release or default_release(), texts or demo_texts(), model_name=name,
                   sae_device=sae_device)

    # -- shared checks ---------------------------------------------------------------------------------------
    def _layer(self, value: object) -> int:
        layer = _whole(value, 0, self.n_layers - 1)
        if layer is None:
            raise layer_out_of_range(value, self.n_layers, f"{self.source!r}")
        return layer

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
        layer, top_n = self._layer(layer), _integer(top_n, "top features per token", 1, 64)
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
            for name, text in (("A", text_a), ("B", text_b)):
                if not text.strip():
                    raise AppInputError(f"text {name} is empty; type a text on both sides to compare them")
            first, last = self._layer(first_layer), self._layer(last_layer)
            if first > last:
                raise AppInputError(f"layers {first}..{last} run backwards; put the lower layer first")
            if last - first + 1 > DEFAULT_CACHE.max_layers:
                raise AppInputError(f"layers {first}..{last} are {last - first + 1} SAEs; Compare loads at most "
                                    f"{DEFAULT_CACHE.max_layers} at once (the SAE cache); narrow the range")
            top_k = _integer(top_k, "top-K", 1, 100)
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
        alpha = self._strength(layer, feature, preset, custom_alpha, differences or {})
        spec = SteeringSpec.single(layer, feature, alpha, direction_norm=direction_norm,
                                   **self._positions(positions, steer_generated))
        if decoding not in ("greedy", "sampled"):
            raise AppInputError(f"decoding {decoding!r}; expected 'greedy' or 'sampled'")
        sampling = None if decoding == "greedy" else Sampling(
            _real(temperature, "temperature"), _real(top_p, "top-p"), _integer(seed, "seed", 0, 2**31 - 1))
        n_new = _integer(max_new_tokens, "new tokens", 1, MAX_NEW_TOKENS)
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
            (card,) = cards_from_corpus(self.model, self.tokenizer, self._corpora[layer], sae, [feature])
        return card_html(card), ""

    @staticmethod
    def _positions(text: str, steer_generated: bool) -> Mapping[str, object]:
        """The app's positions box (``all`` or prompt indices like ``0,1,5`` / ``3-7``) and its "steer generated
        tokens" box, as ``SteeringSpec`` arguments. The box names prompt positions only: the words ``prompt`` and
        ``generated`` are refused, as the checkbox alone says whether generated tokens are steered."""
        where = parse_positions(text or "")
        if where in ("prompt", "generated"):
            raise AppInputError(f"positions {where!r}: the box takes 'all' or prompt indices such as '0,1,5'; tick or "
                                "untick 'steer generated tokens' to steer the generated tokens or not")
        mode = "all" if steer_generated else "prompt"
        return {"positions": mode} if isinstance(where, str) else {"positions": mode, "prompt_positions": where}
