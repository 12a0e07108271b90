"""``qscope classify fit / eval / predict``: SAE-feature OR-rule classifiers (report §5)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qscope_plugin.cli._options import (
    MAX_INDEX,
    MAX_ITEMS,
    MAX_SEED,
    MAX_TOP,
    UsageError,
    add_distributed_options,
    add_model_options,
    count,
    distributed_run,
    finite,
    load_backbone,
    load_saes,
    read_texts,
)


def _splits(args: argparse.Namespace) -> dict:
    from qscope_plugin.recipes.toxicity import load_splits

    return load_splits(args.data, args.languages.split(",") if args.languages else None,
                       text_column=args.text_column, label_column=args.label_column,
                       n_discovery=args.n_discovery, n_test=args.n_test, split_seed=args.split_seed)


def cmd_classify_fit(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.toxicity import fit_classifier

    splits = _splits(args)
    saes = load_saes(args.release, args.layers, args.sae_device)  # a bad --layers fails before the model loads
    with distributed_run(args) as rank:
        model, tok = load_backbone(args)
        clf, scores = fit_classifier(model, tok, saes, splits, release=args.release,
                                     k_features=args.k, m_layers=args.m_layers, eps=args.eps)
    if rank:
        return  # every rank holds the classifier; rank 0 writes it
    clf.save(args.out)
    print(f"features {clf.features}; held-out precision {scores.precision:.3f} recall {scores.recall:.3f} "
          f"F1 {scores.f1:.3f}; saved {args.out}")


def cmd_classify_eval(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.reports import write_report
    from qscope_plugin.recipes.toxicity import evaluate

    splits = _splits(args)
    saes = load_saes(args.release, args.layers, args.sae_device)
    with distributed_run(args) as rank:
        model, tok = load_backbone(args)
        report = evaluate(model, tok, saes, splits, eps=args.eps,
                          m_layers=args.m_layers, progress=True)
    if rank:
        return  # every rank holds the report; rank 0 writes it
    write_report(report, args.out)
    print(f"macro best-over-layers F1 {report.macro_best_f1:.3f}; report in {args.out}/report.md")


def cmd_classify_predict(args: argparse.Namespace) -> None:
    from qscope_plugin.models import default_model, default_release
    from qscope_plugin.recipes.classifiers import ORRuleClassifier

    texts = read_texts(args.text, args.file, "input")
    try:
        saved = json.loads(Path(args.classifier).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read classifier {args.classifier!r} ({e}); pass a JSON written by "
                         "`qscope classify fit`") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("features", {}), dict)
            and all(isinstance(saved.get(key) or "", str) for key in ("release", "model_id"))):
        raise UsageError(f"{args.classifier!r} is not a classifier: expected a JSON object with 'features' "
                         "({layer: [ids]}) and string 'release' / 'model_id', as `qscope classify fit` writes")
    # the saved backbone and SAEs unless overridden: predicting with other SAEs would be silently wrong
    args.release = args.release or saved.get("release") or default_release()
    args.model = args.model or saved.get("model_id") or default_model()
    layers = ",".join(map(str, saved.get("features", {})))
    saes = load_saes(args.release, layers or "all", args.sae_device)
    model, tok = load_backbone(args)
    clf = ORRuleClassifier.load(args.classifier, model, tok, saes)
    for text, label in zip(texts, clf.predict(texts), strict=True):
        print(f"{int(label)}\t{text}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    classify = sub.add_parser("classify", help="SAE-feature OR-rule classifiers (report §5)")
    verbs = classify.add_subparsers(dest="verb", required=True)
    for verb, func, help_text in (("fit", cmd_classify_fit, "discover features and save a classifier JSON"),
                                  ("eval", cmd_classify_eval, "full evaluation report (layers, K, transfer)")):
        p = verbs.add_parser(verb, help=help_text)
        p.add_argument("--data", required=True, help="hub id, folder of per-language files, or one file")
        p.add_argument("--languages", default=None, help="comma-separated, e.g. en,ru (default: all)")
        p.add_argument("--text-column", default="text")
        p.add_argument("--label-column", default="toxic")
        p.add_argument("--n-discovery", type=count(0, MAX_ITEMS), default=4000)
        p.add_argument("--n-test", type=count(0, MAX_ITEMS), default=1000)
        p.add_argument("--split-seed", type=count(0, MAX_SEED), default=0)
        p.add_argument("--eps", type=finite, default=0.0, help="firing threshold ε (default 0)")
        p.add_argument("--m-layers", type=count(1, MAX_INDEX), default=1 if verb == "fit" else 3)
        if verb == "fit":
            p.add_argument("--k", type=count(1, MAX_TOP), default=5, help="features of the selected layer (default 5)")
        p.add_argument("--out", required=True, help="classifier JSON (fit) or report folder (eval)")
        add_distributed_options(p)
        add_model_options(p)
        p.set_defaults(func=func)
    predict = verbs.add_parser("predict", help="apply a saved classifier to texts")
    predict.add_argument("classifier")
    predict.add_argument("--text", action="append", help="a text (repeatable)")
    predict.add_argument("--file", help="file with one text per line")
    add_model_options(predict, layers=False)
    predict.set_defaults(func=cmd_classify_predict, model=None, release=None)
