"""The ``qscope`` command line.

    qscope releases                                   # the 14 Qwen-Scope groups
    qscope info qwen-scope-3-1.7b-base-w32k-l50       # dims, bytes per layer, cached layers
    qscope fetch qwen-scope-3-1.7b-base-w32k-l50 --layers 10-14

Bad input prints one line on stderr and exits with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qscope_plugin.catalogue import LICENSE_NOTICE, Release, release, releases
from qscope_plugin.errors import QScopeError


class UsageError(QScopeError, ValueError):
    """A command-line argument that cannot be used."""


def parse_layers(spec: str, n_layers: int, option: str = "--layers") -> list[int]:
    """``"10-14"``, ``"3,5,7-9"`` or ``"all"`` to a sorted list of indices below ``n_layers``, each checked."""
    if spec.strip() == "all":
        return list(range(n_layers))
    out: set[int] = set()
    for part in spec.split(","):
        bounds = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if bounds is None:
            raise UsageError(f"bad {option} {spec!r}: expected e.g. '14', '10-14', '3,5,7-9' or 'all'")
        first, last = int(bounds[1]), int(bounds[2] or bounds[1])
        if first > last:
            raise UsageError(f"{option} {part.strip()!r} is a reversed range; write it low-high, e.g. "
                             f"'{last}-{first}'")
        if last >= n_layers:
            raise UsageError(f"{option} {part.strip()!r} is outside 0..{n_layers - 1}")
        out.update(range(first, last + 1))
    return sorted(out)


def _cached_layers(rel: Release) -> list[int]:
    from huggingface_hub import try_to_load_from_cache

    return [n for n in range(rel.n_layers)
            if isinstance(try_to_load_from_cache(rel.repo_id, f"layer{n}.sae.pt", revision=rel.revision), str)]


def _ranges(layers: Sequence[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5,9"``."""
    runs: list[list[int]] = []
    for n in layers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


def cmd_releases(args: argparse.Namespace) -> None:
    print(f"{'release':40} {'backbone':28} {'d_model':>7} {'d_sae':>7} {'k':>4} {'layers':>6}")
    for r in releases():
        tag = " (instruct)" if r.instruct else ""
        print(f"{r.name:40} {r.model_id:28} {r.d_model:7} {r.d_sae:7} {r.k:4} {r.n_layers:6}{tag}")


def cmd_info(args: argparse.Namespace) -> None:
    r = release(args.release)
    rows = {
        "release": r.name,
        "repo": r.repo_id,
        "backbone": f"{r.model_id} ({r.family}, {'post-trained' if r.instruct else 'base'})",
        "d_model, d_sae": f"{r.d_model}, {r.d_sae}",
        "k": r.k,
        "layers": f"{r.n_layers} (sae ids layer0..layer{r.n_layers - 1}, hook blocks.N.hook_resid_post)",
        "bytes per layer": f"{r.bytes_per_layer:,} ({r.bytes_per_layer / 2**20:.1f} MiB, float32)",
        "cached layers": _ranges(_cached_layers(r)),
        "license": LICENSE_NOTICE,
    }
    for key, value in rows.items():
        print(f"{key:16} {value}")


def cmd_fetch(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from qscope_plugin.sae import QwenScopeSAE
    from qscope_plugin.store import _drop_from_hub_cache, fetch

    r = release(args.release)
    layers = parse_layers(args.layers, r.n_layers)
    for n in tqdm(layers, desc=f"fetch {r.name}", unit="layer", disable=None):  # no bar when not a TTY
        path = fetch(r, n, revision=args.revision)
        try:
            QwenScopeSAE.from_file(path, r.k, layer=n, release=r.name).validate()
        except QScopeError:
            _drop_from_hub_cache(path)
            raise
    print(f"{len(layers)} layer(s) of {r.name} cached and validated. {LICENSE_NOTICE}")


def _saes(source: str, layers: str) -> dict:
    """``{layer: QwenScopeSAE}`` for ``--layers`` of a release name or SAE folder."""

    from qscope_plugin.store import DEMO_RELEASE, DEMO_SAE_DIR, load_sae, local_layers

    folder = DEMO_SAE_DIR if source == DEMO_RELEASE else Path(source)
    n_layers = 1 + max(local_layers(folder), default=-1) if folder.is_dir() else release(source).n_layers
    return {n: load_sae(source, n) for n in parse_layers(layers, n_layers)}


def _backbone(args: argparse.Namespace):
    from qscope_plugin.models import load_model

    return load_model(args.model, device=args.device)


def _texts(literal: list[str] | None, path: str | None, what: str) -> list[str]:
    texts = list(literal or [])
    if path:

        try:
            texts += [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read {what} file {path!r}: {e.strerror}") from None
    return texts


def _emit(args: argparse.Namespace, payload: object, render: Callable[[], None]) -> None:
    if args.json:

        print(json.dumps(payload, ensure_ascii=False, indent=2))
    else:
        render()


def cmd_analyze(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.discovery import analyze

    model, tok = _backbone(args)
    rows = analyze(model, tok, args.text, _saes(args.release, args.layers), top_n=args.top)

    def render() -> None:
        for r in rows:
            feats = "  ".join(f"{f}:{v:.2f}" for f, v in r.features)
            print(f"L{r.layer:<3} {r.position:4} {r.token!r:14} {feats}")

    _emit(args, [r._asdict() for r in rows], render)


def cmd_compare(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.discovery import contrast

    positive = _texts(args.positive, args.positive_file, "positive")
    negative = _texts(args.negative, args.negative_file, "negative")
    model, tok = _backbone(args)
    ranking = contrast(model, tok, positive, negative, _saes(args.release, args.layers), method=args.method,
                       pool=args.pool, rank_by=args.rank_by, top_k=args.top_k,
                       exclude_first_token=not args.keep_first_token, progress=True)

    def render() -> None:
        for layer, scores in ranking.items():
            for s in scores:
                print(f"L{layer:<3} feature {s.feature:6}  score {s.score:+.4f}  "
                      f"positive {s.positive:.4f}  negative {s.negative:.4f}")

    _emit(args, {layer: [s._asdict() for s in scores] for layer, scores in ranking.items()}, render)


def _positions(spec: str):
    if spec in ("all", "prompt", "generated"):
        return spec
    return parse_layers(spec, 1 << 30, "--positions")  # same "1,3,5-7" syntax


def cmd_steer(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.steering import SteeringSpec, generate

    model, tok = _backbone(args)
    saes = _saes(args.release, str(args.layer))
    results = []
    for alpha in args.alpha:
        spec = SteeringSpec.single(args.layer, args.feature, alpha, direction_norm=args.direction_norm,
                                   positions=_positions(args.positions))
        results.append((alpha, generate(model, tok, args.prompt, spec, saes, max_new_tokens=args.max_new_tokens,
                                        chat=args.chat)))

    def render() -> None:
        print(f"prompt: {results[0][1].prompt!r}\nunsteered: {results[0][1].unsteered.text!r}")
        for alpha, r in results:
            mean_p = sum(t.prob for t in r.steered.tokens) / max(len(r.steered.tokens), 1)
            print(f"alpha {alpha:+g}: {r.steered.text!r}  (mean token prob {mean_p:.2f})")

    payload = [{"alpha": a, "prompt": r.prompt, "steered": r.steered._asdict(), "unsteered": r.unsteered._asdict()}
               for a, r in results]
    _emit(args, payload, render)


def cmd_demo(args: argparse.Namespace) -> None:
    from qscope_plugin.demo.run import CONDITIONS, run_demo

    summary = run_demo(args.out)
    print(f"qscope demo on {summary['release']} ({summary['seconds']} s); report in {args.out}/report.md")
    print("layer  SAE FVU  feature  held-out bal.acc  Han share: " + "  ".join(CONDITIONS))
    for r in summary["layers"]:
        shares = "  ".join(f"{r['han_share'][c]:>{len(c)}.2f}" for c in CONDITIONS)
        print(f"{r['layer']:5}  {r['fvu']:7.3f}  {r['feature']:7}  {r['balanced_accuracy']:16.2f}  {'':11}{shares}")
    clf, red = summary["classifier"], summary["redundancy"]
    print(f"OR-rule zh/en classifier {clf['features']}: held-out precision {clf['precision']:.2f} recall "
          f"{clf['recall']:.2f} F1 {clf['f1']:.2f}")
    print(f"redundancy (layer {red['layer']}): " + ", ".join(
        f"{name} |F| {row['footprint_size']} R̂ {row['feature_redundancy']:.3g}" for name, row in
        red["benchmarks"].items()) + "; drop candidates: " + (", ".join(
        f"{d['benchmark']} (in {d['covered_by']})" for d in red["summary"]["drop_candidates"]) or "none"))


def cmd_classify_fit(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.classifiers import ORRuleClassifier
    from qscope_plugin.recipes.toxicity import load_splits

    splits = load_splits(args.data, args.languages.split(",") if args.languages else None,
                         text_column=args.text_column, label_column=args.label_column,
                         n_discovery=args.n_discovery, n_test=args.n_test, split_seed=args.split_seed)
    texts = [t for s in splits.values() for t in s.discovery_texts]
    labels = [y for s in splits.values() for y in s.discovery_labels]
    model, tok = _backbone(args)
    clf = ORRuleClassifier(model, tok, _saes(args.release, args.layers), release=args.release, k_features=args.k,
                           m_layers=args.m_layers, eps=args.eps).fit(texts, labels)
    clf.save(args.out)
    test_texts = [t for s in splits.values() for t in s.test_texts]
    test_labels = [y for s in splits.values() for y in s.test_labels]
    scores = clf.score(test_texts, test_labels)
    print(f"features {clf.features}; held-out precision {scores.precision:.3f} recall {scores.recall:.3f} "
          f"F1 {scores.f1:.3f}; saved {args.out}")


def cmd_classify_eval(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.reports import write_report
    from qscope_plugin.recipes.toxicity import evaluate, load_splits

    splits = load_splits(args.data, args.languages.split(",") if args.languages else None,
                         text_column=args.text_column, label_column=args.label_column,
                         n_discovery=args.n_discovery, n_test=args.n_test, split_seed=args.split_seed)
    model, tok = _backbone(args)
    report = evaluate(model, tok, _saes(args.release, args.layers), splits, eps=args.eps, m_layers=args.m_layers,
                      progress=True)
    write_report(report, args.out)
    print(f"macro best-over-layers F1 {report.macro_best_f1:.3f}; report in {args.out}/report.md")


def cmd_classify_predict(args: argparse.Namespace) -> None:
    from qscope_plugin.models import default_model, default_release
    from qscope_plugin.recipes.classifiers import ORRuleClassifier

    texts = _texts(args.text, args.file, "input")
    try:
        saved = json.loads(Path(args.classifier).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read classifier {args.classifier!r} ({e}); pass a JSON written by "
                         "`qscope classify fit`") from None
    # the saved backbone and SAEs unless overridden: predicting with other SAEs would be silently wrong
    args.release = args.release or saved.get("release") or default_release()
    args.model = args.model or saved.get("model_id") or default_model()
    model, tok = _backbone(args)
    layers = ",".join(map(str, saved.get("features", {})))
    clf = ORRuleClassifier.load(args.classifier, model, tok, _saes(args.release, layers or "all"))
    for text, label in zip(texts, clf.predict(texts), strict=True):
        print(f"{int(label)}\t{text}")


def _chat(args: argparse.Namespace, model, tok):
    from qscope_plugin.recipes.chat import ChatModel

    if args.chat_model:
        from qscope_plugin.models import load_model

        model, tok = load_model(args.chat_model, device=args.device)
    categories = _names(getattr(args, "categories", ""))
    templates = {"templates": Path(args.templates)} if args.templates else {}
    if args.templates and not Path(args.templates).is_dir():
        raise UsageError(f"--templates {args.templates!r} is not a folder; copy recipes/templates/ and edit it")
    return ChatModel(model, tok, max_new_tokens=args.max_new_tokens, enable_thinking=args.thinking,
                     chat_template=False if args.no_chat_template else None,
                     **({"categories": categories} if categories else {}), **templates)


def _names(spec: str) -> list[str]:
    """A comma-separated option as a list of non-empty names."""
    return [name.strip() for name in spec.split(",") if name.strip()]


def _load_targets(path: str):
    from qscope_plugin.recipes.safety_synthesis import load_targets

    targets = load_targets(path)
    if not targets:
        raise UsageError(f"{path!r} holds no targets; rerun `qscope safety targets` with a lower --tau or more "
                         "--features")
    return targets


def cmd_safety_targets(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.safety_synthesis import build_targets, save_targets

    model, tok = _backbone(args)
    saes = _saes(args.release, args.layers)
    features = {layer: parse_layers(args.features, sae.cfg.d_sae, "--features") for layer, sae in saes.items()}
    chat = _chat(args, model, tok)
    targets = build_targets(model, tok, saes, features, _texts(None, args.corpus, "corpus"), chat.explainer(),
                            chat.judge(), tau=args.tau, categorize=chat.categorizer(), progress=True)
    save_targets(targets, args.out)
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.category] = counts.get(t.category, 0) + 1
    print(f"{len(targets)} target(s) with relevance >= {args.tau} written to {args.out}" +
          "".join(f"; {category}: {n}" for category, n in sorted(counts.items())))


def cmd_safety_coverage(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.safety_synthesis import coverage

    targets = _load_targets(args.targets)
    model, tok = _backbone(args)
    saes = _saes(args.release, ",".join(str(t.layer) for t in targets))
    cov = coverage(model, tok, saes, targets, _texts(None, args.prompts, "prompts"), weak_support=args.weak_support)
    payload = {"cov": cov.cov, "missing": [vars(targets[i]) for i in cov.missing],
               "weak": [vars(targets[i]) for i in cov.weak], "by_category": cov.by_category}

    def render() -> None:
        print(f"Cov(D) = {cov.cov:.3f} over {len(targets)} targets; {len(cov.missing)} uncovered (T_miss), "
              f"{len(cov.weak)} weakly covered (support < {args.weak_support})")
        for category, value in cov.by_category.items():
            print(f"  {category}: {value:.3f}")

    _emit(args, payload, render)


def cmd_safety_synthesize(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.safety_synthesis import (
        ATTACK_STYLES,
        compare_coverage,
        plot_coverage_curves,
        synthesize,
    )

    if args.curve and not args.pool:
        raise UsageError("--curve needs --pool: natural prompts to sample for the baseline (prompts already in "
                         "--seed-prompts add no coverage)")
    styles = ATTACK_STYLES if args.attack_styles is None else _names(args.attack_styles)
    if not styles:
        raise UsageError("--attack-styles is empty; give comma-separated styles, e.g. 'role-play,hypothetical'")
    targets = _load_targets(args.targets)
    model, tok = _backbone(args)
    saes = _saes(args.release, ",".join(str(t.layer) for t in targets))
    chat = _chat(args, model, tok)
    generators = chat.generators(seed=args.seed)
    seed_prompts = _texts(None, args.seed_prompts, "seed prompts") if args.seed_prompts else []
    provenance = {**chat.provenance(), "model": args.model, "release": args.release,
                  "chat_model": args.chat_model or args.model}
    kept = synthesize(model, tok, saes, targets, generators, seed_prompts=seed_prompts, budget=args.budget,
                      attack_styles=styles, n_adversarial=args.n_adversarial, weak_support=args.weak_support,
                      seed=args.seed, out=args.out, provenance=provenance,
                      benign_categories=_names(args.benign_categories), progress=True)
    print(f"{len(kept)} verified example(s) kept in {args.out} (earlier runs included); all attempts in the file")
    if args.curve:  # the feature-driven line reuses the verified rows of the file: no second synthesis
        budgets = sorted({max(1, args.budget * i // 4) for i in range(5)} | {0})
        curves = compare_coverage(model, tok, saes, targets, generators, seed_prompts=seed_prompts,
                                  pool=_texts(None, args.pool, "pool"), budgets=budgets, seed=args.seed, rows=kept)
        plot_coverage_curves(curves, budgets, args.curve)
        print(f"coverage vs budget written to {args.curve}: " +
              "; ".join(f"{name} {values[-1]:.3f}" for name, values in curves.items()))


def _init_distributed(args: argparse.Namespace) -> bool:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); one GPU per local rank."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available() and args.device in (None, "cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dist.init_process_group("nccl", device_id=torch.device(args.device))
    else:
        dist.init_process_group("gloo")
    return True


def cmd_footprints(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from qscope_plugin.recipes.data import load_table
    from qscope_plugin.recipes.footprints import harvest_footprints

    started = _init_distributed(args)
    try:
        data = load_table(args.data, config=args.config, split=args.split, revision=args.revision)
        if args.limit:
            data = data.select(range(min(args.limit, len(data))))
        if args.column is None and args.template is None:
            raise UsageError(f"pass --column (one of {data.column_names}) or --template, e.g. 'Q: {{question}}\\nA:'")
        template = args.template.replace("\\n", "\n").replace("\\t", "\t") if args.template else None
        model, tok = _backbone(args)
        fp = harvest_footprints(model, tok, data, _saes(args.release, args.layers), column=args.column,
                                template=template, name=args.name or Path(args.data).stem.split(".")[0],
                                batch_size=args.batch_size, max_length=args.max_length, chunk_size=args.chunk_size,
                                out=args.out)
        if not dist.is_initialized() or dist.get_rank() == 0:
            for layer, lf in fp.layers.items():
                print(f"{fp.name} layer {layer}: {len(lf)} samples, |F(D)| = {len(lf.features())}, "
                      f"{len(lf.indices) / len(lf):.1f} active features per sample")
            print(f"footprints written to {args.out}")
    finally:
        if started:
            dist.destroy_process_group()


def _named_csv(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"bad --correctness {spec!r}: expected BENCHMARK=path.csv")
    return name, path


def _read_csv(path: str):
    import pandas as pd

    try:
        return pd.read_csv(path, index_col=0)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read CSV {path!r} ({e}); expected models as rows, the first column their "
                         "names") from None


def cmd_redundancy(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.footprints import Footprints
    from qscope_plugin.recipes.redundancy import redundancy_report
    from qscope_plugin.recipes.reports import write_report

    files = [Footprints.load(path) for path in args.footprints]
    names = [fp.name for fp in files]
    if len(set(names)) < len(names):
        raise UsageError(f"benchmark names repeat ({names}); give each harvest its own --name")
    common = sorted(set.intersection(*(set(fp.layers) for fp in files)))
    if args.layer is None and len(common) != 1:
        raise UsageError(f"the footprint files share layers {common}; choose one with --layer")
    layer = common[0] if args.layer is None else args.layer
    correctness = {}
    for spec in args.correctness or []:
        name, path = _named_csv(spec)
        if name not in names:
            raise UsageError(f"--correctness names {name!r}, which is not among the benchmarks {names}")
        correctness[name] = _read_csv(path).to_numpy(dtype=float)
    report = redundancy_report({fp.name: fp[layer] for fp in files}, correctness=correctness,
                               scores=_read_csv(args.scores) if args.scores else None, reference=args.reference,
                               n_draws=args.n_draws, seed=args.seed, variant=args.kendall,
                               drop_threshold=args.drop_threshold, distinct_threshold=args.distinct_threshold)
    write_report(report, args.out)

    def render() -> None:
        print(f"layer {layer}: {'benchmark':20} {'N':>7} {'|F(D)|':>7} {'R_hat':>9} {'n(90%)':>7} {'R':>6}")
        for name, row in report.benchmarks.items():
            perf = row.performance_redundancy
            print(f"{'':9}{name:20} {row.n_samples:7} {row.footprint_size:7} {row.feature_redundancy:9.4g} "
                  f"{row.samples_for_90pct_coverage:7} {'' if perf is None else f'{perf:6.3f}'}")
        for d in report.summary.drop_candidates:
            print(f"drop candidate: {d.benchmark} ({d.overlap:.0%} of its footprint is in {d.covered_by})")
        for d in report.summary.distinct:
            print(f"distinct, keep: {d.benchmark} (at most {d.max_overlap:.0%} covered by any other)")
        print(f"report in {args.out}/report.md")

    _emit(args, report.to_json(), render)


def _add_model_options(p: argparse.ArgumentParser, layers: bool = True) -> None:
    from qscope_plugin.models import default_model, default_release

    p.add_argument("--model", default=default_model(), help="HF model folder or cached hub id (default: demo model)")
    p.add_argument("--release", default=default_release(), help="release name or SAE folder (default: demo SAEs)")
    if layers:
        p.add_argument("--layers", default="all", help="e.g. 14, 10-14 or all (default)")
    p.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    class OneLineParser(argparse.ArgumentParser):
        """Bad arguments: one line on stderr (``qscope CMD: error: ...`` and where to look), exit status 2."""

        def error(self, message: str):  # subparsers inherit this class
            hint = f"see `{self.prog} --help`"
            self.exit(2, f"{self.prog}: error: {' '.join(message.split())} ({hint})\n")

    parser = OneLineParser(prog="qscope", description="Qwen-Scope SAEs: catalogue, download, recipes")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("releases", help="list the Qwen-Scope releases").set_defaults(func=cmd_releases)
    info = sub.add_parser("info", help="dims, layers, bytes per layer and cached layers of a release")
    info.add_argument("release")
    info.set_defaults(func=cmd_info)
    fetch = sub.add_parser("fetch", help="download and validate layers of a release into the HF cache")
    fetch.add_argument("release")
    fetch.add_argument("--layers", default="all", help="e.g. 14, 10-14, 3,5,7-9 or all (default)")
    fetch.add_argument("--revision", default=None, help="hub revision to pin")
    fetch.set_defaults(func=cmd_fetch)

    demo = sub.add_parser("demo", help="run every recipe on the small demo model shipped in the package")
    demo.add_argument("--out", default="qscope-demo-report", help="report folder (default qscope-demo-report)")
    demo.set_defaults(func=cmd_demo)

    analyze = sub.add_parser("analyze", help="top SAE features of every token of a text, per layer")
    analyze.add_argument("text")
    analyze.add_argument("--top", type=int, default=5, help="features per token (default 5)")
    _add_model_options(analyze)
    analyze.set_defaults(func=cmd_analyze)

    compare = sub.add_parser("compare", help="features that fire more on positive than negative texts")
    for side in ("positive", "negative"):
        compare.add_argument(f"--{side}", action="append", help=f"a {side} text (repeatable)")
        compare.add_argument(f"--{side}-file", help=f"file with one {side} text per line")
    compare.add_argument("--method", choices=["mean", "rate"], default="mean",
                         help="mean activation difference (report R1) or firing-rate difference (official app)")
    compare.add_argument("--pool", choices=["mean", "max"], default="mean", help="token pooling for --method mean")
    compare.add_argument("--rank-by", choices=["signed", "abs"], default="signed")
    compare.add_argument("--top-k", type=int, default=5, help="features per layer (default 5)")
    compare.add_argument("--keep-first-token", action="store_true", help="do not drop position 0 (outliers)")
    _add_model_options(compare)
    compare.set_defaults(func=cmd_compare)

    steer = sub.add_parser("steer", help="greedy completion with h' = h + alpha * d next to the unsteered one")
    steer.add_argument("prompt")
    steer.add_argument("--layer", type=int, required=True)
    steer.add_argument("--feature", type=int, required=True)
    steer.add_argument("--alpha", type=float, action="append", required=True, help="strength (repeat to sweep)")
    steer.add_argument("--direction-norm", choices=["raw", "unit"], default="raw")
    steer.add_argument("--positions", default="all", help="all, prompt, generated or indices like 0,3-5")
    steer.add_argument("--max-new-tokens", type=int, default=32)
    steer.add_argument("--chat", choices=["thinking", "no_thinking"], default=None, help="wrap in Qwen's template")
    _add_model_options(steer, layers=False)
    steer.set_defaults(func=cmd_steer)

    classify = sub.add_parser("classify", help="SAE-feature OR-rule classifiers (report §5)")
    verbs = classify.add_subparsers(dest="verb", required=True)
    for verb, func, help_text in (("fit", cmd_classify_fit, "discover features and save a classifier JSON"),
                                  ("eval", cmd_classify_eval, "full evaluation report (layers, K, transfer)")):
        p = verbs.add_parser(verb, help=help_text)
        p.add_argument("--data", required=True, help="hub id, folder of per-language files, or one file")
        p.add_argument("--languages", default=None, help="comma-separated, e.g. en,ru (default: all)")
        p.add_argument("--text-column", default="text")
        p.add_argument("--label-column", default="toxic")
        p.add_argument("--n-discovery", type=int, default=4000)
        p.add_argument("--n-test", type=int, default=1000)
        p.add_argument("--split-seed", type=int, default=0)
        p.add_argument("--eps", type=float, default=0.0, help="firing threshold ε (default 0)")
        p.add_argument("--m-layers", type=int, default=1 if verb == "fit" else 3)
        if verb == "fit":
            p.add_argument("--k", type=int, default=5, help="features of the selected layer (default 5)")
        p.add_argument("--out", required=True, help="classifier JSON (fit) or report folder (eval)")
        _add_model_options(p)
        p.set_defaults(func=func)
    predict = verbs.add_parser("predict", help="apply a saved classifier to texts")
    predict.add_argument("classifier")
    predict.add_argument("--text", action="append", help="a text (repeatable)")
    predict.add_argument("--file", help="file with one text per line")
    _add_model_options(predict, layers=False)
    predict.set_defaults(func=cmd_classify_predict, model=None, release=None)

    footprints = sub.add_parser("footprints", help="active SAE features at each sample's last prompt token "
                                "(report §4); resumable, runs under torchrun")
    footprints.add_argument("data", help="local json/jsonl/csv/parquet file or a cached hub dataset id")
    footprints.add_argument("--config", default=None, help="dataset configuration (hub datasets)")
    footprints.add_argument("--split", default=None, help="dataset split, e.g. test (needed if it has several)")
    footprints.add_argument("--revision", default=None, help="dataset revision to pin")
    footprints.add_argument("--column", default=None, help="column holding the prompt text")
    footprints.add_argument("--template", default=None, help="prompt built from columns, e.g. 'Q: {question}\\nA:'")
    footprints.add_argument("--name", default=None, help="benchmark name in reports (default: the file name)")
    footprints.add_argument("--limit", type=int, default=None, help="only the first N samples")
    footprints.add_argument("--batch-size", type=int, default=16)
    footprints.add_argument("--max-length", type=int, default=2048, help="keep the last N tokens of longer prompts")
    footprints.add_argument("--chunk-size", type=int, default=1024, help="samples per checkpoint (default 1024)")
    footprints.add_argument("--out", required=True, help="footprint file (.safetensors); resumes if interrupted")
    _add_model_options(footprints)
    footprints.set_defaults(func=cmd_footprints)

    redundancy = sub.add_parser("redundancy", help="coverage, R_hat, R, overlaps and correlations of benchmarks "
                                "from their footprints (report §4)")
    redundancy.add_argument("footprints", nargs="+", help="footprint files written by `qscope footprints`")
    redundancy.add_argument("--layer", type=int, default=None, help="layer to compare (needed if files hold several)")
    redundancy.add_argument("--correctness", action="append", metavar="NAME=CSV",
                            help="per-sample scores of a benchmark: models as rows, samples as columns (repeatable)")
    redundancy.add_argument("--scores", default=None, help="CSV of accuracies: models as rows, benchmarks as columns "
                            "(default: means of --correctness)")
    redundancy.add_argument("--reference", default="MMLU", help="benchmark to control for in partial correlations")
    redundancy.add_argument("--n-draws", type=int, default=200, help="Monte-Carlo subsets per n for tau_n")
    redundancy.add_argument("--seed", type=int, default=0)
    redundancy.add_argument("--kendall", choices=["a", "b"], default="b", help="Kendall tau variant (default b)")
    redundancy.add_argument("--drop-threshold", type=float, default=0.6)
    redundancy.add_argument("--distinct-threshold", type=float, default=0.2)
    redundancy.add_argument("--out", required=True, help="report folder")
    redundancy.add_argument("--json", action="store_true", help="print the report JSON instead of a table")
    redundancy.set_defaults(func=cmd_redundancy)

    safety = sub.add_parser("safety", help="feature-driven safety data synthesis (report §6)")
    verbs = safety.add_subparsers(dest="verb", required=True)
    targets = verbs.add_parser("targets", help="explain and score candidate features; keep s >= tau")
    targets.add_argument("--features", required=True, help="feature ids per layer, e.g. 0-99 or 5,17,301")
    targets.add_argument("--corpus", required=True, help="file of texts (one per line) to find top contexts in")
    targets.add_argument("--tau", type=float, default=0.5, help="relevance threshold τ (default 0.5)")
    targets.add_argument("--categories", default="", help="comma-separated risk categories the chat model picks "
                                                          "from (default: RISK_CATEGORIES, 'benign' included)")
    targets.add_argument("--out", required=True, help="targets JSONL")
    coverage = verbs.add_parser("coverage", help="Cov(D), T_miss and weak targets of a prompt set")
    coverage.add_argument("targets", help="targets JSONL")
    coverage.add_argument("--prompts", required=True, help="file of prompts, one per line")
    synth = verbs.add_parser("synthesize", help="generate, verify through the SAE and save examples")
    synth.add_argument("targets", help="targets JSONL")
    synth.add_argument("--seed-prompts", help="file of existing prompts (their coverage decides the order)")
    synth.add_argument("--budget", type=int, default=100,
                       help="total prompts generated into --out, earlier runs on the same file included (default 100)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--attack-styles", default=None, help="comma-separated adversarial rewrite styles "
                       "(default: the recipe's ATTACK_STYLES: role-play, hypothetical framing, ...)")
    synth.add_argument("--n-adversarial", type=int, default=2, help="rewrites per target (default 2)")
    synth.add_argument("--out", required=True, help="JSONL of every attempt; resumes if it exists")
    synth.add_argument("--curve", help="also write a coverage-vs-budget PNG against the two baselines (needs --pool)")
    synth.add_argument("--pool", help="pool of natural prompts for the sampling baseline")
    synth.add_argument("--benign-categories", default="benign",
                       help="comma-separated target categories answered helpfully (default: benign); "
                            "every other category gets a refusal")
    for p in (coverage, synth):
        p.add_argument("--weak-support", type=int, default=3,
                       help="a covered target with fewer firing prompts is weakly covered (default 3)")
    for p, func in ((targets, cmd_safety_targets), (coverage, cmd_safety_coverage), (synth, cmd_safety_synthesize)):
        p.add_argument("--chat-model", default=None, help="local chat model for explainer/judge/generators "
                                                          "(default: the backbone)")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--thinking", action="store_true", help="render the chat template with enable_thinking "
                                                               "(Qwen3); <think> blocks are stripped from answers")
        p.add_argument("--no-chat-template", action="store_true", help="give the chat model raw text")
        p.add_argument("--templates", default=None, help="folder of prompt templates to use instead of the "
                                                         "installed recipes/templates/ (copy it and edit)")
        _add_model_options(p, layers=p is targets)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (QScopeError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"qscope {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
