"""``qscope safety targets / coverage / synthesize``: feature-driven safety data synthesis (report §6)."""

from __future__ import annotations

import argparse
import re

from qscope_plugin.cli._options import (
    MAX_ITEMS,
    MAX_SEED,
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
    parse_layers,
    read_texts,
)
from qscope_plugin.indices import MAX_NEW_TOKENS


def _chat(args: argparse.Namespace, model, tok):
    """The chat model every generator, explainer and judge runs on: ``--chat-model``, else the backbone."""
    from qscope_plugin.recipes.chat import ChatModel
    from qscope_plugin.recipes.safety_synthesis import TEMPLATES

    categories = {"categories": found} if (found := names(getattr(args, "categories", ""))) else {}
    if args.chat_model and re.match(r"https?://", args.chat_model):  # an OpenAI-compatible endpoint
        from qscope_plugin.llm import OpenAIChat

        llm = OpenAIChat(args.chat_model, max_tokens=args.max_new_tokens, enable_thinking=args.thinking)
        return ChatModel(llm=llm, templates=args.templates or TEMPLATES, **categories)
    if args.chat_model:
        from qscope_plugin.models import load_model

        model, tok = load_model(args.chat_model, device=args.device)
    return ChatModel(model, tok, max_new_tokens=args.max_new_tokens, enable_thinking=args.thinking,
                     chat_template=False if args.no_chat_template else None, templates=args.templates or TEMPLATES,
                     **categories)


def _target_saes(args: argparse.Namespace, targets) -> dict:
    return load_saes(args.release, ",".join(str(t.layer) for t in targets), args.sae_device)


def cmd_safety_targets(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.discovery import top_contexts
    from qscope_plugin.recipes.safety_synthesis import build_targets, save_targets

    saes = load_saes(args.release, args.layers, args.sae_device)  # a bad --layers fails before the model loads
    features = {layer: parse_layers(args.features, sae.cfg.d_sae, "--features", f"the layer-{layer} SAE")
                for layer, sae in saes.items()}
    corpus = read_texts(None, args.corpus, "corpus")
    with distributed_run(args) as rank:
        model, tok = load_backbone(args)
        contexts = top_contexts(model, tok, corpus, saes, features, n_top=args.n_top, progress=True)
    if rank:
        return  # the ranks shared the harvest; rank 0 explains and writes the targets
    chat = _chat(args, model, tok)
    explained = None
    if args.explanations:  # a `qscope explain` file: its features are judged, not explained again
        from qscope_plugin.recipes.explain import read_explanations

        explained = {(r.layer, r.feature): r.explanation for r in read_explanations(args.explanations)}
    targets = build_targets(model, tok, saes, features, corpus, chat.explainer(), chat.judge(), tau=args.tau,
                            n_top=args.n_top, categorize=chat.categorizer(), contexts=contexts,
                            explanations=explained)
    save_targets(targets, args.out)
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.category] = counts.get(t.category, 0) + 1
    print(f"{len(targets)} target(s) with relevance >= {args.tau} written to {args.out}" +
          "".join(f"; {category}: {n}" for category, n in sorted(counts.items())))


def cmd_safety_coverage(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.safety_synthesis import coverage, load_targets

    targets = load_targets(args.targets)
    saes = _target_saes(args, targets)
    model, tok = load_backbone(args)
    cov = coverage(model, tok, saes, targets, read_texts(None, args.prompts, "prompts"),
                   weak_support=args.weak_support)
    payload = {"cov": cov.cov, "missing": [vars(targets[i]) for i in cov.missing],
               "weak": [vars(targets[i]) for i in cov.weak], "by_category": cov.by_category}

    def render() -> None:
        print(f"Cov(D) = {cov.cov:.3f} over {len(targets)} targets; {len(cov.missing)} uncovered (T_miss), "
              f"{len(cov.weak)} weakly covered (support < {args.weak_support})")
        for category, value in cov.by_category.items():
            print(f"  {category}: {value:.3f}")

    emit(args, payload, render)


def cmd_safety_synthesize(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.safety_synthesis import (
        ATTACK_STYLES,
        compare_coverage,
        curve_budgets,
        load_targets,
        plot_coverage_curves,
        synthesize,
    )

    if args.curve and not args.pool:
        raise UsageError("--curve needs --pool: natural prompts to sample for the baseline (prompts already in "
                         "--seed-prompts add no coverage)")
    styles = ATTACK_STYLES if args.attack_styles is None else names(args.attack_styles)
    if not styles:
        raise UsageError("--attack-styles is empty; give comma-separated styles, e.g. 'role-play,hypothetical'")
    targets = load_targets(args.targets)
    saes = _target_saes(args, targets)
    model, tok = load_backbone(args)
    chat = _chat(args, model, tok)
    generators = chat.generators(seed=args.seed)
    seed_prompts = read_texts(None, args.seed_prompts, "seed prompts")
    provenance = {**chat.provenance(), "model": args.model, "release": args.release,
                  "chat_model": args.chat_model or args.model}
    kept = synthesize(model, tok, saes, targets, generators, seed_prompts=seed_prompts, budget=args.budget,
                      attack_styles=styles, n_adversarial=args.n_adversarial, weak_support=args.weak_support,
                      seed=args.seed, out=args.out, provenance=provenance,
                      benign_categories=names(args.benign_categories), progress=True)
    print(f"{len(kept)} verified example(s) kept in {args.out} (earlier runs included); all attempts in the file")
    if args.curve:  # the feature-driven line reuses the verified rows of the file: no second synthesis
        budgets = curve_budgets(args.budget)
        curves = compare_coverage(model, tok, saes, targets, generators, seed_prompts=seed_prompts,
                                  pool=read_texts(None, args.pool, "pool"), budgets=budgets, seed=args.seed, rows=kept)
        plot_coverage_curves(curves, budgets, args.curve)
        print(f"coverage vs budget written to {args.curve}: " +
              "; ".join(f"{name} {values[-1]:.3f}" for name, values in curves.items()))


def add_parser(sub: argparse._SubParsersAction) -> None:
    safety = sub.add_parser("safety", help="feature-driven safety data synthesis (report §6)")
    verbs = safety.add_subparsers(dest="verb", required=True)
    targets = verbs.add_parser("targets", help="explain and score candidate features; keep s >= tau")
    targets.add_argument("--features", required=True, help="feature ids per layer, e.g. 0-99 or 5,17,301")
    targets.add_argument("--corpus", required=True, help="file of texts (one per line) to find top contexts in")
    targets.add_argument("--tau", type=finite, default=0.5, help="relevance threshold τ (default 0.5)")
    targets.add_argument("--categories", default="", help="comma-separated risk categories the chat model picks "
                                                          "from (default: RISK_CATEGORIES, 'benign' included)")
    targets.add_argument("--out", required=True, help="targets JSONL")
    targets.add_argument("--n-top", type=int, default=10, help="top contexts per feature shown to the explainer")
    targets.add_argument("--explanations", default=None, help="a `qscope explain` file: its features' explanations "
                         "are used instead of asking the chat model again")
    add_distributed_options(targets)
    coverage = verbs.add_parser("coverage", help="Cov(D), T_miss and weak targets of a prompt set")
    coverage.add_argument("targets", help="targets JSONL")
    coverage.add_argument("--prompts", required=True, help="file of prompts, one per line")
    synth = verbs.add_parser("synthesize", help="generate, verify through the SAE and save examples")
    synth.add_argument("targets", help="targets JSONL")
    synth.add_argument("--seed-prompts", help="file of existing prompts (their coverage decides the order)")
    synth.add_argument("--budget", type=count(0, MAX_ITEMS), default=100,
                       help="total prompts generated into --out, earlier runs on the same file included (default 100)")
    synth.add_argument("--seed", type=count(0, MAX_SEED), default=0)
    synth.add_argument("--attack-styles", default=None, help="comma-separated adversarial rewrite styles "
                       "(default: the recipe's ATTACK_STYLES: role-play, hypothetical framing, ...)")
    synth.add_argument("--n-adversarial", type=count(0, 1000), default=2, help="rewrites per target (default 2)")
    synth.add_argument("--out", required=True, help="JSONL of every attempt; resumes if it exists")
    synth.add_argument("--curve", help="also write a coverage-vs-budget PNG against the two baselines (needs --pool)")
    synth.add_argument("--pool", help="pool of natural prompts for the sampling baseline")
    synth.add_argument("--benign-categories", default="benign",
                       help="comma-separated target categories answered helpfully (default: benign); "
                            "every other category gets a refusal")
    for p in (coverage, synth):
        p.add_argument("--weak-support", type=count(0, MAX_ITEMS), default=3,
                       help="a covered target with fewer firing prompts is weakly covered (default 3)")
    for p, func in ((targets, cmd_safety_targets), (coverage, cmd_safety_coverage), (synth, cmd_safety_synthesize)):
        p.add_argument("--chat-model", default=None, help="chat model for explainer/judge/generators: a local "
                       "model folder / hub id, or an OpenAI-compatible URL http://host:port/v1 (default: the backbone)")
        p.add_argument("--max-new-tokens", type=count(0, MAX_NEW_TOKENS), default=64)
        p.add_argument("--thinking", action="store_true", help="render the chat template with enable_thinking "
                                                               "(Qwen3); <think> blocks are stripped from answers")
        p.add_argument("--no-chat-template", action="store_true", help="give the chat model raw text")
        p.add_argument("--templates", default=None, help="folder of prompt templates to use instead of the "
                                                         "installed recipes/templates/ (copy it and edit)")
        add_model_options(p, layers=p is targets)
        p.set_defaults(func=func)
