"""The ``qscope`` command line.

    qscope releases                                   # the 14 Qwen-Scope groups
    qscope info qwen-scope-3-1.7b-base-w32k-l50       # dims, bytes per layer, cached layers
    qscope fetch qwen-scope-3-1.7b-base-w32k-l50 --layers 10-14

Bad input prints one line on stderr and exits with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from qscope_plugin.catalogue import LICENSE_NOTICE, Release, release, releases
from qscope_plugin.errors import QScopeError


class UsageError(QScopeError, ValueError):
    """A command-line argument that cannot be used."""


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``"10-14"``, ``"3,5,7-9"`` or ``"all"`` to a sorted list of layer indices, each checked."""
    if spec.strip() == "all":
        return list(range(n_layers))
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise UsageError(f"bad --layers {spec!r}: expected e.g. '14', '10-14', '3,5,7-9' or 'all'") from None
        if not 0 <= first <= last < n_layers:
            raise UsageError(f"--layers {part.strip()!r} is outside 0..{n_layers - 1}")
        out.update(range(first, last + 1))
    return sorted(out)


def _cached_layers(rel: Release) -> list[int]:
    from huggingface_hub import try_to_load_from_cache

    return [n for n in range(rel.n_layers)
            if isinstance(try_to_load_from_cache(rel.repo_id, f"layer{n}.sae.pt", revision=rel.revision), str)]


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

    from qscope_plugin.sae import QwenScopeSAE
    from qscope_plugin.store import _drop_from_hub_cache, fetch

    r = release(args.release)
    layers = parse_layers(args.layers, r.n_layers)
    for n in tqdm(layers, desc=f"fetch {r.name}", unit="layer", disable=None):  # no bar when not a TTY
        path = fetch(r, n, revision=args.revision)
        try:
            QwenScopeSAE.from_file(path, r.k, layer=n, release=r.name).validate()
        except QScopeError:
            _drop_from_hub_cache(path)
            raise
    print(f"{len(layers)} layer(s) of {r.name} cached and validated. {LICENSE_NOTICE}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qscope", description="Qwen-Scope SAEs: catalogue, download, recipes")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("releases", help="list the Qwen-Scope releases").set_defaults(func=cmd_releases)
    info = sub.add_parser("info", help="dims, layers, bytes per layer and cached layers of a release")
    info.add_argument("release")
    info.set_defaults(func=cmd_info)
    fetch = sub.add_parser("fetch", help="download and validate layers of a release into the HF cache")
    fetch.add_argument("release")
    fetch.add_argument("--layers", default="all", help="e.g. 14, 10-14, 3,5,7-9 or all (default)")
    fetch.add_argument("--revision", default=None, help="hub revision to pin")
    fetch.set_defaults(func=cmd_fetch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (QScopeError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"qscope {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
