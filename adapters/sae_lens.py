"""SAELens adapter: ``SAE.from_pretrained(release, "layer14")`` for Qwen-Scope through the plugin loader.

    >>> import qscope_plugin                      # registers on import (and when sae_lens is imported later)
    >>> from sae_lens import SAE
    >>> sae = SAE.from_pretrained("qwen-scope-3-1.7b-base-w32k-l50", "layer14")

After ``register()``, SAELens' ``qwen_scope`` conversion function is the plugin's: the file is memory-mapped,
``d_in``/``d_sae`` come from the tensors (so custom widths load), and SAELens' parameters are transposed *views*
of the file's tensors instead of ``.T.contiguous()`` copies (docs/upstream.md §1.3: 2.1x file size of peak RSS).
The metadata is corrected: Qwen tokenizers prepend no BOS (``prepend_bos=False``), and the hf hook name is the
text-only layout's ``model.layers.{n}``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.loading import pretrained_sae_loaders as loaders
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory
from sae_lens.saes.sae import SAEMetadata

from qscope_plugin.adapters._fixes import fix_saelens_save_model_non_contiguous
from qscope_plugin.catalogue import Release, release, releases
from qscope_plugin.errors import SAEFileError, UnknownReleaseError
from qscope_plugin.models import DEMO_MODEL_DIR
from qscope_plugin.sae import QScopeSAEConfig, QwenScopeSAE
from qscope_plugin.store import (
    DEMO_RELEASE,
    DEMO_SAE_DIR,
    _local_settings,
    fetch,
    layer_filename,
    load_sae,
    local_layers,
)

__all__ = ["register", "to_sae_lens"]

CONVERSION_FUNC = "qwen_scope"
_LAYER_FILE = re.compile(r"layer(\d+)\.sae\.pt$")
_REPO_ID = re.compile(r"SAE-Res-(.+)-W(\d+)K-L0_(\d+)$")
"""Qwen-Scope repo names: ``Qwen/SAE-Res-{model}-W{N}K-L0_{k}`` (SAELens parses them the same way)."""


def _metadata(cfg: QScopeSAEConfig, model_name: str | None) -> dict[str, Any]:
    layer = cfg.layer
    return {
        "model_name": model_name,
        "hook_name": cfg.hook_name,
        "hf_hook_name": None if layer is None else f"model.layers.{layer}",
        "hook_head_index": None,
        "prepend_bos": False,
        "context_size": 1024,
        "dataset_path": None,
        "sae_lens_training_version": None,
    }


def to_sae_lens(sae: QwenScopeSAE) -> TopKSAE:
    """A SAELens ``TopKSAE`` whose parameters are views of ``sae``'s tensors (no copy).

    The SAE is built on ``meta`` and filled with ``load_state_dict(assign=True)``, as SAELens itself does.
    """
    model_name = release(sae.cfg.release).model_id if sae.cfg.release in {r.name for r in releases()} else None
    cfg = TopKSAEConfig(
        d_in=sae.cfg.d_model, d_sae=sae.cfg.d_sae, k=sae.cfg.k, dtype=str(sae.dtype).removeprefix("torch."),
        device="meta", apply_b_dec_to_input=False, normalize_activations="none",
        metadata=SAEMetadata(**_metadata(sae.cfg, model_name)),
    )
    out = TopKSAE(cfg)
    out.load_state_dict(_saelens_state_dict(sae), assign=True)
    out.cfg.device = str(sae.device)
    return out


def _saelens_state_dict(sae: QwenScopeSAE) -> dict[str, torch.Tensor]:
    """SAELens' ``(d_in, d_sae)`` / ``(d_sae, d_in)`` convention as transposed views of the file layout."""
    return {"W_enc": sae.W_enc.T, "W_dec": sae.W_dec.T, "b_enc": sae.b_enc, "b_dec": sae.b_dec}


def _release_for_repo(repo_id: str) -> Release | None:
    return next((r for r in releases() if r.repo_id == repo_id), None)


def _k_from_repo(repo_id: str) -> int:
    """k of a repo named in the Qwen-Scope scheme; anything else is refused before any network access.

    The messages start with SAELens' own (its tests and callers match on them).
    """
    match = _REPO_ID.search(repo_id)
    if match is None:
        raise UnknownReleaseError(
            f"Could not parse Qwen Scope repo_id: {repo_id}; expected Qwen/SAE-Res-{{model}}-W{{N}}K-L0_{{k}} "
            f"(e.g. {releases()[0].repo_id}). Pass a release name listed by `qscope releases` or such a repo id")
    known = sorted({r.model_id.split("/", 1)[1] for r in releases()})
    if match.group(1) not in known:
        raise UnknownReleaseError(
            f"Unknown Qwen Scope base model: {match.group(1)!r} in {repo_id!r}. Known models: {known}. "
            "Use a repo trained on one of them, or load other SAE files with load_sae(folder, layer, k=...)")
    return int(match.group(3))


def _layer(folder_name: str) -> int:
    match = _LAYER_FILE.search(folder_name)
    if match is None:
        raise SAEFileError(f"Could not find layer number in filename: {folder_name}; a Qwen-Scope SAE file is "
                           "named layer{n}.sae.pt. Pass an SAE id such as 'layer14'")
    return int(match.group(1))


def _config(cfg: QScopeSAEConfig, model_name: str | None, device: str, overrides: dict | None) -> dict[str, Any]:
    return {
        "architecture": "topk",
        "activation_fn": "topk",
        "activation_fn_kwargs": {"k": cfg.k},
        "k": cfg.k,
        "d_in": cfg.d_model,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": device,
        "normalize_activations": "none",
        "apply_b_dec_to_input": False,
        "finetuning_scaling_factor": False,
        **_metadata(cfg, model_name),
        **(overrides or {}),
    }


def _open(repo_id: str, folder_name: str, force_download: bool) -> tuple[QwenScopeSAE, str | None]:
    layer = _layer(folder_name)
    if repo_id == DEMO_RELEASE:  # shipped inside the package: nothing to download
        return load_sae(DEMO_RELEASE, layer, cache=None), str(DEMO_MODEL_DIR)
    k = _k_from_repo(repo_id)
    rel = _release_for_repo(repo_id)
    if rel is None:  # a repo in the Qwen-Scope format that the catalogue does not know
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, folder_name, force_download=force_download)
        return QwenScopeSAE.from_file(path, k, layer=layer, release=repo_id), None
    rel.check_layer(layer)
    if force_download:
        fetch(rel, layer, force_download=True)  # replaces the cached file that load_sae then maps
    return load_sae(rel.name, layer, cache=None), rel.model_id


def qwen_scope_loader(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                      cfg_overrides: dict[str, Any] | None = None):
    """SAELens ``PretrainedSaeHuggingfaceLoader`` for Qwen-Scope files: mmap, widths from the file, no copies."""
    sae, model_name = _open(repo_id, folder_name, force_download)
    return _config(sae.cfg, model_name, device, cfg_overrides), _saelens_state_dict(sae), None


def qwen_scope_config(repo_id: str, folder_name: str, device: str, force_download: bool = False,
                      cfg_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """SAELens config getter. A catalogue release is answered from the catalogue, reading and downloading no file
    (as SAELens' own getter does); the loader still takes the widths from the file. Other repos read the shapes of
    the (memory-mapped) file."""
    rel = _release_for_repo(repo_id)
    if rel is not None:
        layer = rel.check_layer(_layer(folder_name))
        cfg = QScopeSAEConfig(d_model=rel.d_model, d_sae=rel.d_sae, k=rel.k, layer=layer, release=rel.name)
        return _config(cfg, rel.model_id, device, cfg_overrides)
    sae, model_name = _open(repo_id, folder_name, force_download)
    return _config(sae.cfg, model_name, device, cfg_overrides)


def _lookup(name: str, repo_id: str, model: str, layers: list[int], k: int) -> PretrainedSAELookup:
    paths = {f"layer{n}": layer_filename(n) for n in layers}
    return PretrainedSAELookup(
        release=name, repo_id=repo_id, model=model, conversion_func=CONVERSION_FUNC,
        saes_map=paths, expected_var_explained=dict.fromkeys(paths, 1.0), expected_l0=dict.fromkeys(paths, k),
        neuronpedia_id=dict.fromkeys(paths), norm_scaling_factor={}, config_overrides=None,
    )


def _demo_lookup() -> PretrainedSAELookup | None:
    """The embedded demo SAEs, so SAELens tutorials run offline on the CLI's default backbone (``None`` when this
    installation has no demo assets). Its "repo id" is the release name, which ``_open`` serves from the package."""
    layers = local_layers(DEMO_SAE_DIR)
    if not layers:
        return None
    k, _ = _local_settings(DEMO_SAE_DIR, None)
    return _lookup(DEMO_RELEASE, DEMO_RELEASE, str(DEMO_MODEL_DIR), layers, k)


def register() -> list[str]:
    """Route SAELens' Qwen-Scope loading through the plugin; add any release this SAELens lacks, and the demo;
    let ``save_model`` write the loaded SAEs (``_fixes.fix_saelens_save_model_non_contiguous``).

    Idempotent. Returns what it changed (empty on a second call).
    """
    changed = []
    if loaders.NAMED_PRETRAINED_SAE_LOADERS.get(CONVERSION_FUNC) is not qwen_scope_loader:
        loaders.NAMED_PRETRAINED_SAE_LOADERS[CONVERSION_FUNC] = qwen_scope_loader
        loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS[CONVERSION_FUNC] = qwen_scope_config
        changed.append(f"loader:{CONVERSION_FUNC}")
    directory = get_pretrained_saes_directory()  # functools.cache: the dict every SAELens lookup reads
    for rel in releases():
        if rel.name not in directory:
            directory[rel.name] = _lookup(rel.name, rel.repo_id, rel.model_id, list(range(rel.n_layers)), rel.k)
            changed.append(rel.name)
    if DEMO_RELEASE not in directory and (demo := _demo_lookup()) is not None:
        directory[DEMO_RELEASE] = demo
        changed.append(DEMO_RELEASE)
    if fix_saelens_save_model_non_contiguous():  # the loaded SAEs' parameters are views: save_model must copy
        changed.append("fix_saelens_save_model_non_contiguous")
    return changed


register()  # importing the adapter directly (before qscope_plugin saw SAELens load) registers too
