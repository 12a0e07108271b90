"""``qscope dashboard``: feature cards of one layer as ONE self-contained HTML file.

    qscope dashboard --layer 3 --top 50 --data texts.jsonl --out dashboard.html       # the demo model and SAEs
    qscope dashboard --layer 3 --features 12,40-45 --data texts.jsonl --explanations targets.jsonl --out d.html
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qscope_plugin.cli._options import (
    MAX_INDEX,
    MAX_POSITIONS,
    UsageError,
    add_batch_options,
    add_data_options,
    add_distributed_options,
    add_first_token_options,
    add_model_options,
    count,
    data_texts,
    distributed_run,
    emit,
    load_backbone,
    load_saes,
    parse_layers,
)

MAX_FEATURES = 1000
"""Cards per dashboard: co-firing keeps a (cards x d_sae) count matrix, 8 bytes each (0.26 GB at 32K)."""


def read_explanations(path: str, layer: int) -> dict[int, object]:
    """``{feature: explanation}`` from a JSON object ``{"12": "..."}`` or from JSON lines with ``feature`` and
    ``explanation`` (``qscope safety targets`` output; lines of another ``layer`` are skipped); from a
    ``qscope explain`` file, ``{feature: FeatureExplanation}``, so that the cards carry the scores too."""
    from qscope_plugin.recipes.explain import FORMAT, ExplainError
    from qscope_plugin.recipes.explain import read_explanations as read_explain_file

    try:
        text = Path(path).read_text(encoding="utf-8")
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            if rows and rows[0].get("format") == FORMAT:
                return {r.feature: r for r in read_explain_file(path) if r.layer == layer}
            return {int(r["feature"]): str(r["explanation"]) for r in rows if r.get("layer", layer) == layer}
        return {int(f): str(e) for f, e in json.loads(text).items()}
    except OSError as e:
        raise UsageError(f"cannot read --explanations {path!r}: {e.strerror}") from None
    except ExplainError as e:
        raise UsageError(f"--explanations {path!r}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--explanations {path!r} is not usable ({type(e).__name__}: {e}); expected a JSON object "
                         '{"feature id": "explanation"} or JSON lines with "feature" and "explanation"') from None


def cmd_dashboard(args: argparse.Namespace) -> None:
    from qscope_plugin.app.dashboard import write_dashboard
    from qscope_plugin.recipes.inspection import feature_cards

    (sae,) = load_saes(args.release, str(args.layer), args.sae_device).values()
    features = None if args.features is None else parse_layers(args.features, sae.cfg.d_sae, "--features",
                                                               f"the layer-{args.layer} SAE")
    if len(features or ()) > MAX_FEATURES:
        raise UsageError(f"--features {args.features!r} asks for {len(features)} cards; a dashboard holds at most "
                         f"{MAX_FEATURES} (co-firing counts grow with cards x {sae.cfg.d_sae}); pass fewer ids, or "
                         "--top N for the densest ones")
    top = args.top if args.top is not None or features is not None else 50
    explanations = read_explanations(args.explanations, args.layer) if args.explanations else None
    texts = data_texts(args)
    with distributed_run(args) as rank:
        model, tok = load_backbone(args)
        cards = feature_cards(model, tok, texts, sae, features, layer=args.layer, top=top,
                              exclude_first_token=args.exclude_first_token, n_contexts=args.n_contexts,
                              window=args.window, explanations=explanations, batch_size=args.batch_size,
                              max_length=args.max_length)
    if rank:
        return  # every rank holds the cards; rank 0 writes them
    meta = {"model": args.model, "release": args.release, "layer": args.layer, "data": args.data,
            "texts": len(texts), "tokens": cards[0].n_tokens if cards else 0}
    out = write_dashboard(args.out, cards, title=f"{Path(args.release).name} layer {args.layer}", meta=meta)
    emit(args, {"out": str(out), "layer": args.layer, "features": [c.feature for c in cards]},
         lambda: print(f"{len(cards)} feature cards written to {out}"))


def _top(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_FEATURES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of features in 1..{MAX_FEATURES}")
    return int(text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="feature cards of one layer as one self-contained HTML file")
    p.add_argument("--layer", type=count(0, MAX_INDEX), required=True, help="the SAE layer")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--features", default=None, help="feature ids, e.g. 12,40-45")
    which.add_argument("--top", type=_top, default=None, help="the N features of highest firing density (default "
                       f"50, at most {MAX_FEATURES})")
    add_data_options(p)
    add_first_token_options(p, default=True)
    p.add_argument("--explanations", default=None, help='JSON {"feature": "explanation"}, `qscope safety '
                   "targets` JSON lines or a `qscope explain` file (explanations and their scores)")
    p.add_argument("--n-contexts", type=count(0, 1000), default=10,
                   help="top-activating contexts per card (default 10)")
    p.add_argument("--window", type=count(0, 1000), default=10,
                   help="tokens shown each side of a context's peak (default 10)")
    add_batch_options(p, default=16)
    p.add_argument("--max-length", type=count(1, MAX_POSITIONS), default=512, help="tokens read per text (default 512)")
    p.add_argument("--out", required=True, help="the HTML file to write")
    add_distributed_options(p)
    add_model_options(p, layers=False)
    p.set_defaults(func=cmd_dashboard)
