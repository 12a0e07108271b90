"""``qscope repetition features | check``: repetition features (R32) and their causal check (R33), report §8.

    qscope repetition features --texts looping.txt --out rep_features.json        # texts that loop
    qscope repetition features 今天早上 医生建议 --max-new-tokens 48 --out rep.json   # loop the model's own
    qscope repetition check --features rep.json --prompts prompts.txt --alphas=-8,0,8 --steer-layers 1,2
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from qscope_plugin.cli._options import (
    MAX_SEED,
    MAX_TOP,
    UsageError,
    add_distributed_options,
    add_model_options,
    count,
    distributed_run,
    emit,
    load_backbone,
    load_saes,
    names,
    read_texts,
    release_layers,
)
from qscope_plugin.indices import MAX_NEW_TOKENS


def cmd_features(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.repetition import extend, repetition_features

    texts = read_texts(args.text, args.texts, "--texts")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}; expected 0 (texts as given) or more")
    saes = load_saes(args.release, args.layers, args.sae_device)  # a bad --layers fails before the model loads
    with distributed_run(args) as rank:
        model, tok = load_backbone(args)
        if args.max_new_tokens:  # every rank extends every text (generation is not sharded)
            texts = extend(model, tok, texts, max_new_tokens=args.max_new_tokens)
        found = repetition_features(model, tok, texts, saes, n_features=args.n_features, rep_agg=args.rep_agg)
    if rank:
        return  # every rank holds the features; rank 0 writes them
    try:
        Path(args.out).write_text(found.to_json(), encoding="utf-8")
    except OSError as e:
        raise OSError(f"cannot write --out {args.out!r}: {e.strerror}") from None
    emit(args, {"features": found.features, "scores": found.scores, "n_texts": found.n_texts},
         lambda: [print(f"layer {n}: {f}  delta = {[round(s, 3) for s in found.scores[n]]}")
                  for n, f in found.features.items()])


def _alphas(spec: str) -> list[float]:
    try:
        alphas = [float(a) for a in names(spec)]
    except ValueError:
        raise UsageError(f"--alphas {spec!r}; expected comma-separated numbers, e.g. -8,0,8") from None
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise UsageError(f"--alphas {spec!r}; expected finite numbers, e.g. -8,0,8")
    return alphas


def cmd_check(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.repetition import RepetitionFeatures, causal_check, repetition_spec

    alphas = _alphas(args.alphas)
    prompts = read_texts(args.prompt, args.prompts, "--prompts")
    found = RepetitionFeatures.load(args.features)
    layers = None if args.steer_layers is None else release_layers(args.steer_layers, args.release, "--steer-layers")
    spec = repetition_spec(found, 1.0, layers=layers, n_features=args.n_features, direction_norm=args.direction_norm)
    saes = load_saes(args.release, "all", args.sae_device)
    model, tok = load_backbone(args)
    check = causal_check(model, tok, prompts, spec, saes, alphas, max_new_tokens=args.max_new_tokens, seed=args.seed)

    def render() -> None:
        print(f"repeat ratio of {check.prompts} greedy continuations ({check.max_new_tokens} tokens)")
        print("alpha  features  random")
        for row in check.rows:
            print(f"{row.alpha:+6.1f}  {row.features:8.3f}  {row.random:6.3f}")

    emit(args, {"prompts": check.prompts, "rows": [vars(r) for r in check.rows]}, render)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repetition", help="repetition features and their causal check (report §8)")
    cmds = p.add_subparsers(dest="repetition_command", required=True)

    f = cmds.add_parser("features", help="repetition features (R32) of texts that loop, to JSON")
    f.add_argument("text", nargs="*", help="texts (or --texts FILE)")
    f.add_argument("--texts", default=None, help="file with one text per line")
    f.add_argument("--max-new-tokens", type=count(0, MAX_NEW_TOKENS), default=0,
                   help="first extend each text by this many greedy tokens (the model's own loops); 0: as given")
    f.add_argument("--n-features", type=count(1, MAX_TOP), default=8, help="features kept per layer")
    f.add_argument("--rep-agg", choices=["mean", "pooled"], default="mean",
                   help="mean per text then texts (default), or one mean over all repeated tokens")
    f.add_argument("--out", required=True, help="where to write the features JSON")
    add_distributed_options(f)
    add_model_options(f)
    f.set_defaults(func=cmd_features)

    c = cmds.add_parser("check", help="repeat ratio vs alpha: the features against a random direction (R33)")
    c.add_argument("prompt", nargs="*", help="prompts (or --prompts FILE)")
    c.add_argument("--prompts", default=None, help="file with one prompt per line")
    c.add_argument("--features", required=True, help="JSON from `qscope repetition features`")
    c.add_argument("--alphas", default="-8,0,8", help="strengths, e.g. --alphas=-8,0,8 (negative suppresses)")
    c.add_argument("--steer-layers", default=None, help="e.g. 1,2 (default: every layer in the JSON)")
    c.add_argument("--n-features", type=count(1, MAX_TOP), default=1, help="top features per layer to steer")
    c.add_argument("--direction-norm", choices=["raw", "unit"], default="unit", help="unit: alpha in residual units")
    c.add_argument("--max-new-tokens", type=count(0, MAX_NEW_TOKENS), default=32)
    c.add_argument("--seed", type=count(0, MAX_SEED), default=0, help="seed of the random direction")
    add_model_options(c, layers=False)
    c.set_defaults(func=cmd_check)
