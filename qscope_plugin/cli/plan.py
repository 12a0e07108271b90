"""``qscope plan``: whether a harvest fits the given devices, and with which batch size and layer passes, from
configs alone (``qscope_plugin.plan``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from qscope_plugin.cli._options import UsageError, emit, names, parse_layers


def sae_dims(source: str):
    """``SAEDims`` of a release (the catalogue's dims) or a folder (its first layer file's shapes, memory-mapped)."""
    from qscope_plugin.catalogue import DEMO_RELEASE, release
    from qscope_plugin.plan import SAEDims
    from qscope_plugin.store import layer_count, load_sae, local_layers

    n_layers = layer_count(source)  # an unknown name fails here, with the store's message
    if not Path(source).is_dir() and source != DEMO_RELEASE:
        rel = release(source)
        return SAEDims(rel.d_model, rel.d_sae, rel.n_layers)
    first = load_sae(source, min(local_layers(Path(source)), default=0) if Path(source).is_dir() else 0)
    return SAEDims(first.cfg.d_model, first.cfg.d_sae, n_layers)


def cmd_plan(args: argparse.Namespace) -> None:
    from qscope_plugin.plan import device_memory, make_plan, parse_bytes, read_config, render

    devices = names(args.device or "cpu")
    for device in devices:
        if re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", device) is None:
            raise UsageError(f"--device {device!r}; expected devices like cpu, cuda, cuda:1, separated by commas")
    if args.memory:
        sizes = [parse_bytes(m) for m in names(args.memory)]
        if len(sizes) == 1:
            sizes *= len(devices)
    else:
        sizes = [device_memory(d) for d in devices]
    dims = sae_dims(args.release)
    layers = parse_layers(args.layers, dims.n_layers, subject=f"{args.release!r}")
    plan = make_plan(read_config(args.model), dims, layers=layers, devices=devices, memory=sizes, dtype=args.dtype,
                     seq=args.seq, batch_size=args.batch_size, model=args.model)
    emit(args, plan.to_json(), lambda: print(render(plan)))
    if not plan.fits:
        raise UsageError(plan.advice)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}; expected an integer >= 1")
    return int(text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from qscope_plugin.models import default_model, default_release

    p = sub.add_parser("plan", help="memory per device of a harvest, from configs only: batch size and layer passes "
                       "that fit")
    p.add_argument("--model", default=default_model(), help="model folder or cached hub id (only config.json is read)")
    p.add_argument("--release", default=default_release(), help="release name or SAE folder (default: demo SAEs)")
    p.add_argument("--layers", default="all", help="e.g. 14, 10-14 or all (default)")
    p.add_argument("--device", default=None, help="comma-separated devices the model is split over, e.g. "
                   "cuda:0,cuda:1 (default: cpu)")
    p.add_argument("--memory", default=None, help="memory per device, e.g. 80GiB (one for all, or one per device); "
                   "default: what each device has")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model and SAE dtype (default: the config's torch_dtype)")
    p.add_argument("--seq", type=_positive, default=512, help="tokens per text (default 512, the harvest's cut)")
    p.add_argument("--batch-size", type=_positive, default=None, help="check this batch size instead of choosing one")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)
