"""Where SAE files come from: the Hugging Face hub (lazily, one layer at a time) or a local folder.

    >>> sae = load_sae("qwen-scope-3.5-2b-base-w32k-l100", layer=12)     # hub cache, mmap
    >>> sae = load_sae("./my_saes", layer=3, k=64)                         # folder of layer{n}.sae.pt

``fetch`` is the only function that touches the network; it goes through ``huggingface_hub.hf_hub_download``
and so honours ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE`` and revisions. Loading maps the file and
never copies it. Loaded layers are kept in a bounded, thread-safe LRU (the official app keeps 8).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

from qscope_plugin.catalogue import LICENSE_NOTICE, Release, release
from qscope_plugin.errors import LayerOutOfRangeError, NotCachedError, QScopeError, SAEFileError
from qscope_plugin.sae import QwenScopeSAE

logger = logging.getLogger("qscope_plugin")
DEMO_RELEASE = "qscope-demo-qwen3-4l"
DEMO_SAE_DIR = Path(__file__).parent / "demo" / "assets" / "saes"
"""SAEs of the small demo model shipped inside the package, in the Qwen-Scope file format."""
LOCAL_CONFIG = "qscope.json"
"""Optional file beside local ``layer{n}.sae.pt`` files: ``{"k": 50, "release": "..."}``."""


def layer_filename(layer: int) -> str:
    return f"layer{layer}.sae.pt"


def _drop_from_hub_cache(path: Path) -> None:
    """Remove a bad snapshot entry and the blob behind it, so the next fetch downloads it again."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob != path:
        blob.unlink(missing_ok=True)


def fetch(rel: Release, layer: int, *, revision: str | None = None) -> Path:
    """Download (or find in the hub cache) ``layer{n}.sae.pt`` of a release; returns the local path.

    Raises:
        NotCachedError: offline, or the hub is unreachable, and the file is not cached.
    """
    from huggingface_hub import hf_hub_download, is_offline_mode
    from huggingface_hub.errors import LocalEntryNotFoundError

    rel.check_layer(layer)
    filename, revision = layer_filename(layer), revision or rel.revision
    try:
        return Path(hf_hub_download(rel.repo_id, filename, revision=revision))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if is_offline_mode() else "the Hugging Face hub cannot be reached"
        raise NotCachedError(
            f"{filename} of {rel.repo_id} (revision {revision or 'main'}) is not in the local cache and {why}. "
            f"Download it where the hub is reachable with `qscope fetch {rel.name} --layers {layer}` "
            "(or `hf download REPO FILE`) and point HF_HUB_CACHE at that cache"
        ) from None


def _local_k(folder: Path, k: int | None) -> int:
    if k is not None:
        return k
    cfg_path = folder / LOCAL_CONFIG
    if cfg_path.is_file():
        return int(json.loads(cfg_path.read_text())["k"])
    raise QScopeError(
        f"k is unknown for the local SAE folder {str(folder)!r}: pass k=... or write {LOCAL_CONFIG} "
        'beside the files, e.g. {"k": 50}'
    )


def local_layers(folder: Path) -> list[int]:
    """Sorted layer indices of the ``layer{n}.sae.pt`` files in a folder."""
    return sorted(int(p.name[5:-7]) for p in folder.glob("layer*.sae.pt") if p.name[5:-7].isdigit())


def _load_local(folder: Path, layer: int, k: int | None) -> QwenScopeSAE:
    path = folder / layer_filename(layer)
    if not path.is_file():
        raise LayerOutOfRangeError(
            f"no {path.name} in {str(folder)!r}; layers present: {local_layers(folder) or 'none'}. "
            "Pass one of those layers"
        )
    name = None
    cfg_path = folder / LOCAL_CONFIG
    if cfg_path.is_file():
        name = json.loads(cfg_path.read_text()).get("release")
    return QwenScopeSAE.from_file(path, _local_k(folder, k), layer=layer, release=name)


def _load_release(rel: Release, layer: int, k: int | None, revision: str | None) -> QwenScopeSAE:
    if k is not None and k != rel.k:
        raise QScopeError(f"{rel.name} was trained with k={rel.k}; got k={k}. Leave k unset for hub releases")
    path = fetch(rel, layer, revision=revision)
    try:
        sae = QwenScopeSAE.from_file(path, rel.k, layer=layer, release=rel.name)
    except SAEFileError as e:
        _drop_from_hub_cache(path)
        raise SAEFileError(f"{e} (removed from the cache)") from None
    if (sae.cfg.d_model, sae.cfg.d_sae) != (rel.d_model, rel.d_sae):
        logger.warning("%s layer %d has shape d_model=%d, d_sae=%d; the catalogue says %d, %d",
                       rel.name, layer, sae.cfg.d_model, sae.cfg.d_sae, rel.d_model, rel.d_sae)
    logger.info("%s: %s", rel.name, LICENSE_NOTICE)
    return sae


def _resolve(source: str | os.PathLike) -> Path | Release:
    path = Path(source)
    if path.is_dir():
        return path
    if str(source) == DEMO_RELEASE:
        return DEMO_SAE_DIR
    return release(str(source))


class SAECache:
    """A bounded LRU of loaded SAEs, by count and nominal bytes; concurrent requests share one load."""

    def __init__(self, max_layers: int = 8, max_bytes: int | None = None) -> None:
        self.max_layers, self.max_bytes = max_layers, max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, Future[QwenScopeSAE]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, key: tuple, load) -> QwenScopeSAE:
        with self._lock:
            future = self._entries.get(key)
            owner = future is None
            if owner:
                future = self._entries[key] = Future()
            else:
                self._entries.move_to_end(key)
        if owner:
            try:
                future.set_result(load())
            except BaseException as e:
                with self._lock:
                    self._entries.pop(key, None)  # nothing failed stays cached
                future.set_exception(e)
                raise
            self._evict()
        return future.result()

    def _evict(self) -> None:
        with self._lock:
            def nbytes() -> int:
                return sum(_sae_bytes(f.result()) for f in self._entries.values() if f.done() and not f.exception())

            while len(self._entries) > self.max_layers or (
                self.max_bytes is not None and len(self._entries) > 1 and nbytes() > self.max_bytes
            ):
                self._entries.popitem(last=False)


def _sae_bytes(sae: QwenScopeSAE) -> int:
    return sum(t.nbytes for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec))


DEFAULT_CACHE = SAECache()


def load_sae(source: str | os.PathLike, layer: int, *, k: int | None = None, revision: str | None = None,
             cache: SAECache | None = DEFAULT_CACHE) -> QwenScopeSAE:
    """Load SAE ``layer`` of a release name, HF repo id or local folder of ``layer{n}.sae.pt`` files.

    Args:
        source: SAELens release name (``qwen-scope-3-8b-base-w64k-l50``), its HF repo id, or a folder.
        layer: 0-indexed block whose output the SAE reads.
        k: TopK of a local folder (else read from its ``qscope.json``); must match for hub releases.
        revision: hub revision to pin.
        cache: LRU to keep the loaded layer in; ``None`` loads without caching.
    """
    target = _resolve(source)

    def load() -> QwenScopeSAE:
        if isinstance(target, Path):
            return _load_local(target, layer, k)
        return _load_release(target, target.check_layer(layer), k, revision)

    if cache is None:
        return load()
    key = (str(target) if isinstance(target, Path) else target.name, layer, k, revision)
    return cache.get(key, load)
