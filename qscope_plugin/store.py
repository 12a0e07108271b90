"""Where SAE files come from: the Hugging Face hub (lazily, one layer at a time) or a local folder.

    >>> sae = load_sae("qwen-scope-3.5-2b-base-w32k-l100", layer=12)     # hub cache, mmap
    >>> sae = load_sae("./my_saes", layer=3, k=64)                         # folder of layer{n}.sae.pt

``fetch`` is the only function that touches the network; it goes through ``huggingface_hub.hf_hub_download``
and so honours ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE`` and revisions. Loading maps the file and
never copies it. Loaded layers are kept in a bounded, thread-safe LRU (the official app keeps 8).

Integrity is checked offline against what is already recorded: the hub cache stores large files as LFS blobs
named by their SHA-256, and a local folder may hold a ``SHA256SUMS`` file (``write_checksums``, the
``sha256sum`` format). ``verify`` hashes cached layers against it; ``fetch(verify=True)`` and
``load_sae(verify=True)`` refuse (and drop from the hub cache) a file that does not match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qscope_plugin.catalogue import DEMO_RELEASE, LICENSE_NOTICE, Release, release
from qscope_plugin.errors import (
    ChecksumMismatchError,
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
    malformed_file,
)
from qscope_plugin.sae import QwenScopeSAE

logger = logging.getLogger("qscope_plugin")
DEMO_SAE_DIR = Path(__file__).parent / "demo" / "assets" / "saes"
"""SAEs of the small demo model shipped inside the package, in the Qwen-Scope file format."""
LOCAL_CONFIG = "qscope.json"
"""Optional file beside local ``layer{n}.sae.pt`` files: ``{"k": 50, "release": "..."}``."""
CHECKSUMS = "SHA256SUMS"
"""Optional file beside local ``layer{n}.sae.pt`` files, in ``sha256sum`` format (``sha256sum -c`` reads it)."""
HASH_CHUNK = 16 << 20
"""Bytes per read when hashing: large reads keep SHA-256 at disk speed (hashlib releases the GIL)."""


def layer_filename(layer: int) -> str:
    return f"layer{layer}.sae.pt"


def _drop_from_hub_cache(path: Path) -> None:
    """Remove a bad snapshot entry and the blob behind it, so the next fetch downloads it again."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob != path:
        blob.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike, *, progress: bool = False, desc: str | None = None) -> str:
    """Hex SHA-256 of a file, read in ``HASH_CHUNK`` pieces; ``progress`` shows a byte bar on a terminal."""
    from tqdm import tqdm

    digest, buffer = hashlib.sha256(), memoryview(bytearray(HASH_CHUNK))
    with open(path, "rb", buffering=0) as f, tqdm(total=os.fstat(f.fileno()).st_size, unit="B", unit_scale=True,
                                                  desc=desc, disable=None if progress else True) as bar:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
            bar.update(n)
    return digest.hexdigest()


def _recorded_sha256(path: Path) -> str | None:
    """The SHA-256 a hub cache entry records for itself: the name of the LFS blob it links to (``None`` for a
    small git-stored file, whose blob is named by its git SHA-1, or a cache without symlinks)."""
    blob = path.resolve()
    return blob.name if blob != path and re.fullmatch(r"[0-9a-f]{64}", blob.name) else None


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


def _repair_hint(rel: Release, layer: int, revision: str | None) -> str:
    pin = f" --revision {revision}" if revision else ""
    return f"`qscope fetch {rel.name} --layers {layer}{pin} --force-download`"


def _check_download(path: Path, rel: Release, layer: int, revision: str | None) -> None:
    """Hash a hub cache entry against its LFS blob name; a mismatch is dropped from the cache and raised."""
    expected = _recorded_sha256(path)
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        _drop_from_hub_cache(path)
        raise ChecksumMismatchError(
            f"{rel.name} layer {layer} ({path.name}) is corrupted: its SHA-256 is {actual}, the hub recorded "
            f"{expected}. It was removed from the cache; download it again with {_repair_hint(rel, layer, revision)}")


def fetch(rel: Release, layer: int, *, revision: str | None = None, force_download: bool = False,
          verify: bool = False) -> Path:
    """Download (or find in the hub cache; ``force_download`` downloads again) ``layer{n}.sae.pt`` of a release;
    returns the local path. ``verify`` hashes the file against the SHA-256 its LFS blob is named by (a full read).

    Raises:
        NotCachedError: offline, or the hub is unreachable, and the file is not cached.
        HubError: the repo, revision or file does not exist, the hub answered an HTTP error, or the transfer
            failed (``HubRepoNotFoundError``, ``HubRevisionNotFoundError``, ``HubFileNotFoundError``,
            ``HubUnreachableError``). No partial download is left in the cache.
        ChecksumMismatchError: ``verify`` and the file does not match its SHA-256; it is removed from the cache.
    """
    from huggingface_hub import hf_hub_download, is_offline_mode
    from huggingface_hub.errors import LocalEntryNotFoundError

    rel.check_layer(layer)
    filename, revision = layer_filename(layer), revision or rel.revision
    try:
        path = Path(hf_hub_download(rel.repo_id, filename, revision=revision, force_download=force_download))
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
    if verify:
        _check_download(path, rel, layer, revision)
    return path


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
        raise malformed_file(cfg_path, f"is unreadable ({_first_line(e)})", 'JSON such as {"k": 50} (optionally '
                             'with "release"); fix or delete it') from None
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


def read_checksums(folder: Path) -> dict[str, str]:
    """``{file name: hex SHA-256}`` from a folder's ``SHA256SUMS`` (``sha256sum`` format, text or binary mode)."""
    path = folder / CHECKSUMS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise QScopeError(f"{str(folder)!r} has no {CHECKSUMS} to verify its SAE files against; write one from "
                          f"files you trust with `qscope checksum {folder}`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QScopeError(f"cannot read {str(path)!r} ({_first_line(e)}); expected `sha256sum` output, one "
                          f"'HASH  layerN.sae.pt' per line. Rewrite it with `qscope checksum {folder}`") from None
    sums = {}
    for number, line in enumerate(lines, 1):
        entry = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.strip())
        if entry is None and line.strip():
            raise QScopeError(f"{str(path)!r} line {number} is {line.strip()[:80]!r}; expected 'HASH  layerN.sae.pt'"
                              f" (`sha256sum` format). Rewrite it with `qscope checksum {folder}`")
        if entry:
            sums[entry[2]] = entry[1].lower()
    return sums


def write_checksums(folder: str | os.PathLike, *, progress: bool = False) -> Path:
    """Hash every ``layer{n}.sae.pt`` of a folder into its ``SHA256SUMS`` (replaced atomically); returns its path.

    Run it on files you trust: ``verify`` and ``load_sae(verify=True)`` later compare against it, and so does
    ``sha256sum -c SHA256SUMS`` inside the folder.
    """
    folder = Path(folder)
    layers = local_layers(folder)
    if not layers:
        raise QScopeError(f"{str(folder)!r} holds no layer{{n}}.sae.pt files to checksum; pass a folder of SAE files")
    lines = [f"{sha256_file(folder / layer_filename(n), progress=progress, desc=layer_filename(n))}  "
             f"{layer_filename(n)}\n" for n in layers]
    tmp = folder / f".{CHECKSUMS}.tmp"
    tmp.write_text("".join(lines), encoding="utf-8")
    return tmp.replace(folder / CHECKSUMS)


@dataclass(frozen=True)
class LayerCheck:
    """The integrity of one layer: ``ok``, ``corrupted`` (bytes differ from the recorded SHA-256), ``missing``
    (not cached / not in the folder) or ``unverifiable`` (no SHA-256 recorded for it)."""

    layer: int
    status: Literal["ok", "corrupted", "missing", "unverifiable"]
    path: Path | None = None
    expected: str | None = None
    """The recorded SHA-256 (LFS blob name or ``SHA256SUMS`` entry)."""
    actual: str | None = None
    """The SHA-256 of the bytes on disk (only when there was something to compare with)."""

    def to_json(self) -> dict:
        return {"layer": self.layer, "status": self.status, "path": self.path and str(self.path),
                "expected": self.expected, "actual": self.actual}


def _check(layer: int, path: Path | None, expected: str | None, progress: bool) -> LayerCheck:
    if path is None or not path.is_file():
        return LayerCheck(layer, "missing", path, expected)
    if expected is None:
        return LayerCheck(layer, "unverifiable", path)
    actual = sha256_file(path, progress=progress, desc=f"layer {layer}")
    return LayerCheck(layer, "ok" if actual == expected else "corrupted", path, expected, actual)


def verify(source: str | os.PathLike, layers: Sequence[int] | None = None, *, revision: str | None = None,
           progress: bool = False) -> list[LayerCheck]:
    """Hash the cached layers of a release (or the files of a folder) against their recorded SHA-256, offline.

    Args:
        source: release name, HF repo id, or a folder with a ``SHA256SUMS`` (``write_checksums``).
        layers: layers to check; default every layer of the release, or every file and entry of the folder.
        revision: hub revision whose snapshot to check (default: the release's, else ``main``).
        progress: a byte progress bar per file on a terminal.

    Raises:
        LayerOutOfRangeError: a layer outside the release.
        QScopeError: a folder without a readable ``SHA256SUMS``.
    """
    target = _resolve(source)
    if isinstance(target, Path):
        sums = read_checksums(target)
        if layers is None:
            listed = {int(name[5:-7]) for name in sums if re.fullmatch(r"layer\d+\.sae\.pt", name)}
            layers = sorted(listed | set(local_layers(target)))
        return [_check(n, target / layer_filename(n), sums.get(layer_filename(n)), progress) for n in layers]
    checks = []
    for n in range(target.n_layers) if layers is None else layers:
        path = cached_file(target, target.check_layer(n), revision=revision)
        checks.append(_check(n, path, path and _recorded_sha256(path), progress))
    return checks


def cached_file(rel: Release, layer: int, *, revision: str | None = None) -> Path | None:
    """The cached snapshot path of ``layer`` of ``rel`` (no network), or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(rel.repo_id, layer_filename(layer), revision=revision or rel.revision)
    return Path(cached) if isinstance(cached, str) else None


def _verify_local(folder: Path, layer: int) -> None:
    path, name = folder / layer_filename(layer), layer_filename(layer)
    expected = read_checksums(folder).get(name)
    if expected is None:
        raise QScopeError(f"{str(folder / CHECKSUMS)!r} records no SHA-256 for {name}, so it cannot be verified; "
                          f"rewrite it from files you trust with `qscope checksum {folder}`")
    if not path.is_file():
        return  # the load reports the missing layer with the layers present
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumMismatchError(
            f"layer {layer} ({str(path)!r}) is corrupted: its SHA-256 is {actual}, {CHECKSUMS} records {expected}. "
            f"Restore the file from its source (or, if the change is intended, run `qscope checksum {folder}`)")


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


def layer_count(source: str | os.PathLike) -> int:
    """How many layers a release has, or a folder's highest ``layer{n}.sae.pt`` plus one (0 for none)."""
    target = _resolve(source)
    return 1 + max(local_layers(target), default=-1) if isinstance(target, Path) else target.n_layers


class SAECache:
    """A bounded LRU of loaded SAEs, by count and nominal bytes; concurrent requests share one load.

    Eviction only drops the cache's own reference. An evicted SAE that the caller still holds (an all-layer
    harvest keeps every layer in a dict, more than ``max_layers``) is found again by a weak reference and returned
    as the same object: asking for it again never re-reads the file nor loses what that object computed once
    (decoder norms), however many layers are in use.
    """

    def __init__(self, max_layers: int = 8, max_bytes: int | None = None) -> None:
        self.max_layers, self.max_bytes = max_layers, max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, Future[QwenScopeSAE]] = OrderedDict()
        self._alive: weakref.WeakValueDictionary[tuple, QwenScopeSAE] = weakref.WeakValueDictionary()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._alive.clear()

    def get(self, key: tuple, load) -> QwenScopeSAE:
        with self._lock:
            future = self._entries.get(key)
            revived = future is None and (alive := self._alive.get(key)) is not None  # evicted, still in use
            if revived:
                future = self._entries[key] = Future()
                future.set_result(alive)
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
                held = weakref.ref(result)  # no cycle: the SAE is freed when its last user drops it
                result._on_invalid.append(lambda: self._discard(key, held()))
                with self._lock:
                    self._alive[key] = result
            future.set_result(result)
        if owner or revived:
            self._evict()
        return future.result()

    def forget(self, key: tuple) -> None:
        """Drop ``key`` whatever it holds (its file turned out corrupted)."""
        with self._lock:
            self._entries.pop(key, None)
            self._alive.pop(key, None)

    def _discard(self, key: tuple, sae: QwenScopeSAE | None) -> None:
        """Drop ``key`` if it still maps to ``sae`` (a newer load of the same key is kept)."""
        with self._lock:
            future = self._entries.get(key)
            if future is not None and future.done() and not future.exception() and future.result() is sae:
                del self._entries[key]
            if self._alive.get(key) is sae:
                del self._alive[key]

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
             cache: SAECache | None = DEFAULT_CACHE, verify: bool = False) -> QwenScopeSAE:
    """Load SAE ``layer`` of a release name, HF repo id or local folder of ``layer{n}.sae.pt`` files.

    Args:
        source: SAELens release name (``qwen-scope-3-8b-base-w64k-l50``), its HF repo id, or a folder.
        layer: 0-indexed block whose output the SAE reads.
        k: TopK of a local folder (else read from its ``qscope.json``); must match for hub releases.
        revision: hub revision to pin.
        cache: LRU to keep the loaded layer in; ``None`` loads without caching.
        verify: hash the file first against its recorded SHA-256 (LFS blob name, or the folder's
            ``SHA256SUMS``). Off by default: it reads the whole file, where a plain load maps it in milliseconds.

    Raises:
        ChecksumMismatchError: ``verify`` and the file is corrupted (a hub file is also removed from the cache).
    """
    target = _resolve(source)
    if isinstance(target, Path):
        k, name = _local_settings(target, k)

    def load() -> QwenScopeSAE:
        if isinstance(target, Path):
            return _load_local(target, layer, k, name)
        return _load_release(target, target.check_layer(layer), k, revision)

    if isinstance(target, Path):  # one entry per SAE however it is spelled: resolved folder, effective k/revision
        key = (str(target.resolve()), layer, k, None)
    else:
        key = (target.name, layer, target.k if k is None else k, revision or target.revision)
    if verify:
        try:
            if isinstance(target, Path):
                _verify_local(target, layer)
            else:
                fetch(target, target.check_layer(layer), revision=revision, verify=True)
        except ChecksumMismatchError:
            if cache is not None:
                cache.forget(key)  # an SAE mapped from the bad file before must not be served again
            raise
    return load() if cache is None else cache.get(key, load)
