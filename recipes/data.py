"""One data loader for every recipe: a hub dataset, a local file, a folder of files, or an in-memory list.

    >>> gsm8k = load_table("openai/gsm8k", config="main", split="test")   # one datasets.Dataset
    >>> by_language = load_tables("toxicity/")                           # {"de": Dataset, "en": Dataset} by file stem
    >>> load_table("gsm8k.jsonl")                                        # a file is one table, named by its stem
    >>> load_table(["a prompt", "another"])                              # strings become a ``text`` column
    >>> texts = load_texts("texts.jsonl", column="body", limit=200)      # a column's non-blank strings

Local files are .json / .jsonl / .csv / .parquet, read through ``datasets`` without progress bars (they load at
once). Every failure, from a bad suffix to an unreachable hub, is one ``DataError`` saying what to pass instead.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qscope_plugin.errors import QScopeError, QScopeWarning

if TYPE_CHECKING:
    import datasets

LOCAL_KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffix -> the ``datasets`` builder that reads it."""
MEMORY_SPLIT = "data"
"""The name of the one table built from an in-memory list."""

Source = str | Path | Sequence[str] | Sequence[dict]


class DataError(QScopeError, ValueError):
    """A dataset that cannot be loaded, or lacks the expected splits, columns, languages or examples."""


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """A local file loads at once: its "Generating split" bars would only hide what matters on stderr."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _local_files(path: Path) -> tuple[str, dict[str, str]]:
    """The builder and ``{split: file}`` of a local file (split = its stem) or a folder (one split per file)."""
    if path.is_file():
        if path.suffix not in LOCAL_KINDS:
            raise DataError(f"cannot read {str(path)!r}: its suffix {path.suffix!r} is not one of "
                            f"{sorted(LOCAL_KINDS)}; convert it, or pass a folder of such files or a hub dataset id")
        files = [path]
    else:
        files = sorted(f for f in path.iterdir() if f.suffix in LOCAL_KINDS)  # other files (a README) are not data
    empty = [str(f) for f in files if f.stat().st_size == 0]
    if empty:  # datasets' json builder fails on one with a bare StopIteration
        raise DataError(f"{empty[0]!r} is empty; pass a file with at least one example")
    if path.is_file():
        return LOCAL_KINDS[path.suffix], {path.stem: str(path)}
    if not files:
        raise DataError(f"no {'/'.join(sorted(LOCAL_KINDS))} files in {str(path)!r}; expected one file per split "
                        "(e.g. per language: en.jsonl, de.jsonl)")
    kinds = {LOCAL_KINDS[f.suffix] for f in files}
    if len(kinds) > 1:
        raise DataError(f"{str(path)!r} mixes {sorted(kinds)} files; keep one format per folder")
    stems = [f.stem for f in files]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise DataError(f"{str(path)!r} has several files for split(s) {repeated}; keep one file per split")
    return kinds.pop(), {f.stem: str(f) for f in files}


def _from_memory(rows: Sequence) -> dict[str, datasets.Dataset]:
    import datasets

    if not rows:
        raise DataError("the list of examples is empty; pass at least one string or dict")
    if all(isinstance(r, str) for r in rows):
        return {MEMORY_SPLIT: datasets.Dataset.from_dict({"text": list(rows)})}
    if all(isinstance(r, dict) for r in rows):
        return {MEMORY_SPLIT: datasets.Dataset.from_list(list(rows))}
    kinds = sorted({type(r).__name__ for r in rows})
    raise DataError(f"a list of examples holds {kinds}; expected only strings (a text column) or only dicts (rows)")


def _name(source: Source) -> str:
    return repr(str(source)) if isinstance(source, str | Path) else "the list of examples"


def load_tables(source: Source, *, config: str | None = None,
                revision: str | None = None) -> dict[str, datasets.Dataset]:
    """Every split of ``source`` as ``{split: datasets.Dataset}``.

    Args:
        source: a hub dataset id (cached, or reachable), a local .json / .jsonl / .csv / .parquet file (one split,
            named by its stem), a folder of such files (one split per file, named by its stem; other files are
            ignored), or a list of strings (column ``text``) or dicts (one split, ``"data"``).
        config: the hub dataset's configuration (e.g. ``"main"`` for ``openai/gsm8k``).
        revision: the hub dataset's revision to pin.

    Raises:
        DataError: an unreadable file, an unknown suffix, an empty folder or list, or a hub dataset that is
            missing or unreachable.
    """
    import datasets
    import pyarrow

    if not isinstance(source, str | Path):
        return _from_memory(source)
    path = Path(source)
    try:
        if path.exists():
            kind, files = _local_files(path)
            with _no_progress_bars():  # file by file: a stem need not be a valid split name ("all", "zh-hans")
                return {name: datasets.load_dataset(kind, data_files=file, split="train")
                        for name, file in files.items()}
        return dict(datasets.load_dataset(str(source), config, revision=revision))
    except (OSError, ValueError, TypeError, pyarrow.ArrowException, datasets.exceptions.DatasetsError) as e:
        # ConnectionError (offline) is an OSError; a truncated or foreign file fails inside datasets or pyarrow
        # with ValueError ("corresponds to no data"), ArrowInvalid or a builder error, none naming the file
        reason = str(e.__cause__ or e).splitlines()[0]
        if path.exists():
            raise DataError(f"cannot read {str(source)!r} ({reason}); expected valid json/jsonl/csv/parquet "
                            "data") from None
        raise DataError(f"cannot load dataset {str(source)!r} ({reason}); pass a local json/jsonl/csv/parquet "
                        "file or folder, or a hub id that is cached (HF_HUB_OFFLINE=1 blocks downloads)") from None


def load_table(source: Source, *, config: str | None = None, split: str | None = None,
               revision: str | None = None, limit: int | None = None) -> datasets.Dataset:
    """One split of ``source`` (see ``load_tables``): ``split``, or the only one when ``split`` is None;
    ``limit`` keeps its first rows only (a quick trial run).

    Raises:
        DataError: as ``load_tables``; ``split`` is absent (or None with several splits), naming the splits; or
            ``limit`` is not positive.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit}; give a positive number of rows, or None for all")
    tables = load_tables(source, config=config, revision=revision)
    if split is None:
        if len(tables) != 1:
            raise DataError(f"dataset {_name(source)} has splits {sorted(tables)}; pass split= one of them")
        split = next(iter(tables))
    if split not in tables:
        raise DataError(f"dataset {_name(source)} has no split {split!r}; it has {sorted(tables)}")
    table = tables[split]
    return table if limit is None else table.select(range(min(limit, len(table))))


def load_texts(source: Source, *, column: str = "text", config: str | None = None, split: str | None = None,
               revision: str | None = None, limit: int | None = None) -> list[str]:
    """The non-blank strings of ``column`` of one split of ``source`` (``load_table``), checked before any model
    loads; ``limit`` keeps the first ``limit`` of them.

    Blank rows (wikitext has many: the empty lines between its paragraphs) are dropped, with one ``QScopeWarning``
    saying how many: a blank text has no token to read, and would count against ``limit`` and in every average.
    The column is read in batches and only until ``limit`` texts are found, so a trial run of a large table reads
    little of it.

    Raises:
        DataError: as ``load_table``; no such column; a value that is not a string; or only blank strings.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit}; give a positive number of texts, or None for all")
    table = load_table(source, config=config, split=split, revision=revision)
    if column not in table.column_names:
        raise DataError(f"dataset {_name(source)} has no column {column!r}; pass one of {table.column_names}")
    texts: list[str] = []
    row = 0
    for batch in table.select_columns([column]).iter(batch_size=1024):
        for text in batch[column]:
            if not isinstance(text, str):
                raise DataError(f"column {column!r} of {_name(source)} holds {type(text).__name__} {text!r} in row "
                                f"{row}, not text; name a column of strings, or fill that row")
            row += 1
            if text.strip():
                texts.append(text)
                if len(texts) == limit:
                    break
        if len(texts) == limit:
            break
    if not texts:
        raise DataError(f"column {column!r} of {_name(source)} holds no text, only blank strings; pass texts")
    if len(texts) < row:
        warnings.warn(f"dropped {row - len(texts)} blank of the {row} rows read from column {column!r} of "
                      f"{_name(source)} (a blank text has no tokens); kept {len(texts)}", QScopeWarning, stacklevel=2)
    return texts
