"""``qscope releases / info / fetch``: the catalogue and the local hub cache."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from qscope_plugin.catalogue import LICENSE_NOTICE, Release, release, releases
from qscope_plugin.cli._options import parse_layers


def _cached_layers(rel: Release) -> list[int]:
    from qscope_plugin.store import cached_file

    return [n for n in range(rel.n_layers) if cached_file(rel, n) is not None]


def _ranges(layers: Sequence[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5,9"``."""
    runs: list[list[int]] = []
    for n in layers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


def cmd_releases(args: argparse.Namespace) -> None:
    print(f"{'release':40} {'backbone':28} {'d_model':>7} {'d_sae':>7} {'k':>4} {'layers':>6}")
    for r in releases():
        tag = " (instruct)" if r.instruct else ""
        print(f"{r.name:40} {r.model_id:28} {r.d_model:7} {r.d_sae:7} {r.k:4} {r.n_layers:6}{tag}")


def cmd_info(args: argparse.Namespace) -> None:
    r = release(args.release)
    rows = {
        "release": r.name,
        "repo": r.repo_id,
        "backbone": f"{r.model_id} ({r.family}, {'post-trained' if r.instruct else 'base'})",
        "d_model, d_sae": f"{r.d_model}, {r.d_sae}",
        "k": r.k,
        "layers": f"{r.n_layers} (sae ids layer0..layer{r.n_layers - 1}, hook blocks.N.hook_resid_post)",
        "bytes per layer": f"{r.bytes_per_layer:,} ({r.bytes_per_layer / 2**20:.1f} MiB, float32)",
        "cached layers": _ranges(_cached_layers(r)),
        "license": LICENSE_NOTICE,
    }
    for key, value in rows.items():
        print(f"{key:16} {value}")


def cmd_fetch(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from qscope_plugin.store import fetch, load_sae

    r = release(args.release)
    layers = parse_layers(args.layers, r.n_layers, subject=f"release {r.name!r}")
    for n in tqdm(layers, desc=f"fetch {r.name}", unit="layer", disable=None):  # no bar when not a TTY
        # a file that fails its SHA-256, from_file or validate() leaves the hub cache: the next fetch downloads it
        fetch(r, n, revision=args.revision, force_download=args.force_download, verify=True)
        load_sae(r.name, n, revision=args.revision, cache=None).validate()
    print(f"{len(layers)} layer(s) of {r.name} cached, checked against their SHA-256 and validated. "
          f"{LICENSE_NOTICE}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("releases", help="list the Qwen-Scope releases").set_defaults(func=cmd_releases)
    info = sub.add_parser("info", help="dims, layers, bytes per layer and cached layers of a release")
    info.add_argument("release")
    info.set_defaults(func=cmd_info)
    fetch = sub.add_parser("fetch", help="download and validate layers of a release into the HF cache")
    fetch.add_argument("release")
    fetch.add_argument("--layers", default="all", help="e.g. 14, 10-14, 3,5,7-9 or all (default)")
    fetch.add_argument("--revision", default=None, help="hub revision to pin")
    fetch.add_argument("--force-download", action="store_true",
                       help="download again even if cached (repairs a layer `qscope verify` reports corrupted)")
    fetch.set_defaults(func=cmd_fetch)
