"""``qscope dashboard``: feature cards of one layer as ONE self-contained HTML file.

    qscope dashboard --layer 3 --top 50 --data texts.jsonl --out dashboard.html       # the demo model and SAEs
    qscope dashboard --layer 3 --features 12,40-45 --data texts.jsonl --explanations targets.jsonl --out d.html
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qscope_plugin.cli._options import UsageError, add_model_options, emit, load_backbone, load_saes, parse_layers


def read_explanations(path: str, layer: int) -> dict[int, str]:
    """``{feature: explanation}`` from a JSON object ``{"12": "..."}`` or from JSON lines with ``feature`` and
    ``explanation`` (``qscope safety targets`` output; lines of another ``layer`` are skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            return {int(r["feature"]): str(r["explanation"]) for r in rows if r.get("layer", layer) == layer}
        return {int(f): str(e) for f, e in json.loads(text).items()}
    except OSError as e:
        raise UsageError(f"cannot read --explanations {path!r}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--explanations {path!r} is not usable ({type(e).__name__}: {e}); expected a JSON object "
                         '{"feature id": "explanation"} or JSON lines with "feature" and "explanation"') from None


def cmd_dashboard(args: argparse.Namespace) -> None:
    from qscope_plugin.app.dashboard import write_dashboard
    from qscope_plugin.recipes.data import load_table
    from qscope_plugin.recipes.inspection import feature_cards

    if args.top is not None and args.top < 1:
        raise UsageError(f"--top {args.top}: expected a positive number of features")
    (sae,) = load_saes(args.release, str(args.layer)).values()
    features = None if args.features is None else parse_layers(args.features, sae.cfg.d_sae, "--features",
                                                               f"the layer-{args.layer} SAE")
    top = args.top if args.top is not None or features is not None else 50
    explanations = read_explanations(args.explanations, args.layer) if args.explanations else None
    table = load_table(args.data, config=args.config, split=args.split, limit=args.limit)
    if args.column not in table.column_names:
        raise UsageError(f"--data {args.data!r} has no column {args.column!r}; pass --column, one of "
                         f"{table.column_names}")
    model, tok = load_backbone(args)
    cards = feature_cards(model, tok, [str(t) for t in table[args.column]], sae, features, layer=args.layer, top=top,
                          n_contexts=args.n_contexts, window=args.window, explanations=explanations,
                          batch_size=args.batch_size, max_length=args.max_length)
    meta = {"model": args.model, "release": args.release, "layer": args.layer, "data": args.data,
            "texts": len(table), "tokens": cards[0].n_tokens if cards else 0}
    out = write_dashboard(args.out, cards, title=f"{Path(args.release).name} layer {args.layer}", meta=meta)
    emit(args, {"out": str(out), "layer": args.layer, "features": [c.feature for c in cards]},
         lambda: print(f"{len(cards)} feature cards written to {out}"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="feature cards of one layer as one self-contained HTML file")
    p.add_argument("--layer", type=int, required=True, help="the SAE layer")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--features", default=None, help="feature ids, e.g. 12,40-45")
    which.add_argument("--top", type=int, default=None, help="the N features of highest firing density (default 50)")
    p.add_argument("--data", required=True, help="texts: a local json/jsonl/csv/parquet file or a cached hub dataset")
    p.add_argument("--column", default="text", help="column holding the texts (default text)")
    p.add_argument("--config", default=None, help="dataset configuration (hub datasets)")
    p.add_argument("--split", default=None, help="dataset split (needed if it has several)")
    p.add_argument("--limit", type=int, default=None, help="only the first N texts")
    p.add_argument("--explanations", default=None, help='JSON {"feature": "explanation"} or `qscope safety '
                   "targets` JSON lines")
    p.add_argument("--n-contexts", type=int, default=10, help="top-activating contexts per card (default 10)")
    p.add_argument("--window", type=int, default=10, help="tokens shown each side of a context's peak (default 10)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512, help="tokens read per text (default 512)")
    p.add_argument("--out", required=True, help="the HTML file to write")
    add_model_options(p, layers=False)
    p.set_defaults(func=cmd_dashboard)
