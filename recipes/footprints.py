"""Benchmark footprints (report §4, R3): the SAE features active at each sample's last prompt token.

    >>> data = load_table("gsm8k.jsonl")                             # recipes.data; or a hub id with config / split
    >>> fp = harvest_footprints(model, tok, data, saes, template="Question: {question}\\nAnswer:",
    ...                         out="gsm8k.footprints.safetensors")
    >>> fp[14].support()                                               # m_j: samples in which feature j fires

A footprint is a sparse boolean matrix (samples × features), stored as CSR (``indptr`` / ``indices`` per layer) in
one safetensors file whose metadata holds the provenance (model, release, layers, k, revisions, prompt format).
Only the indices are kept in memory: nothing grows with the dataset but them.

The harvest writes finished chunks of samples under ``<out>.partial/`` (``qscope_plugin.distributed``: each file
written atomically), so a killed run resumes where it stopped; rank 0 writes the merged file and the chunks are
removed. Under ``torchrun`` every rank harvests its share of the chunks (the output folder must be shared by the
ranks); a script launched by ``torchrun`` joins the group with
``with qscope_plugin.distributed.torchrun_group() as (rank, device):``.
The forward pass stops after the deepest layer asked for: later blocks and the LM head are never run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qscope_plugin.backends import as_backend
from qscope_plugin.distributed import checkpoints, rank_and_world, run_chunks
from qscope_plugin.errors import QScopeError, malformed_file
from qscope_plugin.recipes._harvest import harvest
from qscope_plugin.sae import QwenScopeSAE


class FootprintError(QScopeError, ValueError):
    """A footprint file, prompt format or harvest request that cannot be used."""


@dataclass(frozen=True)
class LayerFootprints:
    """F(x_i) for every sample i at one layer, as CSR: sample i's features are ``indices[indptr[i]:indptr[i+1]]``."""

    indptr: np.ndarray
    indices: np.ndarray
    d_sae: int

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def sample(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i] : self.indptr[i + 1]]

    def support(self) -> np.ndarray:
        """``m_j``: the number of samples whose footprint contains feature j, ``(d_sae,)``."""
        return np.bincount(self.indices, minlength=self.d_sae)

    def features(self) -> np.ndarray:
        """F(D) (R4): the sorted union of all samples' footprints."""
        return np.flatnonzero(self.support())

    def matrix(self):
        """The footprints as a ``scipy.sparse.csr_array`` of booleans, ``(n_samples, d_sae)``."""
        from scipy.sparse import csr_array

        data = np.ones(len(self.indices), dtype=bool)
        return csr_array((data, self.indices, self.indptr), shape=(len(self), self.d_sae))


@dataclass(frozen=True)
class Footprints:
    """Footprints of one benchmark at one or more layers, with where they came from."""

    layers: dict[int, LayerFootprints]
    provenance: dict

    def __getitem__(self, layer: int) -> LayerFootprints:
        if layer not in self.layers:
            raise FootprintError(f"no footprints for layer {layer}; this file has layers {sorted(self.layers)}")
        return self.layers[layer]

    @property
    def name(self) -> str:
        return self.provenance.get("benchmark", "benchmark")

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.layers.values())))

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file (``layer{n}.indptr`` / ``layer{n}.indices``), written atomically."""
        tensors = {}
        for n, fp in self.layers.items():
            tensors[f"layer{n}.indptr"] = torch.from_numpy(np.ascontiguousarray(fp.indptr, dtype=np.int64))
            tensors[f"layer{n}.indices"] = torch.from_numpy(np.ascontiguousarray(fp.indices, dtype=np.int32))
        meta = {"provenance": json.dumps(self.provenance, sort_keys=True),
                "d_sae": json.dumps({str(n): fp.d_sae for n, fp in self.layers.items()})}
        return _atomic_save(tensors, meta, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Footprints:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except (OSError, SafetensorError) as e:
            raise FootprintError(f"cannot read footprint file {str(path)!r} ({e}); expected a file written by "
                                 "harvest_footprints / `qscope footprints`") from None
        if "provenance" not in meta or "d_sae" not in meta:
            raise FootprintError(f"{str(path)!r} is a safetensors file but not a footprint file (no provenance); "
                                 "write one with `qscope footprints`")
        try:
            widths = {int(n): d for n, d in json.loads(meta["d_sae"]).items()}
            layers = {n: _checked(tensors[f"layer{n}.indptr"].numpy(), tensors[f"layer{n}.indices"].numpy(), d, n)
                      for n, d in sorted(widths.items())}
            provenance = json.loads(meta["provenance"])
            if not isinstance(provenance, dict):
                raise TypeError(f"provenance is {type(provenance).__name__}, not an object")
        except (ValueError, KeyError, TypeError, AttributeError, FootprintError) as e:
            raise malformed_file(path, f"is not a valid footprint file ({type(e).__name__}: {e})",
                                 "a file written by harvest_footprints / `qscope footprints`") from None
        return cls(layers, provenance)


def _checked(indptr: np.ndarray, indices: np.ndarray, d_sae: object, layer: int) -> LayerFootprints:
    """One layer's CSR arrays as read from a file, checked to be one (a foreign or edited file can hold any)."""
    if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
        raise ValueError(f"layer {layer}: d_sae {d_sae!r} is not a positive integer")
    if indptr.ndim != 1 or indices.ndim != 1 or len(indptr) < 1 or indptr[0] != 0 \
            or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
        raise ValueError(f"layer {layer}: indptr does not index its {len(indices)} feature ids")
    if len(indices) and (indices.min() < 0 or indices.max() >= d_sae):
        raise ValueError(f"layer {layer}: feature ids outside 0..{d_sae - 1}")
    return LayerFootprints(indptr, indices, d_sae)


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> Path:
    """Write next to ``path`` and rename, so a reader never sees half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------- prompts


PromptFormat = Callable[[dict], str]


def prompt_format(*, column: str | None = None, template: str | None = None,
                  formatter: PromptFormat | None = None) -> tuple[PromptFormat, str]:
    """The function that turns a dataset row into prompt text, and its description for the provenance."""
    given = [x is not None for x in (column, template, formatter)]
    if sum(given) != 1:
        raise FootprintError("give exactly one of column (a text column), template (e.g. 'Q: {question}\\nA:') "
                             "or formatter (a function of the row)")
    if column is not None:
        return (lambda row: row[column]), f"column:{column}"
    if template is not None:
        return (lambda row: template.format(**row)), f"template:{template}"
    return formatter, f"formatter:{getattr(formatter, '__module__', '?')}.{getattr(formatter, '__qualname__', '?')}"


def _texts(dataset, fmt: PromptFormat, start: int, stop: int) -> list[str]:
    """Prompts of samples ``start:stop``: rows of a ``datasets.Dataset`` or items of a list, through ``fmt``."""
    if hasattr(dataset, "column_names"):
        batch = dataset[start:stop]  # a datasets.Dataset slice: {column: [values]}
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    else:
        rows = list(dataset[start:stop])
    try:
        return [str(fmt(row)) for row in rows]
    except (KeyError, IndexError, TypeError) as e:
        columns = getattr(dataset, "column_names", sorted(rows[0]) if rows and isinstance(rows[0], dict) else [])
        raise FootprintError(f"the prompt format needs field {e} that the dataset lacks; its columns are "
                             f"{columns}") from None

# --------------------------------------------------------------------------------------------- harvest


def _csr(per_sample: Sequence[np.ndarray], d_sae: int) -> LayerFootprints:
    lengths = np.fromiter((len(f) for f in per_sample), dtype=np.int64, count=len(per_sample))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate(per_sample).astype(np.int32) if len(per_sample) else np.zeros(0, np.int32)
    return LayerFootprints(indptr, indices, d_sae)


def _concat(parts: Sequence[LayerFootprints]) -> LayerFootprints:
    offsets = np.cumsum([0] + [p.indptr[-1] for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + off for p, off in zip(parts, offsets, strict=True)])
    return LayerFootprints(indptr, np.concatenate([p.indices for p in parts]), parts[0].d_sae)


def _provenance(model, tokenizer, dataset, saes, fmt_desc: str, name: str | None, max_length: int | None,
                n_samples: int) -> dict:
    import qscope_plugin

    module = as_backend(model).module
    config = getattr(module, "config", None)
    info = getattr(dataset, "info", None)
    first = next(iter(saes.values())).cfg
    return {
        "benchmark": name or (getattr(info, "dataset_name", None) or "benchmark"),
        "dataset": getattr(info, "dataset_name", None) or getattr(info, "config_name", None),
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None) or _text_hash(dataset),
        "n_samples": n_samples,
        "prompt_format": fmt_desc,
        "position": "last prompt token (no special tokens added)",
        "max_length": max_length,
        "model": getattr(config, "_name_or_path", None) or type(module).__name__,
        "model_revision": getattr(config, "_commit_hash", None),
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "release": first.release,
        "layers": sorted(saes),
        "k": first.k,
        "d_sae": first.d_sae,
        "threshold": "z_j > 0",
        "qscope_plugin": qscope_plugin.__version__,  # "0+unknown" from an uninstalled source tree
    }


def _text_hash(texts) -> str:
    import hashlib

    digest = hashlib.sha256()
    for text in texts:
        digest.update(str(text).encode() + b"\0")
    return digest.hexdigest()[:16]


def harvest_footprints(model: object, tokenizer, dataset, saes: Mapping[int, QwenScopeSAE], *,
                       column: str | None = None, template: str | None = None,
                       formatter: PromptFormat | None = None, name: str | None = None, batch_size: int = 16,
                       max_length: int | None = 2048, chunk_size: int = 1024, padding_side: str = "right",
                       out: str | os.PathLike | None = None, progress: bool = True,
                       provenance: Mapping[str, object] | None = None) -> Footprints:
    """F(x_i) (R3) for every sample of ``dataset`` at every layer in ``saes``.

    Args:
        dataset: a ``datasets.Dataset`` (see ``recipes.data.load_table``), a list of prompt strings or of dicts.
        column / template / formatter: how a row becomes the prompt (exactly one; not needed for strings).
        name: the benchmark's name in reports (default: the dataset's name).
        max_length: longer prompts keep their last ``max_length`` tokens, so the last token is always real.
        padding_side: ``right`` (default; the real tokens of a causal model never see padding) or ``left``.
        out: footprint file; enables checkpointing to ``<out>.partial/`` and resuming, and is required with
            several ``torch.distributed`` ranks.
        provenance: more to record about the prompts (e.g. the lm-eval task and few-shot settings); part of
            what makes a resumed or existing output "the same run".
    """
    if not saes:
        raise FootprintError("no SAEs given; pass {layer: QwenScopeSAE} for at least one layer")
    if padding_side not in ("left", "right"):
        raise FootprintError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
    if batch_size < 1 or chunk_size < 1:
        raise FootprintError("batch_size and chunk_size must be >= 1")
    n_samples = len(dataset)
    if n_samples == 0:
        raise FootprintError("the dataset is empty; footprints need at least one sample")
    strings = not hasattr(dataset, "column_names") and isinstance(dataset[0], str)
    fmt, fmt_desc = (str, "text") if strings else prompt_format(column=column, template=template, formatter=formatter)
    saes = dict(sorted(saes.items()))
    provenance = {**_provenance(model, tokenizer, dataset, saes, fmt_desc, name, max_length, n_samples),
                  **(provenance or {})}
    if out is not None and Path(out).exists():
        existing = Footprints.load(out)
        if not _same_run(existing.provenance, provenance):
            raise FootprintError(f"{out} already holds footprints of a different run (model, SAEs, data or prompt "
                                 "format differ); delete it or choose another output path")
        return existing
    prompts = (text for s in range(0, n_samples, chunk_size) for text in _texts(dataset, fmt, s, min(s + chunk_size,
                                                                                                     n_samples)))
    shown = progress and rank_and_world()[0] == 0

    def harvest_chunk(start: int, texts: list[str]) -> dict[str, torch.Tensor]:
        last = harvest(model, tokenizer, texts, saes, pooling="last", batch_size=batch_size, max_length=max_length,
                       truncation_side="left", padding_side=padding_side, progress=shown, desc="footprints")
        return _to_tensors({n: _csr(feats, saes[n].cfg.d_sae) for n, feats in last.items()})

    settings = {k: v for k, v in provenance.items() if k != "qscope_plugin"}
    work_dir = None if out is None else Path(out).with_name(Path(out).name + ".partial")
    with checkpoints(work_dir, chunk_size=chunk_size):
        parts = run_chunks(prompts, harvest_chunk, name="footprints", settings=settings)
        merged = Footprints({n: _concat([_from_tensors(p, n, saes[n].cfg.d_sae) for p in parts]) for n in saes},
                            provenance)
        if out is not None and rank_and_world()[0] == 0:
            merged.save(out)
    return merged


def _to_tensors(layers: Mapping[int, LayerFootprints]) -> dict[str, torch.Tensor]:
    return {key: value for n, fp in layers.items() for key, value in (
        (f"layer{n}.indptr", torch.from_numpy(np.ascontiguousarray(fp.indptr, dtype=np.int64))),
        (f"layer{n}.indices", torch.from_numpy(np.ascontiguousarray(fp.indices, dtype=np.int32))))}


def _from_tensors(part: Mapping[str, torch.Tensor], n: int, d_sae: int) -> LayerFootprints:
    return LayerFootprints(part[f"layer{n}.indptr"].numpy(), part[f"layer{n}.indices"].numpy(), d_sae)


def _same_run(a: dict, b: dict) -> bool:
    volatile = ("qscope_plugin",)
    return {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}
