"""What several commands share: option sets, ``--layers`` parsing, loading SAEs and the backbone, input files,
and printing JSON or a table."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from qscope_plugin.errors import QScopeError
from qscope_plugin.indices import parse_indices


class UsageError(QScopeError, ValueError):
    """A command-line argument that cannot be used."""


MAX_INDEX = 1 << 20
"""Largest layer or feature id an option reads (the widest Qwen-Scope SAE has 128K features); each is checked
against its release or SAE once that is known."""
MAX_POSITIONS = 1 << 20
"""Largest token count or position an option reads (``--max-length``, positions), when the model says none."""
MAX_BATCH = 4096
"""Largest ``--batch-size``: texts in one forward."""
MAX_ITEMS = 10_000_000
"""Largest count of texts, samples or draws (``--limit``, ``--n-test``, ``--n-draws``, ``--budget``)."""
MAX_TOP = 1 << 17
"""Largest top-k / number of features per layer (the widest SAE's d_sae)."""
MAX_SEED = 2**32 - 1


def count(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number in ``low..high``, refused (exit 2) before anything loads.

    Huge numbers are the cheapest way to exhaust a machine (a batch, top-k or new-token count allocates with
    them), so every numeric option has a ceiling, checked here from the text, never after a model has loaded.
    """
    def parse(text: str) -> int:
        value = text.strip()
        if not re.fullmatch(r"[+-]?[0-9]{1,19}", value) or not low <= int(value) <= high:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number in {low}..{high}")
        return int(value)

    parse.__name__ = "count"  # argparse names the type in its message
    return parse


def finite(text: str) -> float:
    """An argparse ``type``: a finite number (NaN and infinities are refused, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a finite number")
    return value


def parse_layers(spec: str, n_layers: int, option: str = "--layers", subject: str = "this release") -> list[int]:
    """``"10-14"``, ``"3,5,7-9"`` or ``"all"`` to a sorted list of indices below ``n_layers``, each checked.

    The option's wording over ``indices.parse_indices``, the one bounded parser: ``--features`` reads feature ids
    (``FeatureOutOfRangeError`` past ``d_sae``), every other option layers (``LayerOutOfRangeError``).
    """
    what = "feature" if option == "--features" else "layer"
    return parse_indices(spec, n_layers, what=what, subject=subject, option=option)


def names(spec: str) -> list[str]:
    """A comma-separated option as a list of non-empty names."""
    return [name.strip() for name in spec.split(",") if name.strip()]


def add_model_options(p: argparse.ArgumentParser, layers: bool = True, json_output: bool = True) -> None:
    """``--model --release [--layers] --device [--json]``: every command that runs the backbone."""
    from qscope_plugin.models import default_model, default_release

    p.add_argument("--model", default=default_model(), help="HF model folder or cached hub id (default: demo model)")
    p.add_argument("--release", default=default_release(), help="release name or SAE folder (default: demo SAEs)")
    if layers:
        p.add_argument("--layers", default="all", help="e.g. 14, 10-14 or all (default)")
    p.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads")
    p.add_argument("--sae-device", default=None, help="encode with the SAEs on this device (e.g. cpu to save GPU "
                   "memory); default: each layer's own device, in the model's dtype (docs/placement.md)")
    if json_output:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_data_options(p: argparse.ArgumentParser, *, required: bool = True, what: str = "texts") -> None:
    """``--data --column --config --split --revision --limit``: every command that reads texts from a dataset."""
    p.add_argument("--data", required=required, default=None, help=f"{what}: a local json/jsonl/csv/parquet file or a "
                   "cached hub dataset id")
    p.add_argument("--column", default="text", help="column of --data holding the texts (default: text)")
    p.add_argument("--config", default=None, help="dataset configuration (hub datasets)")
    p.add_argument("--split", default=None, help="dataset split, e.g. test (needed if it has several)")
    p.add_argument("--revision", default=None, help="dataset revision to pin")
    p.add_argument("--limit", type=count(1, MAX_ITEMS), default=None, help="only the first N texts")


def data_texts(args: argparse.Namespace) -> list[str]:
    """The texts of ``add_data_options``' options (``recipes.data.load_texts``), read before any model loads."""
    from qscope_plugin.recipes.data import load_texts

    return load_texts(args.data, column=args.column, config=args.config, split=args.split, revision=args.revision,
                      limit=args.limit)


def add_first_token_options(p: argparse.ArgumentParser, *, default: bool) -> None:
    """``--exclude-first-token`` / ``--keep-first-token``: whether statistics leave out each text's position 0
    (Qwen's massive-activation outliers)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--exclude-first-token", dest="exclude_first_token", action="store_true", default=default,
                       help="leave each text's position 0 (outliers) out of the statistics"
                       + (" (default)" if default else ""))
    group.add_argument("--keep-first-token", dest="exclude_first_token", action="store_false",
                       help="count position 0 like any token" + ("" if default else " (default)"))


def add_distributed_options(p: argparse.ArgumentParser) -> None:
    """``--chunk-size``: texts per checkpointed chunk (``distributed_run``); the same output for any rank count."""
    from qscope_plugin.distributed import DEFAULT_CHUNK_SIZE

    p.add_argument("--chunk-size", type=count(1, MAX_ITEMS), default=DEFAULT_CHUNK_SIZE,
                   help=f"texts per chunk: the unit of resume and of the split between torchrun ranks (default "
                   f"{DEFAULT_CHUNK_SIZE}); finished chunks are kept in <--out>.partial until the command succeeds")


@contextlib.contextmanager
def distributed_run(args: argparse.Namespace) -> Iterator[int]:
    """Runs the block as this process's rank of a ``torchrun`` launch (or alone), its harvests checkpointed in
    ``<--out>.partial`` (a rerun resumes); yields the rank. ``args.device`` becomes this rank's device.

    Every rank gets the same results; only rank 0 should write the output and print.
    """
    from qscope_plugin.distributed import checkpoints, torchrun_group

    out = Path(args.out)
    if not out.name:
        raise UsageError(f"--out {args.out!r} names no file; pass the file to write, e.g. --out result.json")
    with torchrun_group(args.device) as (rank, device), checkpoints(out.with_name(out.name + ".partial"),
                                                                    chunk_size=args.chunk_size):
        args.device = device
        yield rank


def load_saes(source: str, layers: str, sae_device: str | None = None) -> dict:
    """``{layer: QwenScopeSAE}`` for ``--layers`` of a release name or SAE folder, pinned to ``--sae-device`` when
    given (``placement.pin``: every recipe then encodes there)."""
    from qscope_plugin.models import check_device
    from qscope_plugin.placement import pin
    from qscope_plugin.store import load_sae

    saes = {n: load_sae(source, n) for n in release_layers(layers, source)}
    return pin(saes, check_device(sae_device))


def release_layers(spec: str, source: str, option: str = "--layers") -> list[int]:
    """An option's layers (``"1,2"``, ``"0-3"``), each checked against the layers of ``source`` (release or
    folder)."""
    from qscope_plugin.store import layer_count

    return parse_layers(spec, layer_count(source), option=option, subject=f"{source!r}")


def add_batch_options(p: argparse.ArgumentParser, *, default: int, passes: bool = False) -> None:
    """``--batch-size`` (and, for a recipe that can run its layers in passes, ``--layers-per-pass``), both left
    unset so that ``plan_defaults`` chooses them: on a CUDA ``--device`` what ``qscope plan`` says fits, the batch
    capped at ``default``; elsewhere ``default`` and one pass (the host's results and speed as before)."""
    p.add_argument("--batch-size", type=count(1, MAX_BATCH), default=None,
                   help=f"texts per forward (default: on a CUDA --device the largest that `qscope plan` says fits, "
                   f"at most {default}; {default} elsewhere)")
    if passes:
        p.add_argument("--layers-per-pass", type=count(1, MAX_INDEX), default=None,
                       help="layers whose SAEs are held on the device at once; more layers run in passes over the "
                       "data (default: all, or on a CUDA --device as few passes as `qscope plan` says fit)")
    p.set_defaults(default_batch_size=default)


def batch_size(args: argparse.Namespace) -> int:
    """``--batch-size`` as given, else its default cap: what a check made before the plan can use."""
    return args.batch_size or args.default_batch_size


def load_backbone(args: argparse.Namespace):
    """``(model, tokenizer)`` of ``--model`` on ``--device``, after ``plan_defaults`` (refused first when
    ``qscope plan`` says the run cannot fit that device; batch size and layer passes chosen from the plan)."""
    from qscope_plugin.models import load_model

    plan_defaults(args)
    return load_model(args.model, device=args.device)


def plan_defaults(args: argparse.Namespace) -> None:
    """Fill the options ``add_batch_options`` left unset, from the plan of this command's run, and refuse a run
    that cannot fit.

    On a CUDA ``--device`` the plan (``qscope_plugin.plan``: backbone, its ``--layers``' SAEs unless
    ``--sae-device`` keeps them elsewhere, ``--batch-size``, ``--max-length`` tokens per text) is made from configs
    alone; a ``UsageError`` naming the option to change when it cannot fit; else ``--batch-size`` becomes the
    plan's batch size capped by the command's default, and ``--layers-per-pass`` the plan's when the SAEs do not
    all fit at once. Host runs are neither planned nor refused (memory-mapped SAEs take no private memory, and
    swap and the page cache make "fits" a matter of speed there): they get the command's defaults. A model
    without a readable config is left to the load, with the defaults.
    """
    plan = _cuda_plan(args)
    if plan is not None and not plan.fits:
        raise UsageError(f"{plan.advice} (`qscope plan` shows the memory per device)")
    if getattr(args, "batch_size", None) is None and hasattr(args, "default_batch_size"):
        args.batch_size = min(plan.batch_size, args.default_batch_size) if plan else args.default_batch_size
    if hasattr(args, "layers_per_pass") and args.layers_per_pass is None and plan is not None and plan.passes > 1:
        args.layers_per_pass = plan.layers_per_pass


def _cuda_plan(args: argparse.Namespace):
    """The ``qscope_plugin.plan.Plan`` of this run on a CUDA ``--device``; None on the host or without a config."""
    from qscope_plugin.models import check_device
    from qscope_plugin.plan import PlanError, device_memory, make_plan, read_config

    device = check_device(args.device)
    if device is None or device.type != "cuda":
        return None
    from qscope_plugin.cli.plan import sae_dims

    try:
        config = read_config(args.model)
    except PlanError:
        return None
    dims = sae_dims(args.release)
    layer = getattr(args, "layer", None)  # `qscope dashboard` harvests one --layer
    spec = getattr(args, "layers", None) or (str(layer) if layer is not None else "all")
    layers = parse_layers(spec, dims.n_layers, subject=f"{args.release!r}")
    if getattr(args, "sae_device", None) and args.sae_device != args.device:
        layers = []  # the SAEs sit elsewhere: only the backbone and its activations count here
    return make_plan(config, dims, layers=layers, devices=[args.device], memory=[device_memory(args.device)],
                     seq=getattr(args, "max_length", None) or 512, batch_size=getattr(args, "batch_size", None),
                     layers_per_pass=getattr(args, "layers_per_pass", None), model=args.model)


def read_texts(literal: list[str] | None, path: str | None, what: str) -> list[str]:
    """Texts given on the command line, then the non-blank lines of a file (one text per line)."""
    texts = list(literal or [])
    if path:
        try:
            texts += [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read {what} file {path!r}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"{what} file {path!r} is not UTF-8 text ({e.reason} at byte {e.start}); pass a "
                             "UTF-8 text file with one text per line") from None
    return texts


def emit(args: argparse.Namespace, payload: object, render: Callable[[], None]) -> None:
    """``--json``: the payload for scripts (non-finite numbers as ``null``: strict JSON); otherwise the table
    ``render`` prints."""
    if args.json:
        from qscope_plugin.recipes._json import finite_json

        print(json.dumps(finite_json(payload), ensure_ascii=False, indent=2, allow_nan=False))
    else:
        render()
