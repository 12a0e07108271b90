"""``qscope steer``: a strength sweep of one feature beside the unsteered completion (report §3)."""

from __future__ import annotations

import argparse

from qscope_plugin.cli._options import (
    MAX_INDEX,
    MAX_POSITIONS,
    add_model_options,
    count,
    emit,
    finite,
    load_backbone,
    load_saes,
)
from qscope_plugin.indices import MAX_NEW_TOKENS, parse_ranges


def cmd_steer(args: argparse.Namespace) -> None:
    from qscope_plugin.backends import as_backend
    from qscope_plugin.recipes.steering import parse_positions, sweep

    saes = load_saes(args.release, str(args.layer), args.sae_device)  # bad --layer, --positions: refused before loading
    if args.positions.strip() not in ("all", "prompt", "generated"):
        parse_ranges(args.positions, what="position", option="--positions")  # read, not expanded
    model, tok = load_backbone(args)
    positions = parse_positions(args.positions, as_backend(model).context_length or MAX_POSITIONS)
    result = sweep(model, tok, args.prompt, args.layer, args.feature, args.alpha, saes,
                   max_new_tokens=args.max_new_tokens, chat=args.chat, direction_norm=args.direction_norm,
                   positions=positions)

    def render() -> None:
        print(f"prompt: {result.prompt!r}\nunsteered: {result.unsteered.text!r}")
        for row in result.rows:
            print(f"alpha {row.alpha:+g}: {row.steered.text!r}  (mean token prob {row.mean_prob:.2f})")

    payload = {"prompt": result.prompt, "unsteered": result.unsteered._asdict(),
               "rows": [{"alpha": r.alpha, "steered": r.steered._asdict(), "mean_prob": r.mean_prob}
                        for r in result.rows]}
    emit(args, payload, render)


def add_parser(sub: argparse._SubParsersAction) -> None:
    steer = sub.add_parser("steer", help="greedy completion with h' = h + alpha * d next to the unsteered one")
    steer.add_argument("prompt")
    steer.add_argument("--layer", type=count(0, MAX_INDEX), required=True)
    steer.add_argument("--feature", type=count(0, MAX_INDEX), required=True)
    steer.add_argument("--alpha", type=finite, action="append", required=True, help="strength (repeat to sweep)")
    steer.add_argument("--direction-norm", choices=["raw", "unit"], default="raw")
    steer.add_argument("--positions", default="all", help="all, prompt, generated or indices like 0,3-5")
    steer.add_argument("--max-new-tokens", type=count(0, MAX_NEW_TOKENS), default=32,
                       help=f"tokens generated per completion (0..{MAX_NEW_TOKENS}); the prompt plus these must fit "
                       "the model's context, else the command is refused (a cut prompt would steer another text)")
    steer.add_argument("--chat", choices=["thinking", "no_thinking"], default=None, help="wrap in Qwen's template")
    add_model_options(steer, layers=False)
    steer.set_defaults(func=cmd_steer)
