"""SASFT: SAE-guided fine-tuning against unexpected code-switching (report §7, Deng et al. 2025).

    >>> feats = language_features(model, tok, {"zh": zh_lines, "en": en_lines}, saes, target="zh")
    >>> penalty = SASFTPenalty(model, feats, saes, lam=1e-3)          # last two layers, alpha = mean pre-act
    >>> out = sasft_loss(penalty, collate(encode_examples(tok, examples, feats), tok.pad_token_id))
    >>> out.loss.backward()                                             # CE + lam * L_reduce

The method (paper https://arxiv.org/abs/2507.14894 , defaults from the official code
https://github.com/Aatrox103/SASFT ):

- (R29) a feature s is a language-L feature when ``nu_s = mu^L_s - mean_{j != L} mu^j_s`` is large, mu being its mean
  SAE activation over every token but position 0; ``S_L`` = the top ``top_n`` (default 2) per layer;
- alpha_{j,s} = the mean *pre-activation* (E1) of s on language-j text, position 0 excluded (``variant="zero"``:
  alpha = 0);
- (R30) L_reduce = per layer, ``sum ReLU(pre_s(h_t) - alpha_{j,s})`` over s in S_L and response tokens t of examples
  whose language j != L, divided by a count that is a choice (``normalize``): by default, as the official training
  script, (response tokens of the whole batch, penalised language included) x |S_L| + 1; or, as the paper's
  expectation reads, (response tokens of the penalised examples) x |S_L|. Summed over the penalised layers (default:
  the model's last two), as the official trainer adds one term per hooked layer;
- (R31) L = L_CE + lam * L_reduce, lam = 1e-3 (the official default).

The SAE stays frozen and only its |S_L| encoder rows are read: the penalty is a ``(tokens, d_model) x (d_model,
|S_L|)`` product per layer, and gradients reach the model (LoRA adapters included), never the SAE.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from qscope_plugin.backends import Backend, as_backend
from qscope_plugin.distributed import run_chunks, sum_chunks
from qscope_plugin.errors import MalformedFileError, QScopeError
from qscope_plugin.recipes._harvest import check_texts, harvest_settings, pad, pad_id, sharded_harvest, tokenize
from qscope_plugin.recipes._json import is_index, is_layer_map, is_list_of, is_number, read_json
from qscope_plugin.recipes.classifiers import sae_signature
from qscope_plugin.sae import QwenScopeSAE

IGNORE = -100
"""The label of tokens that are not trained on (prompt and padding), as transformers uses it."""


class SASFTError(QScopeError, ValueError):
    """SASFT inputs that cannot be used (no data for a language, no features, a batch without response tokens)."""


class LanguageFeaturesFileError(SASFTError, MalformedFileError):
    """A saved ``LanguageFeatures`` file that is truncated, damaged or not one (the message names the file)."""


FEATURES_FILE = "the JSON written by LanguageFeatures.save / `qscope sasft features`"


@dataclass(frozen=True)
class LanguageFeatures:
    """``S_L`` per layer with its monolinguality scores and the thresholds alpha_{j,s} of every language j."""

    target: str
    """L: the language whose features are penalised (the unwanted one)."""
    languages: tuple[str, ...]
    """Every language seen; a batch's ``language`` ids index this tuple."""
    features: dict[int, list[int]]
    """Per layer, ``S_L`` (best first)."""
    scores: dict[int, list[float]]
    """nu (R29) of each feature in ``features``."""
    thresholds: dict[str, dict[int, list[float]]]
    """alpha_{j,s}: per language j and layer, the mean pre-activation of each feature in ``features``."""
    saes: dict[int, dict] = field(default_factory=dict)
    """The signature of each layer's SAE (release, d_model, d_sae, k): ``load`` refuses SAEs that differ."""

    def language_id(self, language: str) -> int:
        if language not in self.languages:
            raise SASFTError(f"language {language!r} has no thresholds; known: {list(self.languages)}; recompute "
                             "language_features with data in that language")
        return self.languages.index(language)

    def to_json(self) -> dict:
        return {"target": self.target, "languages": list(self.languages),
                "features": {str(n): f for n, f in self.features.items()},
                "scores": {str(n): s for n, s in self.scores.items()},
                "thresholds": {j: {str(n): a for n, a in by.items()} for j, by in self.thresholds.items()},
                "saes": {str(n): s for n, s in self.saes.items()}}

    @classmethod
    def from_json(cls, data: Mapping) -> LanguageFeatures:
        return cls(target=data["target"], languages=tuple(data["languages"]),
                   features={int(n): list(f) for n, f in data["features"].items()},
                   scores={int(n): list(s) for n, s in data["scores"].items()},
                   thresholds={j: {int(n): list(a) for n, a in by.items()} for j, by in data["thresholds"].items()},
                   saes={int(n): dict(s) for n, s in (data.get("saes") or {}).items()})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, saes: Mapping[int, QwenScopeSAE] | None = None) -> LanguageFeatures:
        """Read ``save``'s JSON; with ``saes``, refuse SAEs of another release, width or k than it was made with.

        Raises:
            LanguageFeaturesFileError: a missing, truncated or foreign file (it is named, with what is wrong).
        """
        data = read_json(path, LanguageFeaturesFileError, FEATURES_FILE)
        shape = {"target": lambda v: isinstance(v, str),
                 "languages": lambda v: is_list_of(v, lambda j: isinstance(j, str)),
                 "features": lambda v: is_layer_map(v, lambda f: is_list_of(f, is_index)),
                 "scores": lambda v: is_layer_map(v, lambda s: is_list_of(s, is_number)),
                 "thresholds": lambda v: isinstance(v, dict) and all(
                     is_layer_map(by, lambda a: is_list_of(a, is_number)) for by in v.values()),
                 "saes": lambda v: v is None or is_layer_map(v, lambda s: isinstance(s, dict))}  # older files lack it
        wrong = list(shape) if not isinstance(data, dict) else [k for k, ok in shape.items() if not ok(data.get(k))]
        if wrong:
            raise LanguageFeaturesFileError(f"{str(path)!r} is not a saved LanguageFeatures (missing or malformed: "
                                            f"{', '.join(wrong)}); expected {FEATURES_FILE}")
        loaded = cls.from_json(data)
        for n, sae in (saes or {}).items():
            saved, got = loaded.saes.get(n), sae_signature(sae)
            if saved is not None and saved != got:
                raise SASFTError(f"layer {n}: {str(path)!r} was computed with SAE {saved} but got {got}; pass the "
                                 "SAEs it was made with or recompute language_features")
        return loaded


def _check_languages(texts: Mapping[str, Sequence[str]], target: str | None = None) -> dict[str, list[str]]:
    out = {}
    for language, lines in texts.items():
        lines = [t for t in lines if t.strip()]
        if not lines:
            raise SASFTError(f"language {language!r} has no text; give every language at least one non-empty line "
                             "or leave it out")
        out[language] = lines
    if target is not None and target not in out:
        raise SASFTError(f"target language {target!r} has no data; pass texts[{target!r}] (known: {sorted(out)})")
    if len(out) < 2:
        raise SASFTError(f"got texts in {sorted(out)} only; monolinguality (R29) needs at least two languages")
    return out


def mean_activations(model: object, tokenizer, texts: Sequence[str], saes: Mapping[int, QwenScopeSAE], *,
                     batch_size: int = 16, max_length: int | None = 512) -> dict[int, torch.Tensor]:
    """Per layer, the mean SAE activation ``(d_sae,)`` of each feature over every token but each text's first."""
    codes = sharded_harvest(model, tokenizer, check_texts(texts), saes, pooling="tokens", batch_size=batch_size,
                            max_length=max_length, desc="language features")
    means = {}
    for n, sae in saes.items():
        total, count = torch.zeros(sae.cfg.d_sae, dtype=torch.float64), 0
        for text in codes:
            values, indices = text.values[n][1:], text.indices[n][1:]
            total.index_add_(0, indices.reshape(-1), values.reshape(-1).double())
            count += values.shape[0]
        if count == 0:
            raise SASFTError("every text is a single token; monolinguality needs tokens past position 0")
        means[n] = (total / count).float()
    return means


@torch.no_grad()
def mean_pre_activations(model: object, tokenizer, texts: Sequence[str], saes: Mapping[int, QwenScopeSAE],
                         features: Mapping[int, Sequence[int]], *, batch_size: int = 16,
                         max_length: int | None = 512) -> dict[int, list[float]]:
    """Per layer, the mean pre-activation (E1) of each of ``features[layer]`` over every token but position 0.

    Only the selected encoder rows are applied (``|S| x d_model``), inside the capture hook.
    """
    backend = as_backend(model)
    layers = backend.check_layers(features)
    rows = {n: saes[n].encoder_rows(list(features[n])) for n in layers}
    encoded = [ids for ids in tokenize(tokenizer, check_texts(texts), max_length=max_length,
                                       context=backend.context_length) if len(ids) > 1]
    if not encoded:
        raise SASFTError("every text is a single token; thresholds need tokens past position 0")
    padding = pad_id(tokenizer)

    def chunk_sums(offset: int, chunk: list[list[int]]) -> dict[str, torch.Tensor]:
        sums = {str(n): torch.zeros(len(features[n]), dtype=torch.float64) for n in layers}
        count = 0
        for start in range(0, len(chunk), batch_size):
            ids, mask, positions = pad(chunk[start : start + batch_size], padding)
            keep = mask.bool() & (positions > 0)

            def reduce(hidden: torch.Tensor, n: int, keep: torch.Tensor = keep) -> torch.Tensor:
                w, b = (t.to(hidden.device) for t in rows[n])
                return F.linear(hidden.float(), w, b)[keep.to(hidden.device)].double().sum(0).cpu()

            for n, s in backend.capture(ids, mask, layers=layers, reduce=reduce, position_ids=positions).items():
                sums[str(n)] += s
            count += int(keep.sum())
        return {**sums, "count": torch.tensor(count)}

    settings = harvest_settings(backend, tokenizer, saes, features={str(n): list(features[n]) for n in layers},
                                batch_size=batch_size, max_length=max_length)
    sums = sum_chunks(run_chunks(encoded, chunk_sums, name="language thresholds", settings=settings))
    return {n: (sums[str(n)] / int(sums["count"])).tolist() for n in layers}


def language_features(model: object, tokenizer, texts: Mapping[str, Sequence[str]],
                      saes: Mapping[int, QwenScopeSAE], *, target: str, top_n: int = 2,
                      threshold_texts: Mapping[str, Sequence[str]] | None = None, batch_size: int = 16,
                      max_length: int | None = 512) -> LanguageFeatures:
    """``S_L`` per layer by monolinguality (R29) and alpha_{j,s} for every language j.

    Args:
        texts: language tag -> lines in that language (at least two languages, ``target`` among them).
        target: L, the language to be penalised.
        top_n: features kept per layer (the official code keeps 2).
        threshold_texts: language -> lines for alpha (the official code uses its SFT data); default ``texts``.
    """
    texts = _check_languages(texts, target)
    if top_n < 1:
        raise SASFTError(f"top_n={top_n}; S_L needs at least one feature per layer")
    means = {j: mean_activations(model, tokenizer, lines, saes, batch_size=batch_size, max_length=max_length)
             for j, lines in texts.items()}
    others = [j for j in texts if j != target]
    features, scores = {}, {}
    for n in saes:
        nu = means[target][n] - torch.stack([means[j][n] for j in others]).mean(0)
        best = nu.topk(min(top_n, nu.numel()))
        features[n], scores[n] = best.indices.tolist(), best.values.tolist()
    alpha_texts = _check_languages(threshold_texts) if threshold_texts is not None else texts
    thresholds = {j: mean_pre_activations(model, tokenizer, lines, saes, features, batch_size=batch_size,
                                          max_length=max_length) for j, lines in alpha_texts.items()}
    return LanguageFeatures(target=target, languages=tuple(alpha_texts), features=features, scores=scores,
                            thresholds=thresholds, saes={n: sae_signature(sae) for n, sae in saes.items()})


Normalize = Literal["all_response_tokens", "penalised_tokens"]
"""The denominator of L_reduce (R30), docs/method.md §3.5: ``all_response_tokens`` = |S_L| x (response tokens in the
batch) + 1, the official script's (a mixed batch's target-language tokens count, and +1 keeps it finite);
``penalised_tokens`` = |S_L| x (response tokens of examples in a language j != L), a mean over what is penalised."""


class SASFTLoss(NamedTuple):
    loss: torch.Tensor
    """L_CE + lam * L_reduce: what to call ``backward`` on."""
    ce: torch.Tensor
    reduce: torch.Tensor
    """L_reduce (R30), before the weight lam."""


class SASFTPenalty:
    """L_reduce (R30) on a model's training forwards: hooks on the chosen layers read the residual stream."""

    def __init__(self, model: object, features: LanguageFeatures, saes: Mapping[int, QwenScopeSAE], *,
                 layers: Sequence[int] | None = None, lam: float = 1e-3,
                 variant: Literal["mean", "zero"] = "mean", normalize: Normalize = "all_response_tokens") -> None:
        """
        Args:
            model: the model being trained (transformers, PEFT-wrapped, TransformerLens bridge or nnsight).
            layers: blocks to penalise; default the model's last two (the official choice).
            lam: the weight lambda of R31 (the official code's default 1e-3).
            variant: ``mean`` (alpha_{j,s} from ``features.thresholds``) or ``zero`` (SASFT_zero: alpha = 0).
            normalize: L_reduce's denominator (``Normalize``): the official script's ``all_response_tokens``
                (default) or ``penalised_tokens``; on a batch of one language they differ only by the +1.
        """
        self.backend: Backend = as_backend(model)
        if variant not in ("mean", "zero"):
            raise SASFTError(f"variant={variant!r}; expected 'mean' (thresholds from data) or 'zero' (alpha = 0)")
        if normalize not in ("all_response_tokens", "penalised_tokens"):
            raise SASFTError(f"normalize={normalize!r}; expected 'all_response_tokens' (the official script's "
                             "denominator) or 'penalised_tokens' (a mean over the penalised tokens)")
        n_layers = self.backend.n_layers
        self.layers = self.backend.check_layers(list(layers) if layers is not None else [n_layers - 2, n_layers - 1])
        width = self.backend.module.get_input_embeddings().weight.shape[-1]
        self.lam, self.variant, self.normalize, self.features = lam, variant, normalize, features
        self.target_id = features.language_id(features.target) if features.target in features.languages else -1
        self._rows, self._alpha = {}, {}
        for n in self.layers:
            chosen = features.features.get(n, [])
            if not chosen:
                raise SASFTError(f"no language-{features.target} features for layer {n} (S_L is empty there); "
                                 f"compute language_features with an SAE for layer {n} or pass layers= among "
                                 f"{sorted(n for n, f in features.features.items() if f)}")
            sae = saes.get(n)
            if sae is None:
                raise SASFTError(f"no SAE for layer {n}; pass saes={{{n}: load_sae(release, {n})}}")
            if sae.cfg.layer is not None and sae.cfg.layer != n:
                raise SASFTError(f"saes[{n}] is the SAE of layer {sae.cfg.layer}; pass each layer's own SAE")
            if sae.cfg.d_model != width:
                raise SASFTError(f"the layer-{n} SAE reads d_model={sae.cfg.d_model} but the model's residual "
                                 f"stream has width {width}; pass the SAEs of this model's release")
            self._rows[n] = tuple(t.detach() for t in sae.encoder_rows(chosen))
            alpha = torch.tensor([features.thresholds[j][n] for j in features.languages], dtype=torch.float32)
            self._alpha[n] = torch.zeros_like(alpha) if variant == "zero" else alpha

    @contextmanager
    def track(self, labels: torch.Tensor, language: torch.Tensor) -> Iterator[Callable[[], torch.Tensor]]:
        """Inside the block, each forward's penalised layers add to L_reduce; yields a function returning it.

        Args:
            labels: ``(batch, seq)``, ``-100`` on tokens that are not trained on; the others are response tokens.
            language: ``(batch,)`` ids into ``features.languages``, the language j of each example.
        """
        response = labels != IGNORE
        n_response = int(response.sum())
        if n_response == 0:
            raise SASFTError("every label in the batch is -100: no response tokens to train on or penalise; "
                             "check that the collator keeps the response labels")
        language = torch.as_tensor(language, dtype=torch.long).reshape(-1)
        if language.shape[0] != labels.shape[0] or not 0 <= int(language.min()) <= int(language.max()) < len(
                self.features.languages):
            raise SASFTError(f"language ids {language.tolist()} do not index the {len(self.features.languages)} "
                             f"languages {list(self.features.languages)}, one per example")
        penalised = response & (language != self.target_id)[:, None]
        tokens = n_response if self.normalize == "all_response_tokens" else int(penalised.sum())
        plus_one = self.normalize == "all_response_tokens"
        terms: dict[int, torch.Tensor] = {}

        def observe(hidden: torch.Tensor, n: int, kwargs: dict) -> None:
            w, b = (t.to(hidden.device) for t in self._rows[n])
            alpha = self._alpha[n].to(hidden.device)[language.to(hidden.device)]  # (batch, |S|)
            over = (F.linear(hidden.float(), w, b) - alpha[:, None, :]).relu()  # (batch, seq, |S|)
            # no penalised token: the sum is 0, and so is the term under either denominator
            count = max(tokens * w.shape[0] + plus_one, 1)
            terms[n] = (over * penalised.to(hidden.device)[..., None]).sum() / count

        def reduce() -> torch.Tensor:
            missing = [n for n in self.layers if n not in terms]
            if missing:
                raise SASFTError(f"no forward reached layers {missing} inside track(); run the model's forward "
                                 "inside the with-block")
            return torch.stack([terms[n] for n in self.layers]).sum()

        with self.backend.tap(self.layers, observe):
            yield reduce


def sasft_loss(penalty: SASFTPenalty, batch: Mapping[str, torch.Tensor]) -> SASFTLoss:
    """One training forward: CE from the model, plus lam * L_reduce (R31); call ``.loss.backward()``.

    ``batch`` holds ``input_ids``, ``attention_mask``, ``labels`` and ``language`` (as ``collate`` makes it).
    """
    backend = penalty.backend
    with penalty.track(batch["labels"], batch["language"]) as reduce:
        out = backend.forward(input_ids=batch["input_ids"].to(backend.device),
                              attention_mask=batch["attention_mask"].to(backend.device),
                              labels=batch["labels"].to(backend.device))
    value = reduce()
    return SASFTLoss(out.loss + penalty.lam * value.to(out.loss.device), out.loss, value)


class Example(NamedTuple):
    """One SFT example: the loss is on ``response`` only; ``language`` is its language j."""

    prompt: str
    response: str
    language: str


def encode_examples(tokenizer, examples: Sequence[Example], features: LanguageFeatures, *,
                    max_length: int | None = 512) -> list[dict]:
    """Token ids with labels -100 on the prompt and the language id of each example (rows for ``collate``)."""
    rows = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE] * len(prompt) + response)[:max_length]
        rows.append({"input_ids": ids, "labels": labels, "language": features.language_id(ex.language)})
    return rows


def collate(rows: Sequence[Mapping], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding) and ``language``."""
    ids, mask, _ = pad([r["input_ids"] for r in rows], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for i, r in enumerate(rows):
        labels[i, : len(r["labels"])] = torch.tensor(r["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "language": torch.tensor([int(r["language"]) for r in rows], dtype=torch.long)}
