"""``qscope evaluate LAYERS --data ...``: SAE quality per layer (FVU, L0, dead / dense features, CE recovered).

    qscope evaluate 0-3 --data texts.jsonl --out quality/               # the demo model and SAEs
    qscope evaluate 10-14 --data wikitext --config wikitext-2-raw-v1 --split test --limit 200 \\
        --model Qwen/Qwen3-1.7B-Base --release qwen-scope-3-1.7b-base-w32k-l50 --out quality/
"""

from __future__ import annotations

import argparse

from qscope_plugin.cli._options import UsageError, add_model_options, emit, load_backbone, load_saes


def _texts(args: argparse.Namespace) -> list[str]:
    from qscope_plugin.recipes.data import load_table

    table = load_table(args.data, config=args.config, split=args.split, revision=args.revision, limit=args.limit)
    if args.column not in table.column_names:
        raise UsageError(f"--data {args.data!r} has no column {args.column!r}; pass --column, one of "
                         f"{table.column_names}")
    texts = table[args.column]
    if not all(isinstance(t, str) for t in texts):
        raise UsageError(f"column {args.column!r} of --data {args.data!r} holds non-text values; pass --column "
                         "naming a column of strings")
    if not any(t.strip() for t in texts):  # before the model loads, which can take minutes
        raise UsageError(f"column {args.column!r} of --data {args.data!r} holds no text, only blank strings")
    return texts


def cmd_evaluate(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.quality import evaluate_saes
    from qscope_plugin.recipes.reports import quality_table, write_report

    texts = _texts(args)
    saes = load_saes(args.release, args.layers)
    model, tok = load_backbone(args)
    report = evaluate_saes(model, tok, texts, saes, batch_size=args.batch_size, max_length=args.max_length,
                           dense_threshold=args.dense_threshold, progress=True)
    write_report(report, args.out)
    emit(args, report.to_json(), lambda: print(f"{quality_table(report)}\n\nreport in {args.out}/report.md"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="SAE quality per layer on a dataset: FVU, L0, dead / dense features, "
                       "CE and KL with the reconstruction spliced in (CE loss recovered)")
    p.add_argument("layers", help="e.g. 3, 0-3, 1,3 or all")
    p.add_argument("--data", required=True, help="local json/jsonl/csv/parquet file or a cached hub dataset id")
    p.add_argument("--column", default="text", help="column holding the texts (default: text)")
    p.add_argument("--config", default=None, help="dataset configuration (hub datasets)")
    p.add_argument("--split", default=None, help="dataset split, e.g. test (needed if it has several)")
    p.add_argument("--revision", default=None, help="dataset revision to pin")
    p.add_argument("--limit", type=int, default=None, help="only the first N texts")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="keep the first N tokens of each text")
    p.add_argument("--dense-threshold", type=float, default=0.1,
                   help="a feature firing on more than this fraction of tokens is dense (default 0.1)")
    p.add_argument("--out", required=True, help="report folder: report.json, report.md, quality.png")
    add_model_options(p, layers=False)
    p.set_defaults(func=cmd_evaluate)
