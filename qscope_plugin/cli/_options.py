"""What several commands share: option sets, ``--layers`` parsing, loading SAEs and the backbone, input files,
and printing JSON or a table."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

from qscope_plugin.errors import QScopeError, feature_out_of_range, layer_out_of_range


class UsageError(QScopeError, ValueError):
    """A command-line argument that cannot be used."""


def parse_layers(spec: str, n_layers: int, option: str = "--layers", subject: str = "this release") -> list[int]:
    """``"10-14"``, ``"3,5,7-9"`` or ``"all"`` to a sorted list of indices below ``n_layers``, each checked.

    An index past the end raises the plugin's one error for it: ``LayerOutOfRangeError`` for ``--layers``,
    ``FeatureOutOfRangeError`` for ``--features`` (``subject`` names what holds them).
    """
    if spec.strip() == "all":
        return list(range(n_layers))
    out: set[int] = set()
    for part in spec.split(","):
        bounds = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if bounds is None:
            raise UsageError(f"bad {option} {spec!r}: expected e.g. '14', '10-14', '3,5,7-9' or 'all'")
        first, last = int(bounds[1]), int(bounds[2] or bounds[1])
        if first > last:
            raise UsageError(f"{option} {part.strip()!r} is a reversed range; write it low-high, e.g. "
                             f"'{last}-{first}'")
        if last >= n_layers:
            if option == "--layers":
                raise layer_out_of_range(last, n_layers, subject)
            if option == "--features":
                raise feature_out_of_range(last, n_layers, subject)
            raise UsageError(f"{option} {part.strip()!r} is outside 0..{n_layers - 1}")
        out.update(range(first, last + 1))
    return sorted(out)


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
    p.add_argument("--limit", type=int, default=None, help="only the first N texts")


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


def load_saes(source: str, layers: str, sae_device: str | None = None) -> dict:
    """``{layer: QwenScopeSAE}`` for ``--layers`` of a release name or SAE folder, pinned to ``--sae-device`` when
    given (``placement.pin``: every recipe then encodes there)."""
    from qscope_plugin.models import check_device
    from qscope_plugin.placement import pin
    from qscope_plugin.store import layer_count, load_sae

    saes = {n: load_sae(source, n) for n in parse_layers(layers, layer_count(source), subject=f"{source!r}")}
    return pin(saes, check_device(sae_device))


def load_backbone(args: argparse.Namespace):
    """``(model, tokenizer)`` of ``--model`` on ``--device``, refused first when ``qscope plan`` says the run cannot
    fit that device."""
    from qscope_plugin.models import load_model

    refuse_if_too_big(args)
    return load_model(args.model, device=args.device)


def refuse_if_too_big(args: argparse.Namespace) -> None:
    """On a CUDA ``--device``: the plan of this command's run (backbone, its ``--layers``' SAEs unless
    ``--sae-device`` keeps them elsewhere, ``--batch-size``) from configs alone; a ``UsageError`` naming the option
    to change when it cannot fit. Host runs are not checked (memory-mapped SAEs take no private memory, and swap
    and the page cache make "fits" a matter of speed there). A model without a readable config is left to the load.
    """
    from qscope_plugin.models import check_device
    from qscope_plugin.plan import PlanError, device_memory, make_plan, read_config

    device = check_device(args.device)
    if device is None or device.type != "cuda":
        return
    from qscope_plugin.cli.plan import sae_dims

    try:
        config = read_config(args.model)
    except PlanError:
        return
    dims = sae_dims(args.release)
    layers = parse_layers(getattr(args, "layers", None) or "all", dims.n_layers, subject=f"{args.release!r}")
    if getattr(args, "sae_device", None) and args.sae_device != args.device:
        layers = []  # the SAEs sit elsewhere: only the backbone and its activations count here
    plan = make_plan(config, dims, layers=layers, devices=[args.device], memory=[device_memory(args.device)],
                     batch_size=getattr(args, "batch_size", None), model=args.model)
    if not plan.fits:
        raise UsageError(f"{plan.advice} (`qscope plan` shows the memory per device)")


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
