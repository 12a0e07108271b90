"""``qscope sasft features | train | eval``: SAE-guided fine-tuning against code-switching (report §7).

    qscope sasft features --texts langs.json --target zh --out zh_features.json
    qscope sasft train --features zh_features.json --data sft.jsonl --out run/ --lam 1e-3 --max-steps 100
        [--normalize penalised_tokens] [--precision fp32]       # run/sasft.json records both
    qscope sasft eval --prompts prompts.txt --languages zh --model run/ [--ablate-feature 28 --control-feature 7]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qscope_plugin.cli._options import (
    MAX_BATCH,
    MAX_INDEX,
    MAX_ITEMS,
    MAX_SEED,
    MAX_TOP,
    UsageError,
    add_distributed_options,
    add_model_options,
    count,
    distributed_run,
    emit,
    finite,
    load_backbone,
    load_saes,
    names,
    read_texts,
    release_layers,
)
from qscope_plugin.indices import MAX_NEW_TOKENS


def _read_json(path: str, what: str) -> object:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read {what} file {path!r}: {e.strerror}") from None
    try:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} file {path!r} is not valid JSON ({e.msg} at line {e.lineno})") from None


def cmd_features(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.sasft import language_features

    texts = _read_json(args.texts, "--texts")
    if not isinstance(texts, dict):
        raise UsageError(f"--texts {args.texts!r} must hold a JSON object {{language: [lines]}}")
    saes = load_saes(args.release, args.layers, args.sae_device)  # a bad --layers fails before the model loads
    with distributed_run(args) as rank:
        model, tok = load_backbone(args)
        feats = language_features(model, tok, texts, saes, target=args.target,
                                  top_n=args.top_n)
    if rank:
        return  # every rank holds the features; rank 0 writes them
    feats.save(args.out)
    emit(args, feats.to_json(), lambda: [print(f"layer {n}: S_{feats.target} = {f}  nu = "
                                               f"{[round(s, 3) for s in feats.scores[n]]}")
                                         for n, f in feats.features.items()])


def cmd_train(args: argparse.Namespace) -> None:
    from datasets import Dataset

    from qscope_plugin.adapters.trl import SASFTSFTTrainer, sasft_collator, sft_config
    from qscope_plugin.recipes.sasft import Example, LanguageFeatures, SASFTPenalty, encode_examples

    rows = _read_json(args.data, "--data")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"prompt", "response", "language"} <= set(r)
                                             for r in rows):
        raise UsageError(f"--data {args.data!r} must be JSON lines with prompt, response and language")
    layers = None if args.penalty_layers is None else release_layers(args.penalty_layers, args.release,
                                                                      "--penalty-layers")
    saes = load_saes(args.release, "all", args.sae_device)
    model, tok = load_backbone(args)
    feats = LanguageFeatures.load(args.features, saes)
    penalty = SASFTPenalty(model, feats, saes, layers=layers, lam=args.lam, variant=args.variant,
                           normalize=args.normalize)
    data = Dataset.from_list(encode_examples(tok, [Example(r["prompt"], r["response"], r["language"])
                                                   for r in rows], feats))
    config = sft_config(args.out, max_steps=args.max_steps, learning_rate=args.lr, seed=args.seed,
                        per_device_train_batch_size=args.batch_size, logging_steps=max(1, args.max_steps // 10),
                        save_strategy="no", use_cpu=args.device in (None, "cpu"),
                        **({} if args.precision == "auto" else {"bf16": args.precision == "bf16", "fp16": False}))
    trainer = SASFTSFTTrainer(model=model, args=config, train_dataset=data, data_collator=sasft_collator(tok),
                              processing_class=tok, penalty=penalty)
    trainer.train()
    trainer.save_model(args.out)
    tok.save_pretrained(args.out)
    history = [h for h in trainer.state.log_history if "loss" in h]
    emit(args, history, lambda: [print(f"step {h['step']}: loss {h['loss']:.4f}  sae_reduce "
                                       f"{h.get('sae_reduce', float('nan')):.4f}") for h in history])


def cmd_eval(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.code_switch import ablation_check, code_switch_ratio

    prompts = read_texts(args.prompt, args.prompts, "--prompts")
    languages = names(args.languages)
    model, tok = load_backbone(args)
    report = code_switch_ratio(model, tok, prompts, languages=languages, max_new_tokens=args.max_new_tokens)
    payload = report.to_json()
    if args.ablate_feature is not None:
        saes = load_saes(args.release, "all", args.sae_device)
        check = ablation_check(model, tok, prompts, saes, language=languages[0], feature=args.ablate_feature,
                               control_feature=args.control_feature, strength=args.strength,
                               max_new_tokens=args.max_new_tokens)
        payload["ablation"] = vars(check)

    def render() -> None:
        for lang, r in report.ratios.items():
            print(f"code-switch ratio into {lang}: {r:.3f} ({len(prompts)} prompts)")
        if "ablation" in payload:
            a = payload["ablation"]
            print(f"ablating feature {a['feature']} at layer {a['layer']} before the switch: r {a['baseline']:.3f} "
                  f"-> {a['ablated']:.3f}; unrelated feature {a['control_feature']}: {a['control']:.3f}")

    emit(args, payload, render)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sasft", help="SAE-guided fine-tuning against unexpected code-switching (report §7)")
    cmds = p.add_subparsers(dest="sasft_command", required=True)

    f = cmds.add_parser("features", help="language features S_L (monolinguality) and thresholds alpha, to JSON")
    f.add_argument("--texts", required=True, help="JSON object {language: [lines]} (two languages or more)")
    f.add_argument("--target", required=True, help="the unwanted language L whose features are penalised")
    f.add_argument("--top-n", type=count(1, MAX_TOP), default=2, help="features per layer (official default 2)")
    f.add_argument("--out", required=True, help="where to write the features JSON")
    add_distributed_options(f)
    add_model_options(f)
    f.set_defaults(func=cmd_features)

    t = cmds.add_parser("train", help="fine-tune with CE + lambda * L_reduce (TRL SFTTrainer; needs [train])")
    t.add_argument("--features", required=True, help="JSON from `qscope sasft features`")
    t.add_argument("--data", required=True, help="JSON lines with prompt, response, language")
    t.add_argument("--out", required=True, help="folder for the fine-tuned model")
    t.add_argument("--lam", type=finite, default=1e-3, help="lambda (0 = plain SFT)")
    t.add_argument("--variant", choices=["mean", "zero"], default="mean", help="alpha from data, or alpha = 0")
    t.add_argument("--normalize", choices=["all_response_tokens", "penalised_tokens"], default="all_response_tokens",
                   help="L_reduce's denominator: |S| x every response token + 1 (official script) or |S| x the "
                        "penalised tokens (docs/method.md 3.5)")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on a GPU that has it, fp32 on CPU; recorded in OUT/sasft.json")
    t.add_argument("--penalty-layers", default=None, help="e.g. 2,3 (default: the last two)")
    t.add_argument("--max-steps", type=count(0, MAX_ITEMS), default=100)
    t.add_argument("--lr", type=finite, default=5e-5)
    t.add_argument("--batch-size", type=count(1, MAX_BATCH), default=8)
    t.add_argument("--seed", type=count(0, MAX_SEED), default=0)
    add_model_options(t, layers=False)
    t.set_defaults(func=cmd_train)

    e = cmds.add_parser("eval", help="code-switch ratio r (R28), optionally the ablation check (E6)")
    e.add_argument("prompt", nargs="*", help="prompts (or --prompts FILE)")
    e.add_argument("--prompts", default=None, help="file with one prompt per line")
    e.add_argument("--languages", required=True, help="unwanted languages to detect, e.g. zh or zh,ru")
    e.add_argument("--max-new-tokens", type=count(0, MAX_NEW_TOKENS), default=32)
    e.add_argument("--ablate-feature", type=count(0, MAX_INDEX), default=None,
                   help="a language feature to ablate at the final layer")
    e.add_argument("--control-feature", type=count(0, MAX_INDEX), default=0,
                   help="an unrelated feature, ablated the same way")
    e.add_argument("--strength", type=finite, default=8.0, help="lambda_abl of E6")
    add_model_options(e, layers=False)
    e.set_defaults(func=cmd_eval)
