"""``qscope verify / checksum``: detect silently corrupted SAE files offline, against their recorded SHA-256.

    qscope verify qwen-scope-3-1.7b-base-w32k-l50 --layers 10-14    # hub cache: LFS blob names are SHA-256
    qscope checksum ./my_saes                                        # writes ./my_saes/SHA256SUMS
    qscope verify ./my_saes                                          # checks the folder against it
    qscope verify qscope-demo-qwen3-4l.explanations.jsonl           # an explanations file: every record valid
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qscope_plugin.catalogue import release
from qscope_plugin.cli._options import UsageError, emit, parse_layers

_SHOWN = {"ok": "OK", "corrupted": "CORRUPTED", "missing": "not cached", "unverifiable": "no checksum recorded"}


def _layers(source: str, spec: str) -> list[int] | None:
    """``--layers`` of a release or folder; ``None`` for ``all`` (every layer the source knows of)."""
    from qscope_plugin.store import DEMO_RELEASE, DEMO_SAE_DIR, local_layers, read_checksums

    if spec.strip() == "all":
        return None
    folder = DEMO_SAE_DIR if source == DEMO_RELEASE else Path(source)
    if folder.is_dir():
        listed = [int(name[5:-7]) for name in read_checksums(folder) if name[5:-7].isdigit()]
        n_layers = 1 + max(local_layers(folder) + listed, default=-1)
    else:
        n_layers = release(source).n_layers
    return parse_layers(spec, n_layers, subject=repr(source))


def _verify_explanations(args: argparse.Namespace) -> None:
    """An explanations file (``qscope explain``): every line a valid record, one release."""
    from qscope_plugin.errors import IntegrityError
    from qscope_plugin.recipes.explain import ExplainError, read_explanations

    try:
        rows = read_explanations(args.source)
    except ExplainError as e:
        raise IntegrityError(str(e)) from None
    releases = sorted({r.release for r in rows})
    if len(releases) > 1:
        raise IntegrityError(f"{args.source!r} mixes releases {releases}; `qscope explain` writes one file per release")
    layers = sorted({r.layer for r in rows})
    summary = {"file": args.source, "release": releases[0] if releases else None, "explanations": len(rows),
               "layers": layers, "scored": sum(r.detection is not None for r in rows)}
    emit(args, summary, lambda: print(f"OK  {len(rows)} explanation(s) of {summary['release']}, layers {layers}, "
                                      f"{summary['scored']} scored"))


def cmd_verify(args: argparse.Namespace) -> None:
    from qscope_plugin.errors import IntegrityError
    from qscope_plugin.store import verify

    if Path(args.source).is_file() and args.source.endswith(".jsonl"):
        return _verify_explanations(args)
    checks = verify(args.source, _layers(args.source, args.layers), revision=args.revision, progress=True)

    def render() -> None:
        for c in checks:
            print(f"layer {c.layer:<4} {_SHOWN[c.status]:22} {c.actual or c.expected or ''}")

    emit(args, [c.to_json() for c in checks], render)
    bad = [c.layer for c in checks if c.status == "corrupted"]
    if bad:
        layers = ",".join(map(str, bad))
        if Path(args.source).is_dir():
            repair = (f"restore them from their source (or, if the change is intended, run "
                      f"`qscope checksum {args.source}`)")
        else:
            pin = f" --revision {args.revision}" if args.revision else ""
            repair = f"repair with `qscope fetch {args.source} --layers {layers}{pin} --force-download`"
        raise IntegrityError(f"{len(bad)} of {len(checks)} layer(s) of {args.source} are corrupted (layers {layers}):"
                             f" their SHA-256 differs from the recorded one; {repair}")


def cmd_checksum(args: argparse.Namespace) -> None:
    from qscope_plugin.store import write_checksums

    if not Path(args.folder).is_dir():
        raise UsageError(f"{args.folder!r} is not a folder; pass a folder of layer{{n}}.sae.pt files")
    print(f"wrote {write_checksums(args.folder, progress=True)} (check it with `qscope verify {args.folder}` "
          "or `sha256sum -c SHA256SUMS` inside the folder)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    verify = sub.add_parser("verify", help="hash cached layers against their recorded SHA-256 (offline); exit 1 "
                            "if any is corrupted")
    verify.add_argument("source", help="release name, a folder with a SHA256SUMS (`qscope checksum`), or a "
                        "`qscope explain` .jsonl file")
    verify.add_argument("--layers", default="all", help="e.g. 14, 10-14, 3,5,7-9 or all (default)")
    verify.add_argument("--revision", default=None, help="hub revision whose snapshot to check")
    verify.add_argument("--json", action="store_true", help="print JSON instead of a table")
    verify.set_defaults(func=cmd_verify)
    checksum = sub.add_parser("checksum", help="write FOLDER/SHA256SUMS for its layer{n}.sae.pt files "
                              "(`sha256sum` format)")
    checksum.add_argument("folder")
    checksum.set_defaults(func=cmd_checksum)
