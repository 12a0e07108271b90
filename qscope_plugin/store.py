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
import sys
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

from qscope_plugin.catalogue import LICENSE_NOTICE, Release, release
from qscope_plugin.errors import (
    HubError,
    HubFileNotFoundError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubUnreachableError,
    LayerOutOfRangeError,
    NotCachedError,
    QScopeError,
    QScopeWarning,
    SAEFileError,
)
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _error_classes(names: dict[str, tuple[str, ...]], *builtin: type[BaseException]) -> tuple[type, ...]:
    """Exception classes of HTTP clients that are already imported (a module not imported cannot raise)."""
    out: list[type] = list(builtin)
    for module, attrs in names.items():
        mod = sys.modules.get(module)
        out += [getattr(mod, a) for a in attrs if isinstance(getattr(mod, a, None), type)]
    return tuple(out)


def _discard_partial_downloads(repo_id: str) -> None:
    """Remove ``blobs/*.incomplete`` files of a repo that no process is writing (their etag lock is free)."""
    from filelock import FileLock, Timeout
    from huggingface_hub import constants

    folder = f"models--{repo_id.replace('/', '--')}"
    root = Path(constants.HF_HUB_CACHE)
    for part in (root / folder / "blobs").glob("*.incomplete"):
        lock_path = root / ".locks" / folder / f"{part.name.split('.')[0]}.lock"
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(lock_path, timeout=0):
                part.unlink(missing_ok=True)
        except (Timeout, OSError):  # another process is downloading it, or the cache is read-only
            continue


def _hub_error(e: BaseException, rel: Release, filename: str, revision: str | None, layer: int) -> QScopeError | None:
    """The plugin error for an exception of ``hf_hub_download``; ``None`` when it is not a hub/network failure."""
    from huggingface_hub import errors as hf

    what = f"{filename} of {rel.repo_id} (revision {revision or 'main'})"
    retry = f"run `qscope fetch {rel.name} --layers {layer}` again"
    if isinstance(e, hf.GatedRepoError):
        return HubRepoNotFoundError(
            f"{rel.repo_id} is gated: cannot download {what}. Accept its terms on "
            f"https://huggingface.co/{rel.repo_id} and log in (`hf auth login` or HF_TOKEN), then {retry}")
    if isinstance(e, hf.RepositoryNotFoundError):
        return HubRepoNotFoundError(
            f"the hub has no repository {rel.repo_id!r} visible to you (release {rel.name}); expected a public "
            f"Qwen-Scope repo. Check the release name with `qscope releases`; if the repo is private, log in "
            f"(`hf auth login` or HF_TOKEN), then {retry}")
    if isinstance(e, hf.RevisionNotFoundError):
        return HubRevisionNotFoundError(
            f"revision {revision!r} does not exist in {rel.repo_id}; expected a branch, tag or full commit hash "
            f"of that repo (see https://huggingface.co/{rel.repo_id}/commits/main). Pass an existing revision "
            "or leave revision unset")
    if isinstance(e, hf.EntryNotFoundError):
        return HubFileNotFoundError(
            f"{rel.repo_id} has no {filename} at revision {revision or 'main'}; the catalogue expects layers "
            f"0..{rel.n_layers - 1} there. Pick another revision or layer (`qscope info {rel.name}`)")
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return HubError(
            f"the hub answered HTTP {status or '?'} while downloading {what} ({_first_line(e)}); expected a "
            f"file download. For 401/403 log in (`hf auth login` or HF_TOKEN); otherwise {retry} later")
    network = _error_classes({"httpx2": ("TransportError",), "httpx": ("TransportError",),
                              "requests": ("ConnectionError", "Timeout")}, ConnectionError, TimeoutError)
    if isinstance(e, network):
        return HubUnreachableError(
            f"could not download {what}: the hub cannot be reached ({type(e).__name__}: {_first_line(e)}). "
            f"Check the network or proxy (HTTPS_PROXY) and {retry}, or set HF_HUB_OFFLINE=1 to use the cache only")
    other = _error_classes({"httpx2": ("HTTPError",), "httpx": ("HTTPError",), "requests": ("RequestException",)},
                           OSError)
    if isinstance(e, other):
        return HubError(
            f"downloading {what} failed ({type(e).__name__}: {_first_line(e)}); expected a complete file in "
            f"the hub cache. Check free disk space and write access to HF_HUB_CACHE, then {retry}")
    return None


def fetch(rel: Release, layer: int, *, revision: str | None = None, force_download: bool = False) -> Path:
    """Download (or find in the hub cache; ``force_download`` downloads again) ``layer{n}.sae.pt`` of a release;
    returns the local path.

    Raises:
        NotCachedError: offline, or the hub is unreachable, and the file is not cached.
        HubError: the repo, revision or file does not exist, the hub answered an HTTP error, or the transfer
            failed (``HubRepoNotFoundError``, ``HubRevisionNotFoundError``, ``HubFileNotFoundError``,
            ``HubUnreachableError``). No partial download is left in the cache.
    """
    from huggingface_hub import hf_hub_download, is_offline_mode
    from huggingface_hub.errors import LocalEntryNotFoundError

    rel.check_layer(layer)
    filename, revision = layer_filename(layer), revision or rel.revision
    try:
        return Path(hf_hub_download(rel.repo_id, filename, revision=revision, force_download=force_download))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if is_offline_mode() else "the Hugging Face hub cannot be reached"
        raise NotCachedError(
            f"{filename} of {rel.repo_id} (revision {revision or 'main'}) is not in the local cache and {why}. "
            f"Download it where the hub is reachable with `qscope fetch {rel.name} --layers {layer}"
            f"{f' --revision {revision}' if revision else ''}` "
            "(or `hf download REPO FILE`) and point HF_HUB_CACHE at that cache"
        ) from None
    except Exception as e:
        error = _hub_error(e, rel, filename, revision, layer)
        if error is None:
            raise
        _discard_partial_downloads(rel.repo_id)
        raise error from e


def _local_config(folder: Path) -> dict:
    """``qscope.json`` beside local SAE files (``{"k": 50, "release": "name"}``), or ``{}`` without one."""
    cfg_path = folder / LOCAL_CONFIG
    if not cfg_path.is_file():
        return {}
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict) or ("k" in cfg and (isinstance(cfg["k"], bool) or not isinstance(cfg["k"], int))):
            raise ValueError("not an object with an integer k")
    except (ValueError, OSError) as e:
        raise QScopeError(f"{str(cfg_path)!r} is unreadable ({_first_line(e)}); expected JSON such as "
                          '{"k": 50} (optionally with "release"); fix or delete it') from None
    return cfg


def _local_settings(folder: Path, k: int | None) -> tuple[int, str | None]:
    """``(k, release name)`` of a local folder: ``k`` as given or from its ``qscope.json``, read once."""
    cfg = _local_config(folder)
    if k is None and "k" not in cfg:
        raise QScopeError(
            f"k is unknown for the local SAE folder {str(folder)!r}: pass k=... or write {LOCAL_CONFIG} "
            'beside the files, e.g. {"k": 50}'
        )
    return (cfg["k"] if k is None else k), cfg.get("release")


def local_layers(folder: Path) -> list[int]:
    """Sorted layer indices of the ``layer{n}.sae.pt`` files in a folder."""
    return sorted(int(p.name[5:-7]) for p in folder.glob("layer*.sae.pt") if p.name[5:-7].isdigit())


def _load_local(folder: Path, layer: int, k: int, name: str | None) -> QwenScopeSAE:
    path = folder / layer_filename(layer)
    if not path.is_file():
        raise LayerOutOfRangeError(
            f"no {path.name} in {str(folder)!r}; layers present: {local_layers(folder) or 'none'}. "
            "Pass one of those layers"
        )
    return QwenScopeSAE.from_file(path, k, layer=layer, release=name)


def _load_release(rel: Release, layer: int, k: int | None, revision: str | None) -> QwenScopeSAE:
    if k is not None and k != rel.k:
        raise QScopeError(f"{rel.name} was trained with k={rel.k}; got k={k}. Leave k unset for hub releases")
    path = fetch(rel, layer, revision=revision)
    try:
        sae = QwenScopeSAE.from_file(path, rel.k, layer=layer, release=rel.name)
    except SAEFileError as e:
        _drop_from_hub_cache(path)
        raise SAEFileError(f"{e} (removed from the cache)") from None
    sae._on_invalid.append(lambda: _drop_from_hub_cache(path))  # a failed validate(): download it again next time
    if (sae.cfg.d_model, sae.cfg.d_sae) != (rel.d_model, rel.d_sae):
        warnings.warn(f"{rel.name} layer {layer} has shape d_model={sae.cfg.d_model}, d_sae={sae.cfg.d_sae}; the "
                      f"catalogue says {rel.d_model}, {rel.d_sae}. Check that the repository holds this release",
                      QScopeWarning, stacklevel=3)
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
                result = load()
            except BaseException as e:
                with self._lock:
                    self._entries.pop(key, None)  # nothing failed stays cached
                future.set_exception(e)
                raise
            if isinstance(result, QwenScopeSAE):  # a later failed validate() evicts it too
                result._on_invalid.append(lambda: self._discard(key, future))
            future.set_result(result)
            self._evict()
        return future.result()

    def _discard(self, key: tuple, future: Future) -> None:
        """Drop ``key`` if it still maps to ``future`` (a newer load of the same key is kept)."""
        with self._lock:
            if self._entries.get(key) is future:
                del self._entries[key]

    def _evict(self) -> None:
        with self._lock:
            def nbytes() -> int:
                return sum(_sae_bytes(f.result()) for f in self._entries.values() if f.done() and not f.exception())

            while len(self._entries) > self.max_layers or (
                self.max_bytes is not None and len(self._entries) > 1 and nbytes() > self.max_bytes
            ):
                # oldest finished entry; a load still running is never dropped (its waiters would load it again)
                victim = next((key for key, f in self._entries.items() if f.done()), None)
                if victim is None:
                    return
                del self._entries[victim]


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
    if isinstance(target, Path):
        k, name = _local_settings(target, k)

    def load() -> QwenScopeSAE:
        if isinstance(target, Path):
            return _load_local(target, layer, k, name)
        return _load_release(target, target.check_layer(layer), k, revision)

    if cache is None:
        return load()
    if isinstance(target, Path):  # one entry per SAE however it is spelled: resolved folder, effective k/revision
        key = (str(target.resolve()), layer, k, None)
    else:
        key = (target.name, layer, target.k if k is None else k, revision or target.revision)
    return cache.get(key, load)
