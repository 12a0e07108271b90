"""The Qwen-Scope TopK SAE math, on the file's own tensors.

    >>> sae = QwenScopeSAE.from_file("layer14.sae.pt", k=50)     # milliseconds: mmap, no copy
    >>> z = sae.encode(h)                                         # (..., d_sae), at most k nonzeros
    >>> values, idx = sae.encode_sparse(h)                        # (..., k) each
    >>> h_hat = sae.decode_sparse(values, idx)                    # gathers k decoder columns only
    >>> fast = sae.to()                                           # in-RAM copy, feature-major decoder (fp32)

Equations (docs/method.md §2.3), for one token's block output ``x`` (no centring, no ``b_dec`` subtraction):

    (E1) pre(x) = x @ W_enc.T + b_enc
    (E2) z(x)   = scatter(TopK_k(ReLU(pre(x))))
    (E3) x_hat  = z @ W_dec.T + b_dec

The on-disk layouts are kept (``W_enc (d_sae, d_model)``, ``W_dec (d_model, d_sae)``): both are exactly the
``nn.Linear`` weight layouts of the two products, so ``F.linear`` runs on them directly. SAELens instead makes
transposed copies, which doubles peak memory and is ~80x slower in bf16 on AVX2 CPUs (docs/upstream.md §1.3, §1.4).
A float32 or CUDA ``.to()`` copy stores the decoder feature-major instead (same logical shape), which makes the
sparse decode an embedding-bag over contiguous rows.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from qscope_plugin.errors import QScopeWarning, SAEFileError, SAEInputError, feature_out_of_range

if TYPE_CHECKING:
    from sae_lens import TopKSAE

SAE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STAGING_ELEMENTS = 1 << 24
"""Most elements ``.to()`` transposes in one step (64 MiB in float32)."""
ENCODE_BUDGET_BYTES = 256 << 20
"""Most bytes of pre-activations ``(tokens, d_sae)`` one encode step holds: a larger batch is encoded in chunks of
tokens (at W128K one token's pre-activations take 512 KiB, so 8,192 tokens would otherwise take 4 GiB at once)."""


@dataclass(frozen=True)
class QScopeSAEConfig:
    """Shape and provenance of one SAE; built from the tensors, never from a repo name."""

    d_model: int
    d_sae: int
    k: int
    layer: int | None = None
    release: str | None = None

    @property
    def hook_name(self) -> str | None:
        """TransformerLens / SAELens hook point: the raw output of block ``layer``."""
        return None if self.layer is None else f"blocks.{self.layer}.hook_resid_post"


def read_state_dict(path: str | Path, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Open a ``layer{n}.sae.pt`` safely and check its structure without reading the weights.

    ``weights_only=True`` refuses pickles that would run code; ``mmap=True`` maps the tensors lazily.

    Raises:
        SAEFileError: unreadable, unsafe, truncated, or not the four Qwen-Scope tensors with matching shapes.
    """
    path = Path(path)
    fix = "delete the file and download it again (`qscope fetch RELEASE --layers N`)"
    try:
        sd = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        # PyTorch's own text advises re-running with weights_only=False, i.e. executing the file: never repeat it
        culprit = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it references the Python object {culprit.group(1)}" if culprit else "it holds Python objects"
        raise SAEFileError(
            f"refused to load {str(path)!r}: it is not a plain tensor file ({what}). Qwen-Scope files hold only "
            f"four tensors, so this file is corrupt or malicious; {fix}"
        ) from None
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise SAEFileError(f"cannot read {str(path)!r} ({str(e).splitlines()[0]}); {fix}") from None
    if not isinstance(sd, dict) or not all(isinstance(sd.get(key), torch.Tensor) for key in SAE_KEYS):
        found = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
        raise SAEFileError(f"{str(path)!r} is not a Qwen-Scope SAE: expected tensors {list(SAE_KEYS)}, found {found}")
    extra = sorted(set(sd) - set(SAE_KEYS))
    if extra:
        raise SAEFileError(
            f"{str(path)!r} has unexpected entries {extra}; a Qwen-Scope file holds exactly {list(SAE_KEYS)}"
        )
    W_enc, W_dec, b_enc, b_dec = (sd[key] for key in SAE_KEYS)
    if W_enc.ndim != 2:
        raise SAEFileError(f"{str(path)!r}: W_enc must be 2-D (d_sae, d_model), got shape {tuple(W_enc.shape)}")
    d_sae, d_model = W_enc.shape
    expected = {"W_dec": (d_model, d_sae), "b_enc": (d_sae,), "b_dec": (d_model,)}
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise SAEFileError(
                f"{str(path)!r}: {key} has shape {tuple(sd[key].shape)}, expected {shape} "
                f"for W_enc of shape {(d_sae, d_model)} (d_sae, d_model)"
            )
    dtypes = {sd[key].dtype for key in SAE_KEYS}
    if len(dtypes) != 1 or not dtypes <= set(_FLOAT_DTYPES):
        raise SAEFileError(f"{str(path)!r}: tensors must share one float dtype, found {sorted(map(str, dtypes))}")
    return {key: sd[key] for key in SAE_KEYS}


def half_gemm_prefers_transposed() -> bool:
    """Whether this CPU runs bf16/fp16 products fast from transposed (SAELens') memory.

    AVX2 CPUs have no bf16 GEMM kernel for it: x @ W with W in (d_model, d_sae) memory is ~80x slower than on the
    file's (d_sae, d_model) memory (docs/upstream.md §1.4), so ``.to()`` keeps the file layout there. AVX-512 CPUs
    (oneDNN's bf16 kernels) are fast on both, and faster on SAELens' layout (encode+decode 0.80x SAELens when the
    file layout was kept). Decided by the capability torch reports for its own kernels.
    """
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _transposed_copy(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A copy of 2-D ``t`` (same shape and values) whose memory is transposed, written block by block so that
    no second full copy is ever made (a single transposing copy to CUDA would stage one in host RAM)."""
    rows = torch.empty(t.shape[1], t.shape[0], device=device, dtype=dtype)
    block = max(1, STAGING_ELEMENTS // t.shape[0])
    for start in range(0, t.shape[1], block):
        rows[start : start + block].copy_(t[:, start : start + block].T)
    return rows.T


class QwenScopeSAE:
    """One Qwen-Scope TopK SAE. Immutable: ``.to()`` returns a new SAE.

    Attributes:
        W_enc: ``(d_sae, d_model)``, rows are features.
        W_dec: ``(d_model, d_sae)``, columns are feature directions.
        b_enc: ``(d_sae,)``.
        b_dec: ``(d_model,)``.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], cfg: QScopeSAEConfig) -> None:
        self.W_enc, self.W_dec, self.b_enc, self.b_dec = (state_dict[key] for key in SAE_KEYS)
        self.cfg = cfg
        if not 0 < cfg.k <= cfg.d_sae:
            raise SAEInputError(f"k={cfg.k} is invalid for d_sae={cfg.d_sae}; expected 1 <= k <= d_sae")
        self._decoder_norms: torch.Tensor | None = None
        self._on_invalid: list[Callable[[], None]] = []
        """Called once when ``validate()`` fails, e.g. to drop this SAE from the LRU of ``load_sae``."""
        self._warned_non_finite = False

    @classmethod
    def from_file(cls, path: str | Path, k: int, *, layer: int | None = None, release: str | None = None,
                  mmap: bool = True) -> QwenScopeSAE:
        """Load a ``layer{n}.sae.pt`` file; widths come from the tensors, so custom SAEs load too."""
        sd = read_state_dict(path, mmap=mmap)
        d_sae, d_model = sd["W_enc"].shape
        return cls(sd, QScopeSAEConfig(d_model=d_model, d_sae=d_sae, k=k, layer=layer, release=release))

    def __repr__(self) -> str:
        c = self.cfg
        where = f"{c.release}/layer{c.layer}" if c.release else f"layer{c.layer}"
        return (f"QwenScopeSAE({where}, d_model={c.d_model}, d_sae={c.d_sae}, k={c.k}, "
                f"dtype={self.dtype}, device={self.device})")

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def to(self, device: str | torch.device | int | None = None, dtype: torch.dtype | None = None) -> QwenScopeSAE:
        """An in-memory copy on ``device`` in ``dtype`` (one copy; the mmap'd original is untouched).

        The copy is the moment to choose a layout for free. In float32, and on CUDA, the decoder is stored
        feature-major: the same ``(d_model, d_sae)`` tensor as a view of ``(d_sae, d_model)`` memory, so each
        feature direction is one contiguous row and ``decode_sparse`` reads exactly the k rows a token uses.
        bf16/fp16 copies on CPU follow ``half_gemm_prefers_transposed()``: AVX2 CPUs keep the file layout (a
        transposed bf16 GEMM is ~80x slower there, docs/upstream.md §1.4); AVX-512 CPUs get SAELens' layout
        (encoder in ``(d_model, d_sae)`` memory, decoder feature-major). ``sae.to()`` with no arguments copies on
        the current device and dtype.
        """
        from qscope_plugin.models import check_device

        # A device this machine lacks (cuda without CUDA) is the project's one-line DeviceError, not torch's.
        device = self.device if device is None else check_device(str(torch.device(device)))
        dtype = dtype or self.dtype
        sd = {key: getattr(self, key).to(device=device, dtype=dtype, copy=True) for key in ("b_enc", "b_dec")}
        half_on_cpu = device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
        if half_on_cpu and not half_gemm_prefers_transposed():
            sd["W_dec"] = self.W_dec.to(device=device, dtype=dtype, copy=True)
        else:
            sd["W_dec"] = _transposed_copy(self.W_dec, device, dtype)
        if half_on_cpu and half_gemm_prefers_transposed():  # SAELens' (d_model, d_sae) encoder memory
            sd["W_enc"] = _transposed_copy(self.W_enc, device, dtype)
        else:
            sd["W_enc"] = self.W_enc.to(device=device, dtype=dtype, copy=True)
        return QwenScopeSAE(sd, self.cfg)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[-1] != self.cfg.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise SAEInputError(
                f"activations of shape {got} do not fit this SAE: expected (..., {self.cfg.d_model}) residual "
                f"vectors (the raw output of decoder block n)"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(E1) Signed pre-activations ``(..., d_sae)``, no ReLU and no TopK (used by SASFT)."""
        return F.linear(self._check_input(x), self.W_enc, self.b_enc)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E2) as ``(values, indices)``, each ``(..., k)``; values are >= 0 (zeros where < k are positive).

        Pre-activations of at most ``ENCODE_BUDGET_BYTES`` exist at a time: a long batch is encoded in chunks
        of tokens, each written into the result (same values as one product; peak memory bounded at any width).

        Non-finite activations (a NaN from an upstream bf16 overflow) warn once per SAE instead of silently
        becoming features; the check is one reduction, skipped once it has warned.
        """
        x = self._check_input(x)
        if not self._warned_non_finite and not bool(torch.isfinite(x).all()):
            self._warned_non_finite = True
            bad = int((~torch.isfinite(x)).sum())
            where = f"{self.cfg.release or 'SAE'} layer {self.cfg.layer}"
            warnings.warn(f"{where}: {bad} of {x.numel()} input activations are NaN/inf, so its features for those "
                          "tokens are meaningless; check the model's dtype (bf16 overflow) and the hooked layer "
                          "(warned once per SAE)", QScopeWarning, stacklevel=2)
        rows = x.reshape(-1, self.cfg.d_model)
        step = max(1, ENCODE_BUDGET_BYTES // (self.cfg.d_sae * x.element_size()))
        if rows.shape[0] <= step:
            values, indices = F.linear(x, self.W_enc, self.b_enc).topk(self.cfg.k, dim=-1, sorted=False)
            return values.relu_(), indices
        values = torch.empty(rows.shape[0], self.cfg.k, dtype=x.dtype, device=x.device)
        indices = torch.empty(rows.shape[0], self.cfg.k, dtype=torch.long, device=x.device)
        for start in range(0, rows.shape[0], step):
            chunk = F.linear(rows[start : start + step], self.W_enc, self.b_enc)
            torch.topk(chunk, self.cfg.k, dim=-1, sorted=False,
                       out=(values[start : start + step], indices[start : start + step]))
        lead = x.shape[:-1]
        return values.relu_().reshape(*lead, self.cfg.k), indices.reshape(*lead, self.cfg.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(E2) Dense feature activations ``(..., d_sae)`` with at most k nonzeros per token."""
        values, indices = self.encode_sparse(x)
        return torch.zeros(*values.shape[:-1], self.cfg.d_sae, dtype=values.dtype,
                           device=values.device).scatter_(-1, indices, values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(E3) Reconstruction ``(..., d_model)`` from dense activations ``(..., d_sae)``."""
        if z.shape[-1] != self.cfg.d_sae:
            raise SAEInputError(f"feature activations of shape {tuple(z.shape)} do not fit d_sae={self.cfg.d_sae}")
        return F.linear(z.to(self.dtype), self.W_dec, self.b_dec)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(E3) from ``(values, indices)`` of shape ``(..., k)``: reads only the decoder columns in use.

        With a feature-major decoder (a float32 or CUDA ``.to()`` copy) this is one embedding-bag over the k contiguous
        rows per token. On the file layout (mmap) a column is strided, so the batch's unique feature ids are
        gathered once and combined with one small product instead.
        """
        if values.shape != indices.shape:
            raise SAEInputError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must match")
        lead, k = values.shape[:-1], values.shape[-1]
        indices = indices.to(device=self.device, dtype=torch.long)
        if k == 0:
            return self.b_dec.expand(*lead, self.cfg.d_model).clone()
        if self.W_dec.T.is_contiguous():
            summed = F.embedding_bag(indices.reshape(-1, k), self.W_dec.T, mode="sum",
                                     per_sample_weights=values.reshape(-1, k).to(device=self.device, dtype=self.dtype))
            return (summed + self.b_dec).reshape(*lead, self.cfg.d_model)
        flat_idx = indices.reshape(-1)
        used, slot = flat_idx.unique(return_inverse=True)
        columns = self.W_dec.index_select(1, used)  # (d_model, n_used)
        n_tokens = flat_idx.numel() // k
        coef = torch.zeros(n_tokens, used.numel(), dtype=self.dtype, device=self.device)
        rows = torch.arange(n_tokens, device=self.device).repeat_interleave(k)
        coef.index_put_((rows, slot), values.reshape(-1).to(device=self.device, dtype=self.dtype), accumulate=True)
        return torch.addmm(self.b_dec, coef, columns.T).reshape(*lead, self.cfg.d_model)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``, computed sparsely."""
        return self.decode_sparse(*self.encode_sparse(x))

    def fvu(self, x: torch.Tensor) -> float:
        """(E4) Fraction of variance unexplained over all tokens of ``x`` ``(..., d_model)``."""
        x = self._check_input(x).reshape(-1, self.cfg.d_model).float()
        err = (x - self.reconstruct(x).float()).pow(2).sum()
        return (err / (x - x.mean(0)).pow(2).sum()).item()

    def _check_feature(self, feature: int) -> int:
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < self.cfg.d_sae:
            raise feature_out_of_range(feature, self.cfg.d_sae)
        return feature

    def decoder_norms(self) -> torch.Tensor:
        """``||W_dec[:, i]||`` for every feature ``(d_sae,)``, float32; computed once (one pass over W_dec)."""
        if self._decoder_norms is None:
            self._decoder_norms = torch.linalg.vector_norm(self.W_dec.float(), dim=0)
        return self._decoder_norms

    def direction(self, feature: int, *, normalize: bool = False) -> torch.Tensor:
        """Decoder column ``d_i = W_dec[:, i]`` ``(d_model,)``: raw (official app) or unit-norm."""
        d = self.W_dec[:, self._check_feature(feature)].float()
        return d / d.norm() if normalize else d.clone()

    def encoder_rows(self, features: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_enc[features], b_enc[features])``: what is needed to read a few features remotely."""
        ids = torch.as_tensor(features, dtype=torch.long)
        for f in ids.tolist():
            self._check_feature(f)
        return self.W_enc.index_select(0, ids).float(), self.b_enc.index_select(0, ids).float()

    def validate(self) -> QwenScopeSAE:
        """Read every value once: all finite, decoder not degenerate. Raises ``SAEFileError``; returns self.

        On failure the SAE is also dropped from every ``SAECache`` that holds it, so the next ``load_sae``
        reads the file again instead of returning the bad SAE.
        """
        try:
            self._validate()
        except SAEFileError:
            hooks, self._on_invalid = self._on_invalid, []
            for hook in hooks:
                hook()
            raise
        return self

    def _validate(self) -> None:
        where = f"{self.cfg.release or 'SAE'} layer {self.cfg.layer}"
        for key in SAE_KEYS:
            t = getattr(self, key)
            if not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).sum().item()
                raise SAEFileError(f"{where}: {key} has {bad} non-finite values (NaN/inf); the file is corrupt, "
                                   "delete it and download it again")
        norms = self.decoder_norms()
        dead = int((norms == 0).sum())
        if dead == self.cfg.d_sae:
            raise SAEFileError(f"{where}: every decoder column is zero; the file is corrupt")
        if dead:
            warnings.warn(f"{where}: {dead} of {self.cfg.d_sae} decoder columns are zero", QScopeWarning,
                          stacklevel=2)
        if not math.isfinite(norms.max().item()):
            raise SAEFileError(f"{where}: decoder norms overflow")

    def to_sae_lens(self) -> TopKSAE:
        """A SAELens ``TopKSAE`` whose parameters are views of this SAE's tensors (no copy)."""
        from qscope_plugin.adapters.sae_lens import to_sae_lens

        return to_sae_lens(self)
