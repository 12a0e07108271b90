"""What every recipe shares: one batched forward over many layers, padding masked, sparse SAE codes per token.

    >>> codes = encode_texts(model, tokenizer, texts, saes)          # saes: {layer: QwenScopeSAE}
    >>> codes[0].token_ids, codes[0].values[14].shape                # (T,), (T, k)

Results do not depend on batch composition or padding side: each text's real tokens are cut out of the batch by
its attention mask before anything is aggregated. Works with any backend whose underlying module is a
transformers model (plain HF, a TransformerLens bridge, an nnsight ``LanguageModel``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qscope_plugin.errors import QScopeError
from qscope_plugin.hooks import capture_residual
from qscope_plugin.sae import QwenScopeSAE


class EmptyInputError(QScopeError, ValueError):
    """A recipe was given no texts (or only empty ones)."""


@dataclass(frozen=True)
class TextCodes:
    """Sparse SAE codes of one text: ``values[layer]`` and ``indices[layer]`` are ``(T, k)`` over its T tokens."""

    token_ids: torch.Tensor
    values: dict[int, torch.Tensor]
    indices: dict[int, torch.Tensor]


def hf_model(model: object) -> nn.Module:
    """The transformers module behind a plain HF model, a TransformerLens bridge or an nnsight model."""
    for attr in ("original_model", "_module"):  # TransformerBridge, nnsight Envoy (LanguageModel)
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    if isinstance(model, nn.Module):
        return model
    raise QScopeError(
        f"cannot find a transformers model inside {type(model).__name__}; pass a transformers model, a "
        "TransformerLens TransformerBridge or an nnsight LanguageModel"
    )


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_texts(texts: Iterable[str], what: str = "texts") -> list[str]:
    texts = list(texts)
    if not texts or not any(t.strip() for t in texts):
        raise EmptyInputError(f"no {what} given; pass at least one non-empty string")
    return texts


@torch.no_grad()
def encode_texts(model: object, tokenizer, texts: Sequence[str], saes: Mapping[int, QwenScopeSAE], *,
                 batch_size: int = 16, max_length: int | None = 512, progress: bool = False) -> list[TextCodes]:
    """Run each batch once, capture every layer in ``saes`` and encode each text's real tokens sparsely."""
    texts = check_texts(texts)
    module = hf_model(model)
    device = next(module.parameters()).device
    out: list[TextCodes] = []
    batches = batched(texts, batch_size)
    for batch in tqdm(batches, total=-(-len(texts) // batch_size), disable=not progress, desc="encode", unit="batch"):
        enc = tokenizer(list(batch), return_tensors="pt", padding=True, truncation=max_length is not None,
                        max_length=max_length, add_special_tokens=False)
        enc = {key: value.to(device) for key, value in enc.items()}
        with capture_residual(module, list(saes)) as acts:
            module(**enc)
        mask = enc["attention_mask"].bool()
        codes = {layer: saes[layer].encode_sparse(acts[layer]) for layer in saes}
        for row in range(mask.shape[0]):
            keep = mask[row]
            out.append(TextCodes(
                token_ids=enc["input_ids"][row][keep].cpu(),
                values={layer: v[row][keep].cpu() for layer, (v, _) in codes.items()},
                indices={layer: i[row][keep].cpu() for layer, (_, i) in codes.items()},
            ))
    return out


def dense_codes(codes: TextCodes, layer: int, d_sae: int) -> torch.Tensor:
    """``(T, d_sae)`` dense activations of one text at one layer."""
    values, indices = codes.values[layer], codes.indices[layer]
    return torch.zeros(values.shape[0], d_sae, dtype=values.dtype).scatter_(-1, indices, values)
