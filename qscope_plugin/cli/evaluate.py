"""``qscope evaluate LAYERS --data ...``: SAE quality per layer (FVU, L0, dead / dense features, CE recovered).

    qscope evaluate 0-3 --data texts.jsonl --out quality/               # the demo model and SAEs
    qscope evaluate 10-14 --data wikitext --config wikitext-2-raw-v1 --split test --limit 200 \\
        --model Qwen/Qwen3-1.7B-Base --release qwen-scope-3-1.7b-base-w32k-l50 --out quality/
"""

from __future__ import annotations

import argparse

from qscope_plugin.cli._options import (
    MAX_POSITIONS,
    add_batch_options,
    add_data_options,
    add_distributed_options,
    add_first_token_options,
    add_model_options,
    batch_size,
    count,
    data_texts,
    distributed_run,
    emit,
    finite,
    load_backbone,
    load_saes,
)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.quality import check_options, evaluate_saes
    from qscope_plugin.recipes.reports import quality_table, write_report

    texts = data_texts(args)
    saes = load_saes(args.release, args.layers, args.sae_device)
    check_options(saes, batch_size(args), args.max_length, args.dense_threshold)  # before the (slow) model load
    with distributed_run(args) as rank:
        model, tok = load_backbone(args)
        report = evaluate_saes(model, tok, texts, saes, batch_size=args.batch_size, max_length=args.max_length,
                               dense_threshold=args.dense_threshold, exclude_first_token=args.exclude_first_token,
                               layers_per_pass=args.layers_per_pass, progress=True)
    if rank:
        return  # every rank holds the report; rank 0 writes it
    write_report(report, args.out)
    emit(args, report.to_json(), lambda: print(f"{quality_table(report)}\n\nreport in {args.out}/report.md"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="SAE quality per layer on a dataset: FVU, L0, dead / dense features, "
                       "CE and KL with the reconstruction spliced in (CE loss recovered)")
    p.add_argument("layers", help="e.g. 3, 0-3, 1,3 or all")
    add_data_options(p)
    add_batch_options(p, default=8, passes=True)
    p.add_argument("--max-length", type=count(1, MAX_POSITIONS), default=512,
                   help="keep the first N tokens of each text")
    p.add_argument("--dense-threshold", type=finite, default=0.1,
                   help="a feature firing on more than this fraction of tokens is dense (default 0.1)")
    add_first_token_options(p, default=False)
    p.add_argument("--out", required=True, help="report folder: report.json, report.md, quality.png")
    add_distributed_options(p)
    add_model_options(p, layers=False)
    p.set_defaults(func=cmd_evaluate)
