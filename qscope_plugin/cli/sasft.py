"""``qscope sasft features | train | eval``: SAE-guided fine-tuning against code-switching (report §7).

    qscope sasft features --texts langs.json --target zh --out zh_features.json
    qscope sasft train --features zh_features.json --data sft.jsonl --out run/ --lam 1e-3 --max-steps 100
    qscope sasft eval --prompts prompts.txt --languages zh --model run/ [--ablate-feature 28 --control-feature 7]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qscope_plugin.cli._options import (
    UsageError,
    add_model_options,
    emit,
    load_backbone,
    load_saes,
    names,
    read_texts,
)


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
    model, tok = load_backbone(args)
    feats = language_features(model, tok, texts, saes, target=args.target,
                              top_n=args.top_n)
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
    layers = None if args.penalty_layers is None else [int(n) for n in names(args.penalty_layers)]
    saes = load_saes(args.release, "all", args.sae_device)
    model, tok = load_backbone(args)
    feats = LanguageFeatures.load(args.features, saes)
    penalty = SASFTPenalty(model, feats, saes, layers=layers, lam=args.lam, variant=args.variant)
    data = Dataset.from_list(encode_examples(tok, [Example(r["prompt"], r["response"], r["language"])
                                                   for r in rows], feats))
    config = sft_config(args.out, max_steps=args.max_steps, learning_rate=args.lr, seed=args.seed,
                        per_device_train_batch_size=args.batch_size, logging_steps=max(1, args.max_steps // 10),
                        save_strategy="no", use_cpu=args.device in (None, "cpu"))
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
    f.add_argument("--top-n", type=int, default=2, help="features per layer (official default 2)")
    f.add_argument("--out", required=True, help="where to write the features JSON")
    add_model_options(f)
    f.set_defaults(func=cmd_features)

    t = cmds.add_parser("train", help="fine-tune with CE + lambda * L_reduce (TRL SFTTrainer; needs [train])")
    t.add_argument("--features", required=True, help="JSON from `qscope sasft features`")
    t.add_argument("--data", required=True, help="JSON lines with prompt, response, language")
    t.add_argument("--out", required=True, help="folder for the fine-tuned model")
    t.add_argument("--lam", type=float, default=1e-3, help="lambda (0 = plain SFT)")
    t.add_argument("--variant", choices=["mean", "zero"], default="mean", help="alpha from data, or alpha = 0")
    t.add_argument("--penalty-layers", default=None, help="e.g. 2,3 (default: the last two)")
    t.add_argument("--max-steps", type=int, default=100)
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    add_model_options(t, layers=False)
    t.set_defaults(func=cmd_train)

    e = cmds.add_parser("eval", help="code-switch ratio r (R28), optionally the ablation check (E6)")
    e.add_argument("prompt", nargs="*", help="prompts (or --prompts FILE)")
    e.add_argument("--prompts", default=None, help="file with one prompt per line")
    e.add_argument("--languages", required=True, help="unwanted languages to detect, e.g. zh or zh,ru")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--ablate-feature", type=int, default=None, help="a language feature to ablate at the final layer")
    e.add_argument("--control-feature", type=int, default=0, help="an unrelated feature, ablated the same way")
    e.add_argument("--strength", type=float, default=8.0, help="lambda_abl of E6")
    add_model_options(e, layers=False)
    e.set_defaults(func=cmd_eval)
