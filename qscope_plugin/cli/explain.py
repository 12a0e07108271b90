"""``qscope explain``: every chosen feature described in one sentence by an LLM and scored (detection, fuzzing).

    qscope explain --layers 3 --top 20 --data texts.jsonl --llm http://127.0.0.1:8000/v1     # a served model
    qscope explain --layers 0-3 --features 12,40 --data texts.jsonl --llm ./Qwen3-8B --out e.jsonl   # a local one
    qscope explain --layers 3 --top 2 --data texts.jsonl --llm backbone --window 3 --n-train 4   # the --model itself

One JSON-lines file per release (``recipes.explain.write_explanations``), rewritten after each layer; every answer
is cached as it arrives (``--cache``), so a killed run resumes where it stopped and a re-run asks nothing.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from qscope_plugin.cli._options import (
    UsageError,
    add_batch_options,
    add_data_options,
    add_first_token_options,
    add_model_options,
    data_texts,
    emit,
    load_backbone,
    load_saes,
    parse_layers,
)

MAX_FEATURES = 5000
"""Features explained per layer and run: each costs tens of LLM calls."""


def _bounded(least: int, most: int):
    def parse(text: str) -> int:
        if not re.fullmatch(r"\d+", text.strip()) or not least <= int(text) <= most:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer in {least}..{most}")
        return int(text)

    return parse


def _client(spec: str, model_name: str | None, args: argparse.Namespace, backbone):
    """The ``--llm`` / ``--scorer-llm`` client; the backbone itself for ``backbone`` or the ``--model`` value."""
    from qscope_plugin.llm import LocalChat, open_llm

    if spec in ("backbone", args.model):
        model, tok = backbone
        return LocalChat(model, tok, max_new_tokens=args.max_new_tokens, name=model_name or Path(args.model).name)
    return open_llm(spec, model=model_name, device=args.device, concurrency=args.concurrency,
                    max_new_tokens=args.max_new_tokens, timeout=args.timeout, max_retries=args.retries)


def _estimate(llm, prompts: int) -> str:
    """Calls and a time lower bound: one short uncached probe, times the calls over the concurrency."""
    start = time.perf_counter()
    llm._complete("Reply with OK.", None)
    probe = time.perf_counter() - start
    seconds = probe * prompts / max(llm.concurrency, 1)
    return (f"at most {prompts} LLM calls to {llm.name} ({llm.concurrency} at a time); a short probe took "
            f"{probe:.2f} s, so at least {seconds / 60:.1f} min ({seconds:.0f} s) if nothing is cached")


def cmd_explain(args: argparse.Namespace) -> None:
    from qscope_plugin.llm import ResponseCache
    from qscope_plugin.recipes.explain import (
        ExplainError,
        Sampling,
        densest_features,
        explain_features,
        prompt_count,
        write_explanations,
    )
    from qscope_plugin.recipes.inspection import harvest_corpus

    try:
        sampling = Sampling(train=args.train, n_train=args.n_train, n_test=args.n_test,
                            n_non_activating=args.n_non_activating, window=args.window, batch=args.batch,
                            n_promoted=args.n_promoted, seed=args.seed)
    except ExplainError as e:
        raise UsageError(str(e)) from None
    saes = load_saes(args.release, args.layers, args.sae_device)
    features = {layer: None if args.features is None else
                parse_layers(args.features, sae.cfg.d_sae, "--features", f"the layer-{layer} SAE")
                for layer, sae in saes.items()}
    for layer, chosen in features.items():
        if chosen is not None and len(chosen) > MAX_FEATURES:
            raise UsageError(f"--features {args.features!r} asks for {len(chosen)} features of layer {layer}; at "
                             f"most {MAX_FEATURES} per run; pass fewer ids or --top N")
    top = args.top if args.top is not None or args.features is not None else 20
    out = Path(args.out or f"{Path(args.release).name}.explanations.jsonl")
    texts = data_texts(args)
    backbone = load_backbone(args)
    cache = ResponseCache(args.cache or out.with_name(out.name + ".cache"))
    llm = _client(args.llm, args.llm_model, args, backbone).use_cache(cache)
    scorer = (_client(args.scorer_llm, args.scorer_model, args, backbone).use_cache(cache)
              if args.scorer_llm else llm)
    n_features = sum(len(f) if f is not None else top for f in features.values())
    estimate = _estimate(llm, prompt_count(n_features, sampling, not args.no_score))
    print(f"{n_features} feature(s) over {len(saes)} layer(s): {estimate}; {len(cache)} answer(s) already cached in "
          f"{cache.path}", flush=True)

    model, tok = backbone
    rows = []
    for layer, sae in saes.items():
        corpus = harvest_corpus(model, tok, texts, sae, layer=layer, exclude_first_token=args.exclude_first_token,
                                batch_size=args.batch_size, max_length=args.max_length)
        chosen = features[layer] if features[layer] is not None else densest_features(corpus, top)
        rows += explain_features(llm, corpus, tok, chosen, model=model, sae=sae, scorer=scorer, sampling=sampling,
                                 release=args.release, score=not args.no_score)
        write_explanations(out, rows)  # after each layer: a kill loses at most the layer in progress
    fresh = llm.calls + (scorer.calls if scorer is not llm else 0)

    def render() -> None:
        for r in rows:
            scores = "  ".join(f"{kind} {s.value:.2f} [{s.low:.2f}, {s.high:.2f}]" for kind, s in
                               (("detection", r.detection), ("fuzzing", r.fuzzing)) if s is not None)
            print(f"layer {r.layer:<3} feature {r.feature:<6} {scores}  {r.explanation}")
        print(f"{len(rows)} explanation(s) written to {out} ({fresh} LLM call(s), {cache.hits} cached answer(s))")

    emit(args, {"out": str(out), "rows": [r.to_json() for r in rows], "calls": fresh, "cache_hits": cache.hits},
         render)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="describe features in one sentence with an LLM and score the descriptions "
                       "(detection, fuzzing)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--features", default=None, help="feature ids, e.g. 12,40-45 (every layer)")
    which.add_argument("--top", type=_bounded(1, MAX_FEATURES), default=None, help="the N features of highest "
                       "firing density per layer (default 20)")
    add_data_options(p)
    add_first_token_options(p, default=True)
    p.add_argument("--llm", required=True, help="the explainer: an OpenAI-compatible URL "
                   "(http://host:port/v1: vLLM, SGLang, llama.cpp, ollama, `transformers serve`), a local model "
                   "folder / cached hub id, or `backbone` (the --model itself)")
    p.add_argument("--llm-model", default=None, help="model name at the URL (default: the first it lists)")
    p.add_argument("--scorer-llm", default=None, help="the scorer, as --llm (default: the explainer)")
    p.add_argument("--scorer-model", default=None, help="model name at the --scorer-llm URL")
    p.add_argument("--no-score", action="store_true", help="explain only")
    p.add_argument("--concurrency", type=_bounded(1, 256), default=4, help="requests in flight to a URL (default 4)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request before a retry (default 120)")
    p.add_argument("--retries", type=_bounded(0, 20), default=4, help="retries on 429/5xx/timeouts, with "
                   "exponential backoff (default 4)")
    p.add_argument("--max-new-tokens", type=_bounded(1, 4096), default=128, help="answer length (default 128)")
    p.add_argument("--cache", default=None, help="answer cache, JSON lines (default: OUT.cache)")
    p.add_argument("--out", default=None, help="explanations file (default: RELEASE.explanations.jsonl)")
    sampling = p.add_argument_group("context sampling (defaults: delphi's)")
    sampling.add_argument("--train", choices=("quantiles", "top", "random"), default="quantiles",
                          help="how the explainer's contexts are drawn (default quantiles)")
    sampling.add_argument("--n-train", type=int, default=40, help="contexts shown to the explainer (default 40)")
    sampling.add_argument("--n-test", type=int, default=50, help="held-out activating contexts scored (default 50)")
    sampling.add_argument("--n-non-activating", type=int, default=50, help="silent contexts for detection "
                          "(default 50)")
    sampling.add_argument("--window", type=int, default=16, help="tokens each side of a context's peak (default 16)")
    sampling.add_argument("--batch", type=int, default=10, help="contexts per scoring prompt (default 10)")
    sampling.add_argument("--n-promoted", type=int, default=10, help="promoted tokens shown (default 10; 0: none)")
    sampling.add_argument("--seed", type=int, default=22)
    add_batch_options(p, default=16)
    p.add_argument("--max-length", type=int, default=512, help="tokens read per text (default 512)")
    add_model_options(p)
    p.set_defaults(func=cmd_explain)
