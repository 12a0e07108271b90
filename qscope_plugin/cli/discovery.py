"""``qscope analyze / compare``: feature discovery (report §3)."""

from __future__ import annotations

import argparse

from qscope_plugin.cli._options import (
    MAX_TOP,
    add_first_token_options,
    add_model_options,
    count,
    emit,
    load_backbone,
    load_saes,
    read_texts,
)


def cmd_analyze(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.discovery import analyze

    saes = load_saes(args.release, args.layers, args.sae_device)  # a bad --layers fails before the model loads
    model, tok = load_backbone(args)
    rows = analyze(model, tok, args.text, saes, top_n=args.top)

    def render() -> None:
        for r in rows:
            feats = "  ".join(f"{f}:{v:.2f}" for f, v in r.features)
            print(f"L{r.layer:<3} {r.position:4} {r.token!r:14} {feats}")

    emit(args, [r._asdict() for r in rows], render)


def cmd_compare(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.discovery import contrast

    positive = read_texts(args.positive, args.positive_file, "positive")
    negative = read_texts(args.negative, args.negative_file, "negative")
    saes = load_saes(args.release, args.layers, args.sae_device)
    model, tok = load_backbone(args)
    ranking = contrast(model, tok, positive, negative, saes, method=args.method,
                       pool=args.pool, rank_by=args.rank_by, top_k=args.top_k,
                       exclude_first_token=args.exclude_first_token, progress=True)

    def render() -> None:
        for layer, scores in ranking.items():
            for s in scores:
                print(f"L{layer:<3} feature {s.feature:6}  score {s.score:+.4f}  "
                      f"positive {s.positive:.4f}  negative {s.negative:.4f}")

    emit(args, {layer: [s._asdict() for s in scores] for layer, scores in ranking.items()}, render)


def add_parser(sub: argparse._SubParsersAction) -> None:
    analyze = sub.add_parser("analyze", help="top SAE features of every token of a text, per layer")
    analyze.add_argument("text")
    analyze.add_argument("--top", type=count(1, MAX_TOP), default=5, help="features per token (default 5)")
    add_model_options(analyze)
    analyze.set_defaults(func=cmd_analyze)

    compare = sub.add_parser("compare", help="features that fire more on positive than negative texts")
    for side in ("positive", "negative"):
        compare.add_argument(f"--{side}", action="append", help=f"a {side} text (repeatable)")
        compare.add_argument(f"--{side}-file", help=f"file with one {side} text per line")
    compare.add_argument("--method", choices=["mean", "rate"], default="mean",
                         help="mean activation difference (report R1) or firing-rate difference (official app)")
    compare.add_argument("--pool", choices=["mean", "max"], default="mean", help="token pooling for --method mean")
    compare.add_argument("--rank-by", choices=["signed", "abs"], default="signed")
    compare.add_argument("--top-k", type=count(1, MAX_TOP), default=5, help="features per layer (default 5)")
    add_first_token_options(compare, default=True)
    add_model_options(compare)
    compare.set_defaults(func=cmd_compare)
