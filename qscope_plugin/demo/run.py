"""``qscope demo``: every landed recipe, end to end, on the small trained demo model and its Qwen-Scope-format SAEs.

    >>> from qscope_plugin.demo.run import run_demo
    >>> summary = run_demo("qscope-demo-report")        # writes report.md, summary.json and PNGs there

Steps: (1) per-token features of a mixed Chinese/English sentence; (2) contrastive discovery of the Chinese
feature at every layer, checked on held-out sentences; (3) steering with that feature (suppress / amplify), with a
random direction of the same norm as control and a Han / Latin / other character breakdown of the output;
(4) an OR-rule classifier (report §5) telling Chinese from English lines, fitted on the even and scored on the odd
lines; (5) benchmark redundancy (report §4) of a toy suite of sentence sets through their footprints.
Suppression means *adding* the direction with α < 0: zeroing one feature does little, because the signal is spread
over many features.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qscope_plugin.backends import Backend, as_backend
from qscope_plugin.models import DEMO_MODEL_DIR, load_model
from qscope_plugin.recipes._harvest import harvest, pad, tokenize
from qscope_plugin.recipes.discovery import ContrastOptions, analyze, contrast_codes
from qscope_plugin.recipes.steering import SteeringSpec, steer
from qscope_plugin.store import DEMO_RELEASE, load_sae, local_layers
from qscope_plugin.tokens import token_texts

DEMO_ASSETS = DEMO_MODEL_DIR.parent
PROMPTS = json.loads((Path(__file__).parent / "prompts.json").read_text(encoding="utf-8"))
SENTENCES = json.loads((Path(__file__).parent / "eval_sentences.json").read_text(encoding="utf-8"))
"""Hand-written zh / en lines and mixed prompts, shared with the claims test (tests/test_demo_claims.py)."""
CONDITIONS = ("baseline", "suppress", "amplify", "random_minus", "random_plus")
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN = re.compile(r"[A-Za-z]")


def char_breakdown(texts: list[str]) -> dict[str, float]:
    """Shares of Han, Latin and other non-space characters over all ``texts``."""
    chars = [c for t in texts for c in t if not c.isspace()]
    n = max(len(chars), 1)
    han = sum(bool(HAN.match(c)) for c in chars)
    latin = sum(bool(LATIN.match(c)) for c in chars)
    return {"han": han / n, "latin": latin / n, "other": (n - han - latin) / n}


@dataclass
class LayerResult:
    layer: int
    feature: int
    fvu: float
    """SAE fraction of variance unexplained on the demo sentences (position 0 excluded)."""
    balanced_accuracy: float
    alpha: float
    han_share: dict[str, float]
    """Han share of the continuations per condition: baseline, suppress, amplify, random_minus, random_plus."""


def _greedy_batch(backend: Backend, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    ids, mask, _ = pad(tokenize(tok, prompts, max_length=None), tok.pad_token_id, "left")
    new = backend.generate(ids, mask, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(new, skip_special_tokens=True)


def _firing_share(codes, layer: int, feature: int) -> torch.Tensor:
    """Per text: the share of its tokens (position 0 excluded) on which ``feature`` fires."""
    return torch.tensor([float(((c.indices[layer][1:] == feature) & (c.values[layer][1:] > 0)).any(-1)
                               .float().mean()) for c in codes])


def _balanced_accuracy(zh: torch.Tensor, en: torch.Tensor, threshold: float) -> float:
    return ((zh >= threshold).float().mean() + (en < threshold).float().mean()).item() / 2


def _held_out_accuracy(codes_zh, codes_en, layer: int, feature: int) -> float:
    """Threshold on the firing share chosen on the even (discovery) lines, accuracy on the odd ones."""
    zh, en = _firing_share(codes_zh, layer, feature), _firing_share(codes_en, layer, feature)
    candidates = torch.cat([zh[::2], en[::2]]).unique().tolist()
    threshold = max(candidates, key=lambda t: _balanced_accuracy(zh[::2], en[::2], t))
    return _balanced_accuracy(zh[1::2], en[1::2], threshold)


def _plots(out: Path, results: list[LayerResult], token_rows: list[str], heat: torch.Tensor) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(results[0].han_share)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(conditions)
    for j, cond in enumerate(conditions):
        ax.bar([r.layer + j * width for r in results], [r.han_share[cond] for r in results], width, label=cond)
    ax.set_xticks([r.layer + 0.4 - width / 2 for r in results], [f"layer {r.layer}" for r in results])
    ax.set_ylabel("Han share of continuation")
    ax.set_title("Steering with the Chinese feature (±α) vs a random direction of the same norm")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(out / "steering.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(token_rows)), 2.5))
    ax.imshow(heat.numpy(), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(results)), [f"L{r.layer} f{r.feature}" for r in results])
    # positions, not tokens, on the axis: matplotlib's default font has no CJK glyphs (tokens are in report.md)
    ax.set_xticks(range(len(token_rows)), [str(i) for i in range(len(token_rows))], fontsize=7)
    ax.set_xlabel("token position in the mixed sentence")
    ax.set_title("Chinese-feature activation per token of the mixed sentence")
    fig.tight_layout()
    fig.savefig(out / "mixed_sentence.png", dpi=120)
    plt.close(fig)
    return ["steering.png", "mixed_sentence.png"]


def run_demo(out_dir: str | Path = "qscope-demo-report", *, assets: Path = DEMO_ASSETS, max_new_tokens: int = 24,
             alpha_scale: float = 8.0, seed: int = 0) -> dict:
    """Run every step and write ``report.md``, ``summary.json`` and plots into ``out_dir``; returns the summary.

    ``assets`` is a folder with ``model/`` and ``saes/`` as written by ``scripts/build_demo.py``.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(str(assets / "model"))
    backend = as_backend(model)
    saes = {n: load_sae(assets / "saes", n) for n in local_layers(assets / "saes")}
    zh, en = SENTENCES["zh"], SENTENCES["en"]

    # (2) discovery (firing-rate difference, the official app's Compare) on the even sentences, checked on the odd
    codes_zh, codes_en = harvest(backend, tok, zh, saes), harvest(backend, tok, en, saes)
    ranking = contrast_codes(codes_zh[::2], codes_en[::2], {n: s.cfg.d_sae for n, s in saes.items()},
                             ContrastOptions(method="rate"))

    # residual-norm scale per layer (RMS per coordinate, ‖h‖ / √d_model), so α is comparable across layers
    ids, mask, positions = pad(tokenize(tok, zh[::2] + en[::2], max_length=None), tok.pad_token_id)
    acts = backend.capture(ids, mask, layers=list(saes), position_ids=positions)
    mask = mask.bool()
    mask[:, 0] = False
    norms = {n: float(acts[n][mask].norm(dim=-1).mean()) / saes[n].cfg.d_model ** 0.5 for n in saes}
    fvu = {n: saes[n].fvu(acts[n][mask]) for n in saes}

    gen = torch.Generator().manual_seed(seed)
    prompts = SENTENCES["mixed_prompts"]
    baseline = char_breakdown(_greedy_batch(backend, tok, prompts, max_new_tokens))
    results, outputs = [], {}
    for layer, sae in saes.items():
        feature = ranking[layer][0].feature
        alpha = alpha_scale * norms[layer]
        random_dir = torch.randn(sae.cfg.d_model, generator=gen)
        shares = {"baseline": baseline["han"]}
        for name, sign in (("suppress", -1.0), ("amplify", 1.0)):
            with steer(backend, SteeringSpec.single(layer, feature, sign * alpha, direction_norm="unit"), saes):
                texts = _greedy_batch(backend, tok, prompts, max_new_tokens)
            shares[name] = char_breakdown(texts)["han"]
            outputs[f"layer{layer}_{name}"] = {"breakdown": char_breakdown(texts), "examples": texts[:4]}
        for name, sign in (("random_minus", -1.0), ("random_plus", 1.0)):
            vector = sign * alpha * random_dir / random_dir.norm()
            with backend.edit({layer: lambda hidden, n, kwargs, v=vector: hidden + v.to(hidden)}):
                shares[name] = char_breakdown(_greedy_batch(backend, tok, prompts, max_new_tokens))["han"]
        accuracy = _held_out_accuracy(codes_zh, codes_en, layer, feature)
        results.append(LayerResult(layer, feature, fvu[layer], accuracy, alpha, shares))

    # (1) per-token analysis of the mixed sentence, and the discovered features over its tokens
    rows = analyze(backend, tok, PROMPTS["mixed"], saes, top_n=3)
    (mixed,) = harvest(backend, tok, [PROMPTS["mixed"]], saes)
    tokens = token_texts(tok, mixed.token_ids.tolist())
    heat = torch.stack([((mixed.indices[r.layer] == r.feature) * mixed.values[r.layer]).sum(-1) for r in results])
    images = _plots(out, results, tokens, heat)

    classifier = _classifier_step(backend, tok, saes)
    redundancy = _redundancy_step(backend, tok, saes[max(saes)], out / "redundancy")

    best = min(results, key=lambda r: r.han_share["suppress"] - r.han_share["amplify"])
    summary = {
        "release": DEMO_RELEASE,
        "baseline_breakdown": baseline,
        "layers": [asdict(r) for r in results],
        "best_steering_layer": best.layer,
        "examples": outputs,
        "classifier": classifier,
        "redundancy": redundancy,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "report.md").write_text(_markdown(summary, rows, images), encoding="utf-8")
    return summary


def _classifier_step(model, tok, saes) -> dict:
    """OR rule over the top-3 features of the best layer (top1-diff), fitted on even lines, scored on odd ones."""
    from qscope_plugin.recipes.classifiers import ORRuleClassifier

    zh, en = SENTENCES["zh"], SENTENCES["en"]
    clf = ORRuleClassifier(model, tok, saes, k_features=3)
    clf.fit(zh[::2] + en[::2], [1] * len(zh[::2]) + [0] * len(en[::2]))
    scores = clf.score(zh[1::2] + en[1::2], [1] * len(zh[1::2]) + [0] * len(en[1::2]))
    return {"features": {str(layer): feats for layer, feats in clf.features.items()},
            "precision": scores.precision, "recall": scores.recall, "f1": scores.f1}


def describe_features(features: dict[str, list[int]]) -> str:
    """``{"3": [197, 631]}`` as "layer 3 features 197 and 631": how the demo's outputs name a classifier's rule."""
    def listed(ids: list[int]) -> str:
        return str(ids[0]) if len(ids) == 1 else f"{', '.join(map(str, ids[:-1]))} and {ids[-1]}"

    return "; ".join(f"layer {layer} feature{'s' if len(ids) > 1 else ''} {listed(ids)}"
                     for layer, ids in features.items())


def _redundancy_step(model, tok, sae, out: Path) -> dict:
    """Footprints of a toy suite at the last layer; zh_half is a subset of zh, so it must be a drop candidate."""
    from qscope_plugin.recipes.footprints import harvest_footprints
    from qscope_plugin.recipes.redundancy import redundancy_report
    from qscope_plugin.recipes.reports import write_report

    suite = {"zh": SENTENCES["zh"], "zh_half": SENTENCES["zh"][::2], "en": SENTENCES["en"],
             "mixed_prompts": SENTENCES["mixed_prompts"]}
    layer = sae.cfg.layer
    footprints = {name: harvest_footprints(model, tok, texts, {layer: sae}, name=name, progress=False)[layer]
                  for name, texts in suite.items()}
    report = redundancy_report(footprints)
    write_report(report, out)
    return {"layer": layer, "benchmarks": {name: {key: getattr(row, key) for key in ("n_samples", "footprint_size",
                                                                                     "feature_redundancy")}
                                           for name, row in report.benchmarks.items()},
            "summary": report.to_json()["summary"], "report": f"{out.name}/report.md"}


def _markdown(summary: dict, rows, images: list[str]) -> str:
    lines = ["# qscope demo report", "", f"Release `{summary['release']}`; ran in {summary['seconds']} s.", "",
             "## Chinese feature per layer and steering", "",
             "| layer | SAE FVU | feature | held-out balanced acc. | α | baseline | suppress (−α) | amplify (+α) | "
             "random −α | random +α |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["layers"]:
        shares = " | ".join(f"{r['han_share'][c]:.2f}" for c in CONDITIONS)
        lines.append(f"| {r['layer']} | {r['fvu']:.3f} | {r['feature']} | {r['balanced_accuracy']:.2f} | "
                     f"{r['alpha']:.1f} | {shares} |")
    lines += ["", "Cells are the Han share of all non-space characters in greedy continuations of the steering "
              "prompts.", "", *(f"![{name}]({name})" for name in images), "",
              "## Per-token features of the mixed sentence", "", "| layer | pos | token | top features |",
              "|---|---|---|---|"]
    lines += [f"| {r.layer} | {r.position} | `{r.token}` | "
              f"{', '.join(f'{f} ({v:.1f})' for f, v in r.features)} |" for r in rows]
    best = summary["best_steering_layer"]
    lines += ["", f"## Example continuations (layer {best})", ""]
    for name in ("suppress", "amplify"):
        ex = summary["examples"][f"layer{best}_{name}"]["examples"]
        lines += [f"- **{name}**: " + " / ".join(repr(e) for e in ex)]
    clf = summary["classifier"]
    lines += ["", "## OR-rule classifier, Chinese vs English (report §5)", "",
              f"A text is Chinese when any of {describe_features(clf['features'])} fires on it; held-out "
              f"precision {clf['precision']:.2f}, recall {clf['recall']:.2f}, F1 {clf['f1']:.2f}."]
    red = summary["redundancy"]
    lines += ["", f"## Benchmark redundancy of a toy suite, layer {red['layer']} (report §4)", "",
              "| set | N | \\|F(D)\\| | R̂(D) |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {row['n_samples']} | {row['footprint_size']} | {row['feature_redundancy']:.3g} |"
              for name, row in red["benchmarks"].items()]
    lines += ["", *(f"- drop candidate: {d['benchmark']} ({d['overlap']:.0%} covered by {d['covered_by']})"
                    for d in red["summary"]["drop_candidates"]),
              f"- full report: [{red['report']}]({red['report']})"]
    return "\n".join(lines) + "\n"
