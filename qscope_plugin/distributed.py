"""Data-parallel harvests under ``torchrun``: each rank works through its share of a corpus's chunks, writes each
finished chunk as a file, and every rank merges all chunks in input order.

    >>> with torchrun_group() as (rank, device), checkpoints("run.partial", chunk_size=256):
    ...     cards = feature_cards(model, tok, texts, sae, layer=14, top=50)     # the same result on every rank
    >>> # torchrun --nproc-per-node 4 -m qscope_plugin.cli dashboard --layer 14 --data texts.jsonl --out d.html

How it works (``run_chunks``, called by the harvest layer, never by a recipe directly):

- the items (texts) are cut into chunks of ``chunk_size`` in input order; chunk i belongs to rank ``i % world``.
  Every rank and a single process cut the same chunks and batch within each chunk alone, so the merged result is
  bit for bit the single-process result with the same ``chunk_size`` (batches never straddle two chunks);
- inside ``checkpoints(work_dir)`` each harvest call gets its own folder ``work_dir/NN-name/`` (NN counts the
  calls in the block, the same on every rank and on every rerun) with ``manifest.json`` (the settings: model,
  SAEs, options) and one ``chunk-IIIIII.safetensors`` per finished chunk, whose header names its item range, the
  SHA-256 of its input items and the SHA-256 of its tensors. A chunk is written to a temporary name and renamed,
  so a half-written file never counts; a rerun skips every chunk whose file matches its input and recomputes the
  others (a killed run resumes where it stopped);
- after a barrier every rank reads the chunks in order (checking each content hash) and returns them; when the
  ``checkpoints`` block ends without an error its folders are removed.

Without ``checkpoints`` a single process keeps the chunks in memory; several ranks need a work dir (on storage all
ranks share) and say so. The group is gloo on CPU and NCCL on GPU with one GPU per local rank.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from qscope_plugin.errors import QScopeError

if TYPE_CHECKING:  # torch loads on first use: `qscope --help` and the option parsers do not import it
    import torch

T = TypeVar("T")
Chunk = dict[str, "torch.Tensor"]
"""What one chunk of a harvest leaves behind: named tensors (one safetensors file)."""

DEFAULT_CHUNK_SIZE = 1024
"""Items (texts) per chunk when no ``checkpoints`` block says otherwise."""

MANIFEST_VERSION = 1


class DistributedError(QScopeError, ValueError):
    """A distributed or checkpointed harvest that cannot run as asked (no shared work dir, other settings)."""


class ChunkFileError(QScopeError, OSError):
    """A chunk file whose content no longer matches the hash written with it (the disk or a copy changed it)."""


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if rank_and_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def torchrun_group(device: str | None = None) -> Iterator[tuple[int, str | None]]:
    """Inside the block, this process is one rank of the ``torchrun`` launch that started it; yields
    ``(rank, device)``, the device to load the model on.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), the block joins the process group (NCCL with one GPU per local
    rank when ``device`` is None or ``"cuda"`` and a GPU is present, else gloo) and leaves it at the end.
    Otherwise, or when a group is already initialised, it changes nothing and yields the current rank with
    ``device`` unchanged.
    """
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield rank_and_world()[0], device
        return
    if torch.cuda.is_available() and device in (None, "cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank} has no GPU of its own: this node has "
                                   f"{torch.cuda.device_count()}; launch at most that many with torchrun "
                                   "--nproc-per-node, or pass --device cpu")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), device
    finally:
        dist.destroy_process_group()


@dataclass
class _Checkpoints:
    root: Path | None
    chunk_size: int
    calls: int = 0
    folders: list[Path] = field(default_factory=list)

    def next_folder(self, name: str) -> Path | None:
        """This harvest call's folder: numbered by call, so a rerun of the same code finds the same folders."""
        self.calls += 1
        if self.root is None:
            return None
        folder = self.root / f"{self.calls:02d}-{name.replace(' ', '-').replace('/', '-')}"
        self.folders.append(folder)
        return folder


_ACTIVE: contextvars.ContextVar[_Checkpoints | None] = contextvars.ContextVar("qscope_checkpoints", default=None)


@contextlib.contextmanager
def checkpoints(work_dir: str | os.PathLike | None, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[Path | None]:
    """Every harvest inside the block writes its finished chunks under ``work_dir`` and resumes from them.

    ``work_dir`` must be on storage every rank reads (one node: any local folder). On leaving the block without an
    error, the folders the block used are removed (the results are then in memory and in the command's output);
    after an error or a kill they stay, and the same code run again skips the chunks they hold. ``work_dir=None``
    only sets ``chunk_size`` (a single process, chunks in memory).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise DistributedError(f"chunk_size={chunk_size!r}; expected a number of texts >= 1, e.g. 1024")
    state = _Checkpoints(None if work_dir is None else Path(work_dir), chunk_size)
    token = _ACTIVE.set(state)
    try:
        yield state.root
    finally:
        _ACTIVE.reset(token)
    barrier()  # every rank has read its results before rank 0 removes them (reached only without an error)
    if state.root is not None and rank_and_world()[0] == 0:
        for folder in state.folders:
            shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            state.root.rmdir()  # only when empty: a user's folder with other files stays


def fingerprint(items: Sequence[object]) -> str:
    """SHA-256 of a chunk's input items (texts or token lists), in order: a resumed chunk must match it."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item, ensure_ascii=False).encode() + b"\0")
    return digest.hexdigest()


def content_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes), independent of the file's layout."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def run_chunks(items: Iterable[T], compute: Callable[[int, list[T]], Chunk], *, name: str,
               settings: Mapping[str, object]) -> list[Chunk]:
    """``compute(start, chunk)`` for every chunk of ``items``, this rank's share here; every chunk's tensors,
    in input order, on every rank (see the module docstring).

    Args:
        items: the texts (or token lists) in input order; iterated once, so a stream works.
        compute: one chunk's results as named CPU tensors; ``start`` is the chunk's first item index.
        name: what the harvest is (names its folder, e.g. ``"feature cards"``).
        settings: JSON-able description of everything but the items that the results depend on (model, SAEs,
            options); a work dir holding another run's settings is refused.

    Raises:
        DistributedError: several ranks without a ``checkpoints`` work dir, or a work dir of another run.
        ChunkFileError: a chunk file whose tensors no longer match their hash.
    """
    rank, world = rank_and_world()
    state = _ACTIVE.get() or _Checkpoints(None, DEFAULT_CHUNK_SIZE)
    folder = state.next_folder(name)
    chunks = ((index * state.chunk_size, list(chunk)) for index, chunk in enumerate(_batched(items, state.chunk_size)))
    if folder is None:
        if world > 1:
            raise DistributedError(f"{world} ranks harvest {name!r} without a work dir to share chunks in; run it "
                                   "inside `with checkpoints(dir):` (the commands use <--out>.partial)")
        return [compute(start, chunk) for start, chunk in chunks]
    settings = json.loads(json.dumps(settings))  # the JSON form: what the manifest holds and is compared to
    _check_manifest(folder, settings)
    barrier()
    if rank == 0:
        _write_manifest(folder, settings)
    n_chunks = 0
    for index, (start, chunk) in enumerate(chunks):
        n_chunks += 1
        if index % world != rank:
            continue
        path, inputs = _chunk_path(folder, index), fingerprint(chunk)
        if _header(path).get("inputs_sha256") == inputs:
            continue  # finished by an earlier run
        tensors = compute(start, chunk)
        _write_chunk(path, tensors, {"start": str(start), "stop": str(start + len(chunk)), "inputs_sha256": inputs,
                                     "content_sha256": content_hash(tensors),
                                     "settings_sha256": fingerprint([settings])})
    barrier()
    return [_read_chunk(_chunk_path(folder, index)) for index in range(n_chunks)]


def concat_chunks(parts: Sequence[Chunk], key: str) -> torch.Tensor:
    """One tensor ``key`` of every chunk, concatenated along the first dimension (input order)."""
    import torch

    return torch.cat([p[key] for p in parts])


def sum_chunks(parts: Sequence[Chunk]) -> Chunk:
    """Element-wise sums of every chunk's tensors, added in chunk order: the same floats in the same order on every
    rank and in a single process with the same chunks."""
    total = {key: value.clone() for key, value in parts[0].items()}
    for part in parts[1:]:
        for key, value in part.items():
            total[key] += value
    return total


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter); ``itertools.batched`` from Python 3.12."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.safetensors"


def _check_manifest(folder: Path, settings: Mapping) -> None:
    manifest = folder / "manifest.json"
    if not manifest.exists():
        return
    try:
        found = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = {}
    if found.get("settings") != settings:
        raise DistributedError(f"{folder} holds an unfinished harvest with other settings (model, SAEs or options "
                               "differ); delete it to start over, or rerun with the same settings to resume")


def _write_manifest(folder: Path, settings: Mapping) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    if not manifest.exists():
        _atomic(manifest, lambda tmp: Path(tmp).write_text(
            json.dumps({"version": MANIFEST_VERSION, "settings": settings}, indent=2, sort_keys=True),
            encoding="utf-8"))


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file next to ``path`` and rename it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_chunk(path: Path, tensors: Chunk, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _header(path: Path) -> dict[str, str]:
    """A chunk file's metadata, or nothing when the file is missing or unreadable (then it is recomputed)."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError):
        return {}


def _read_chunk(path: Path) -> Chunk:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ChunkFileError(f"cannot read chunk {path} ({e}); delete it and rerun to recompute it") from None
    if content_hash(tensors) != _header(path).get("content_sha256"):
        raise ChunkFileError(f"chunk {path} does not match the hash written with it (the file changed on disk); "
                             "delete it and rerun to recompute it")
    return tensors
