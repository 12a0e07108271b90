"""How good is each SAE on your data: reconstruction, sparsity, dead / dense features and the downstream cost.

    >>> report = evaluate_saes(model, tok, texts, {n: load_sae(release, n) for n in range(4)})
    >>> report.layers[3].fvu, report.layers[3].mean_l0, report.layers[3].ce_loss_recovered
    >>> write_report(report, "quality-report")            # recipes.reports: report.json, report.md, quality.png

Definitions (docs/quality.md has them with the measured demo table), over every real token of the dataset:
- FVU (E4) pools all tokens: ``Σ_t ||x_t − x̂_t||² / Σ_t ||x_t − x̄||²`` with ``x̄`` the dataset mean, as
  ``QwenScopeSAE.fvu`` on the concatenated block outputs; explained variance is ``1 − FVU``.
- mean L0: features with ``z_f > 0`` per token; dead: never fired on any token; dense: fired on more than
  ``dense_threshold`` of the tokens.
- downstream: next-token cross-entropy (nats) of the clean model, with block n's output replaced by the SAE
  reconstruction (spliced), and replaced by zeros (zero-ablated); ``KL(clean ‖ spliced)`` and ``KL(clean ‖ zero)``
  per token; CE loss recovered ``(CE_zero − CE_spliced) / (CE_zero − CE_clean)``. Only positions whose next token
  is a real token count.

``exclude_first_token`` leaves each text's position 0 (Qwen's massive-activation outliers, docs/method.md §2.5) out
of FVU, L0 and dead / dense. It is off by default, as SAELens' evaluation counts every token, and it never applies
to CE and KL: those are next-token losses of the model's whole forward, over every predicted position.

Batches are right-padded, so every real token keeps its natural position (``Backend.logits`` takes none) and
padding, coming after the real tokens, cannot reach them through causal attention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qscope_plugin.backends import Backend, KwargsEdit, as_backend
from qscope_plugin.distributed import rank_and_world, run_chunks, sum_chunks
from qscope_plugin.errors import QScopeError
from qscope_plugin.placement import SAEDevice, placed, release
from qscope_plugin.recipes._harvest import check_texts, harvest_settings, length_batches, pad, pad_id, tokenize
from qscope_plugin.recipes._json import finite_json
from qscope_plugin.sae import QwenScopeSAE


class QualityError(QScopeError, ValueError):
    """Evaluation options or data that cannot be used."""


@dataclass(frozen=True)
class LayerQuality:
    """One SAE's quality on a dataset; see the module docstring for each definition."""

    layer: int
    n_tokens: int
    """Real tokens (less each text's first with ``exclude_first_token``): the population of FVU, L0, dead, dense."""
    n_predicted: int
    """Positions with a real next token: the population of CE and KL."""
    fvu: float
    explained_variance: float
    mean_l0: float
    dead_features: int
    dead_fraction: float
    dense_features: int
    dense_fraction: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    kl_spliced: float
    kl_zero: float
    ce_loss_recovered: float
    """``(ce_zero − ce_spliced) / (ce_zero − ce_clean)``; NaN when zero-ablation costs nothing."""


@dataclass(frozen=True)
class QualityReport:
    """Per-layer quality of a set of SAEs on one dataset; ``recipes.reports.write_report`` renders it."""

    layers: dict[int, LayerQuality]
    n_texts: int
    dense_threshold: float
    max_length: int | None
    model: str | None = None
    release: str | None = None
    exclude_first_token: bool = False
    """Whether each text's position 0 was left out of FVU, L0 and dead / dense (never of CE and KL)."""

    def to_json(self) -> dict:
        """Plain JSON types; layer keys become strings (as JSON has them) and NaN becomes None (``null``, since
        ``NaN`` is not JSON)."""
        return finite_json({"n_texts": self.n_texts, "dense_threshold": self.dense_threshold,
                            "max_length": self.max_length, "model": self.model, "release": self.release,
                            "exclude_first_token": self.exclude_first_token,
                            "layers": {str(n): asdict(q) for n, q in self.layers.items()}})

    @classmethod
    def from_json(cls, data: Mapping) -> QualityReport:
        """The report back from ``to_json`` output, read through JSON (layer keys restored to ints, ``null``
        numbers to NaN)."""
        layers = {int(n): LayerQuality(**{k: math.nan if v is None else v for k, v in q.items()})
                  for n, q in data["layers"].items()}
        return cls(layers, data["n_texts"],
                   data["dense_threshold"], data["max_length"], data.get("model"), data.get("release"),
                   data.get("exclude_first_token", False))


class _Tally:
    """Running sums of one layer's reconstruction and firing over real tokens (float64: the variance is a
    difference of two large sums when activations have a large mean)."""

    def __init__(self, sae: QwenScopeSAE, device: SAEDevice) -> None:
        self.sae = sae
        self.device = device
        self.n = 0
        self.sum_x = torch.zeros(sae.cfg.d_model, dtype=torch.float64)
        self.sum_x2 = 0.0
        self.sum_err = 0.0
        self.active = 0
        self.fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)

    def add(self, x: torch.Tensor) -> None:
        """``x`` ``(tokens, d_model)``: the block outputs of real tokens, encoded beside them (``placed``)."""
        sae = placed(self.sae, x, self.device)
        x = x.to(sae.device)
        values, indices = sae.encode_sparse(x)
        x = x.float()
        err = x - sae.decode_sparse(values, indices).float()
        on = values > 0
        self.n += x.shape[0]
        self.sum_x += x.sum(0).double().cpu()
        self.sum_x2 += x.double().pow(2).sum().item()
        self.sum_err += err.double().pow(2).sum().item()
        self.active += int(on.sum())
        self.fired += torch.bincount(indices[on].flatten().cpu(), minlength=self.sae.cfg.d_sae)

    def sums(self) -> dict[str, torch.Tensor]:
        """The running sums as tensors (float64 floats: exactly the Python floats), to add across chunks."""
        return {"n": torch.tensor(self.n), "sum_x": self.sum_x, "active": torch.tensor(self.active),
                "sum_x2": torch.tensor(self.sum_x2, dtype=torch.float64),
                "sum_err": torch.tensor(self.sum_err, dtype=torch.float64), "fired": self.fired}


def _fvu(n: int, sum_x: torch.Tensor, sum_x2: float, sum_err: float) -> float:
    total = sum_x2 - (sum_x / n).pow(2).sum().item() * n
    return sum_err / total if total > 0 else math.nan


LOGIT_BUDGET_BYTES = 64 << 20
"""Most bytes of float32 vocab-sized values one step of the CE / KL sums holds per forward (clean and edited
log-probabilities of one chunk of positions): at Qwen's 151,936-token vocabulary, 110 positions. The final hidden
states of a batch (``positions × d_model``) are kept instead, and the LM head is applied chunk by chunk, so
peak memory does not grow with positions × vocabulary."""


class Clean(NamedTuple):
    """The clean forward of one batch at the positions with a real next token."""

    where: torch.Tensor
    """``(batch, seq − 1)`` bool: position t is real and so is t + 1."""
    targets: torch.Tensor
    """``(n,)`` the next tokens."""
    final: torch.Tensor
    """``(n, d_model)`` the last block's output at those positions (the LM head's input, before the final norm)."""
    chunk: int
    """Positions per step of the CE / KL sums (``LOGIT_BUDGET_BYTES`` or ``chunk_positions``)."""


def _final_hidden(backend: Backend, ids: torch.Tensor, mask: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The last block's output at the predicted positions, from a capture (edits in force apply to it)."""
    last = backend.n_layers - 1
    hidden = backend.capture(ids, mask, layers=[last])[last]
    return hidden[:, :-1][where.to(hidden.device)]


def _chunk_logp(backend: Backend, final: torch.Tensor) -> torch.Tensor:
    """float32 next-token log-probabilities ``(n, vocab)`` of a chunk of final hidden states."""
    return F.log_softmax(backend.unembed(final).float(), dim=-1)


def clean_forward(backend: Backend, ids: torch.Tensor, mask: torch.Tensor, *,
                  chunk_positions: int | None = None) -> Clean:
    where = mask[:, :-1].bool() & mask[:, 1:].bool()
    final = _final_hidden(backend, ids, mask, where)
    vocab = backend.module.get_output_embeddings().out_features
    chunk = chunk_positions or max(1, LOGIT_BUDGET_BYTES // (2 * 4 * vocab))
    return Clean(where, ids[:, 1:][where].to(final.device), final, chunk)


def clean_ce(backend: Backend, clean: Clean) -> float:
    """``Σ CE`` of the clean forward over the batch's predicted positions, one chunk of logits at a time."""
    total = 0.0
    for start in range(0, clean.final.shape[0], clean.chunk):
        logp = _chunk_logp(backend, clean.final[start : start + clean.chunk])
        targets = clean.targets[start : start + clean.chunk].to(logp.device)
        total -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
    return total


def spliced_cost(backend: Backend, ids: torch.Tensor, mask: torch.Tensor, clean: Clean, layer: int,
                 splice: KwargsEdit) -> tuple[float, float]:
    """``(Σ CE, Σ KL(clean ‖ edited))`` over the batch's predicted positions with ``splice`` on block ``layer``.

    The edited forward keeps its final hidden states; clean and edited log-probabilities are then made one chunk
    of positions at a time, so at most two chunks of vocab-sized values exist at once and only sums leave.
    """
    with backend.edit({layer: splice}):
        edited = _final_hidden(backend, ids, mask, clean.where)
    nll = kl = 0.0
    for start in range(0, edited.shape[0], clean.chunk):
        span = slice(start, start + clean.chunk)
        logp = _chunk_logp(backend, edited[span])
        reference = _chunk_logp(backend, clean.final[span]).to(logp.device)
        nll -= logp.gather(-1, clean.targets[span].to(logp.device).unsqueeze(-1)).sum().item()
        kl += F.kl_div(logp, reference, log_target=True, reduction="sum").item()
    return nll, kl


def _reconstruct(sae: QwenScopeSAE, device: SAEDevice) -> KwargsEdit:
    def splice(hidden: torch.Tensor, layer: int, layer_kwargs: dict) -> torch.Tensor:
        return placed(sae, hidden, device).reconstruct(hidden).to(device=hidden.device, dtype=hidden.dtype)

    return splice


def _zero(hidden: torch.Tensor, layer: int, layer_kwargs: dict) -> torch.Tensor:
    return torch.zeros_like(hidden)


def check_options(saes: Mapping[int, QwenScopeSAE], batch_size: int, max_length: int | None,
                  dense_threshold: float) -> None:
    """``evaluate_saes``' options, checked on their own so a command can refuse them before the model loads.

    Raises:
        QualityError: no SAEs, or a bad batch size, max length or dense threshold.
    """
    if not saes:
        raise QualityError("no SAEs given; pass {layer: QwenScopeSAE} for at least one layer")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QualityError(f"batch_size={batch_size!r}; expected an integer >= 1")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise QualityError(f"max_length={max_length!r}; expected None or an integer >= 2 (a next-token loss needs "
                           "two tokens)")
    if not (isinstance(dense_threshold, int | float) and 0 <= dense_threshold <= 1):
        raise QualityError(f"dense_threshold={dense_threshold!r}; expected a fraction of tokens in [0, 1], e.g. 0.1")


@torch.no_grad()
def evaluate_saes(model: object, tokenizer, data: Sequence[str], saes: Mapping[int, QwenScopeSAE], *,
                  batch_size: int = 8, max_length: int | None = 512, dense_threshold: float = 0.1,
                  exclude_first_token: bool = False, progress: bool = True, sae_device: SAEDevice = None,
                  chunk_positions: int | None = None, layers_per_pass: int | None = None) -> QualityReport:
    """Quality of each SAE in ``saes`` on the texts ``data`` (definitions in the module docstring).

    Per batch: one capture of every layer (reconstruction and firing), one clean forward, and for each layer
    one spliced and one zero-ablated forward; only sums are kept between batches. Forwards keep their final
    hidden states ``(predicted positions, d_model)``; logits exist for one chunk of positions at a time
    (``chunk_positions``, default ``LOGIT_BUDGET_BYTES`` worth), so peak memory does not grow with positions ×
    vocabulary, and the sums equal the unchunked ones (to float32 rounding of their order).
    Texts go in chunks through ``qscope_plugin.distributed.run_chunks``: under ``torchrun`` each rank evaluates its
    share, inside ``checkpoints`` a killed run resumes, and the chunks' sums are added in chunk order (the same
    floats for any number of ranks).

    Args:
        model: a transformers model, a TransformerLens bridge, an nnsight model or a ``Backend``.
        data: texts, tokenized without special tokens and cut to their first ``max_length`` tokens.
        dense_threshold: a feature firing on more than this fraction of tokens is dense.
        exclude_first_token: leave each text's first token out of FVU, L0 and dead / dense (not of CE / KL).
        sae_device: encode on this device instead of each layer's own (``qscope_plugin.placement``).
        chunk_positions: positions whose logits are made at once (None: ``LOGIT_BUDGET_BYTES`` worth).
        layers_per_pass: at most this many layers' SAEs held at once; more layers run in passes over the data
            (the clean forward is repeated per pass; results identical to one pass).

    Raises:
        QualityError: no SAEs, a bad option, or no text with two tokens (no next-token loss to measure).
        EmptyInputError: no texts.
    """
    check_options(saes, batch_size, max_length, dense_threshold)
    texts = check_texts(data)
    backend = as_backend(model)
    layers = sorted(backend.check_layers(saes))
    encoded = tokenize(tokenizer, texts, max_length=max_length, context=backend.context_length)
    if not any(len(ids) >= 2 for ids in encoded):
        raise QualityError(f"none of the {len(texts)} texts has two tokens, so there is no next token to predict; "
                           "pass longer texts")
    if chunk_positions is not None and (isinstance(chunk_positions, bool) or not isinstance(chunk_positions, int)
                                        or chunk_positions < 1):
        raise QualityError(f"chunk_positions={chunk_positions!r}; expected None or an integer >= 1")
    if layers_per_pass is not None and (isinstance(layers_per_pass, bool) or not isinstance(layers_per_pass, int)
                                        or layers_per_pass < 1):
        raise QualityError(f"layers_per_pass={layers_per_pass!r}; expected None (one pass) or an integer >= 1")
    settings = harvest_settings(backend, tokenizer, saes, batch_size=batch_size, max_length=max_length,
                                exclude_first_token=exclude_first_token)
    shown = progress and rank_and_world()[0] == 0

    def chunk_sums(start: int, chunk: list[list[int]]) -> dict[str, torch.Tensor]:
        return _sums(backend, tokenizer, chunk, saes, layers, batch_size=batch_size,
                     exclude_first_token=exclude_first_token, progress=shown, sae_device=sae_device,
                     chunk_positions=chunk_positions, layers_per_pass=layers_per_pass)

    sums = sum_chunks(run_chunks(encoded, chunk_sums, name="evaluate", settings=settings))
    n_predicted = int(sums["n_predicted"])
    return QualityReport({n: _layer_quality(n, saes[n], sums, float(sums["ce_clean"]) / n_predicted, n_predicted,
                                            dense_threshold) for n in layers},
                         n_texts=len(texts), dense_threshold=float(dense_threshold), max_length=max_length,
                         model=backend.name, release=saes[layers[0]].cfg.release,
                         exclude_first_token=exclude_first_token)


def _sums(backend: Backend, tokenizer, encoded: list[list[int]], saes: Mapping[int, QwenScopeSAE],
          layers: list[int], *, batch_size: int, exclude_first_token: bool, progress: bool, sae_device: SAEDevice,
          chunk_positions: int | None, layers_per_pass: int | None) -> dict[str, torch.Tensor]:
    """The sums of one chunk of texts (``qscope_plugin.distributed``): chunks merge by adding them, in order.

    Layers run in groups of ``layers_per_pass`` (one pass over the chunk's batches per group, the group's SAE
    copies released after it); the clean CE is counted in the first pass only.
    """
    tallies = {n: _Tally(saes[n], sae_device) for n in layers}
    downstream = {n: torch.zeros(4, dtype=torch.float64) for n in layers}  # Σ CE, Σ KL: spliced, then zeroed
    ce_clean, n_predicted = 0.0, 0
    step = layers_per_pass or len(layers)
    groups = [layers[start : start + step] for start in range(0, len(layers), step)]
    batches = length_batches(encoded, batch_size)
    for first_pass, group in zip([True] + [False] * (len(groups) - 1), groups, strict=True):
        for rows in tqdm(batches, disable=not progress, desc="evaluate", unit="batch"):
            ids, mask, _ = pad([encoded[i] for i in rows], pad_id(tokenizer), "right")
            counted = mask.bool()
            counted[:, 0] &= not exclude_first_token  # right-padded: column 0 is every text's first token
            backend.capture(ids, mask, layers=group, reduce=_tally_real_tokens(tallies, counted))
            clean = clean_forward(backend, ids, mask, chunk_positions=chunk_positions)
            if first_pass:
                n_predicted += int(clean.where.sum())
                ce_clean += clean_ce(backend, clean)
            for n in group:
                downstream[n] += torch.tensor([*spliced_cost(backend, ids, mask, clean, n,
                                                             _reconstruct(saes[n], sae_device)),
                                               *spliced_cost(backend, ids, mask, clean, n, _zero)],
                                              dtype=torch.float64)
        if len(groups) > 1:
            release(saes[n] for n in group)
    sums = {"ce_clean": torch.tensor(ce_clean, dtype=torch.float64), "n_predicted": torch.tensor(n_predicted)}
    for n in layers:
        sums |= {f"layer{n}.{key}": value for key, value in tallies[n].sums().items()}
        sums[f"layer{n}.downstream"] = downstream[n]
    return sums


def _tally_real_tokens(tallies: Mapping[int, _Tally], real: torch.Tensor):
    """The capture's ``reduce``: add block n's real tokens to its tally, keep nothing."""

    def reduce(hidden: torch.Tensor, n: int) -> None:
        tallies[n].add(hidden[real.to(hidden.device)])

    return reduce


def _layer_quality(n: int, sae: QwenScopeSAE, sums: Mapping[str, torch.Tensor], ce_clean: float, n_predicted: int,
                   dense_threshold: float) -> LayerQuality:
    """Layer n's numbers from the summed ``layer{n}.*`` tensors of every chunk."""
    tally = {key: sums[f"layer{n}.{key}"] for key in ("n", "sum_x", "sum_x2", "sum_err", "active", "fired")}
    ce_spliced, kl_spliced, ce_zero, kl_zero = (sums[f"layer{n}.downstream"] / n_predicted).tolist()
    n_tokens, d_sae = int(tally["n"]), sae.cfg.d_sae
    fvu = _fvu(n_tokens, tally["sum_x"], float(tally["sum_x2"]), float(tally["sum_err"]))
    dead = int((tally["fired"] == 0).sum())
    dense = int((tally["fired"] > dense_threshold * n_tokens).sum())
    lost = ce_zero - ce_clean
    return LayerQuality(layer=n, n_tokens=n_tokens, n_predicted=n_predicted, fvu=fvu, explained_variance=1 - fvu,
                        mean_l0=int(tally["active"]) / n_tokens, dead_features=dead, dead_fraction=dead / d_sae,
                        dense_features=dense, dense_fraction=dense / d_sae, ce_clean=ce_clean,
                        ce_spliced=ce_spliced, ce_zero=ce_zero, kl_spliced=kl_spliced, kl_zero=kl_zero,
                        ce_loss_recovered=(ce_zero - ce_spliced) / lost if lost != 0 else math.nan)
