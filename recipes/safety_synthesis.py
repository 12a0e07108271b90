"""Feature-driven safety data synthesis with representation-level verification (report §6).

    >>> chat = ChatModel(model, tok)                          # recipes.chat; chat template, <think> stripped
    >>> targets = build_targets(model, tok, saes, features, corpus, chat.explainer(), chat.judge(), tau=0.5,
    ...                         categorize=chat.categorizer())                                    # (R23)
    >>> report = coverage(model, tok, saes, targets, seed_prompts)                                # (R22, R24, R27)
    >>> kept = synthesize(model, tok, saes, targets, chat.generators(), budget=200, out="synth.jsonl")  # + verify
    >>> curves = compare_coverage(model, tok, saes, targets, chat.generators(), seed_prompts=seed, pool=pool,
    ...                           budgets=[0, 50, 100, 200], rows=kept)   # reuses kept; baselines under the budget

Equations (docs/method.md §3.4), with h^{(ℓ)}_{i,f} = 1[max_t a^{(ℓ)}_{i,t,f} > 0] on the prompt of example i (R15):

    (R22) c_f(D) = 1[∃ i ∈ D : h_{i,f} = 1]               a target is covered by D
    (R23) T = {(ℓ, f) : s_f ≥ τ}                          s ∈ [0, 1] from a judge of the feature's explanation
    (R24) T_miss = {(ℓ, f) ∈ T : c_f(D_seed) = 0}          synthesis priority; then weakly covered targets
    (R27) Cov(D) = |T|⁻¹ Σ_{(ℓ,f)∈T} c_f(D)

Every model call (explainer, judge, prompt/rewrite/response generators) is a pluggable callable;
``recipes.chat.ChatModel`` is a provided implementation on a local ``transformers`` chat model, and the prompt
templates are text files in ``templates/`` that users can edit or replace. Verification keeps an example for
target (ℓ, f) only if its prompt fires the feature through the SAE.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from qscope_plugin.errors import MalformedFileError, QScopeError, QScopeWarning
from qscope_plugin.recipes._harvest import sharded_harvest
from qscope_plugin.recipes._json import is_index, is_number
from qscope_plugin.recipes.discovery import Context, top_contexts
from qscope_plugin.sae import QwenScopeSAE

TEMPLATES = Path(__file__).parent / "templates"
ATTACK_STYLES = ("role-play", "hypothetical framing", "payload splitting", "polite indirect request")
"""Default adversarial rewrite styles η_k; the report does not list its own (docs/method.md §4 row 9)."""
RISK_CATEGORIES = ("violence", "weapons", "self-harm", "sexual content", "hate and harassment", "illegal activity",
                   "cybercrime", "privacy", "misinformation", "benign")
"""Default risk categories for ``ChatModel.categorizer``; the report does not list its own. A target whose category
is in ``synthesize(benign_categories=...)`` (default: ``"benign"``) gets z = benign (a helpful answer), every other
category z = harmful (a refusal with a safe redirect), as in step 4 of the procedure."""
GENERIC_REQUEST = "any request that a safety-trained AI assistant might receive, harmful or harmless"
"""The only "explanation" the random-synthesis baseline ever sees when the generators have no ``random`` one."""


class SynthesisError(QScopeError, ValueError):
    """Targets, budgets or files that cannot be used."""


class TargetsFileError(SynthesisError, MalformedFileError):
    """A targets file that is truncated, damaged or not one (the message names the file and the line)."""


TARGETS_FILE = "JSONL written by save_targets / `qscope safety targets`"
TARGET_FIELDS = {"layer": is_index, "feature": is_index, "explanation": lambda v: isinstance(v, str),
                 "score": is_number, "category": lambda v: isinstance(v, str)}
"""Each ``Target`` field and what its JSON value must be (``category`` may be left out: it defaults)."""


class Explainer(Protocol):
    def __call__(self, contexts: Sequence[Context]) -> str: ...


class Judge(Protocol):
    def __call__(self, explanation: str) -> float: ...


@dataclass(frozen=True)
class Target:
    layer: int
    feature: int
    explanation: str
    score: float
    """s_f: the judge's relevance of the explanation to safety SFT, in [0, 1]."""
    category: str = "harmful"
    """Risk category; decides the response label z (harmful -> refusal, benign -> helpful answer)."""


def save_targets(targets: Sequence[Target], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(asdict(t), ensure_ascii=False) + "\n" for t in targets),
                          encoding="utf-8")


def load_targets(path: str | Path) -> list[Target]:
    """Targets saved by ``save_targets``; an empty file is refused, since coverage and synthesis need targets."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TargetsFileError(f"cannot read targets from {str(path)!r} ({type(e).__name__}: {e}); expected "
                               f"{TARGETS_FILE}") from None
    targets = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise TargetsFileError(f"{str(path)!r} line {number} is not JSON ({e}); expected {TARGETS_FILE}") from None
        wrong = (list(TARGET_FIELDS) if not isinstance(data, dict) else
                 [k for k, ok in TARGET_FIELDS.items() if not ok(data.get(k, "harmful" if k == "category" else None))]
                 + sorted(set(data) - set(TARGET_FIELDS)))
        if wrong:
            raise TargetsFileError(f"{str(path)!r} line {number} is not a target (missing, malformed or unknown: "
                                   f"{', '.join(wrong)}); expected {TARGETS_FILE}")
        targets.append(Target(**data))
    if not targets:
        raise SynthesisError(f"{str(path)!r} holds no targets; rebuild them with a lower tau or more features "
                             "(build_targets / `qscope safety targets --tau --features`)")
    return targets


def build_targets(model: object, tokenizer, saes: Mapping[int, QwenScopeSAE], features: Mapping[int, Sequence[int]],
                  corpus: Sequence[str], explainer: Explainer, judge: Judge, *, tau: float = 0.5, n_top: int = 10,
                  categorize: Callable[[str], str] | None = None, progress: bool = False,
                  contexts: Mapping[tuple[int, int], Sequence[Context]] | None = None,
                  explanations: Mapping[tuple[int, int], str] | None = None) -> list[Target]:
    """Explain each candidate feature from its top-activating contexts, score it, keep s_f ≥ τ (R23).

    ``contexts``: ``top_contexts`` of the same corpus and features when already harvested (e.g. by all ranks of
    ``torchrun``, so that only one rank runs the explainer); default: harvested here.
    ``explanations``: ``{(layer, feature): text}`` already written (e.g. by ``qscope explain``,
    ``recipes.explain.read_explanations``); those features are not explained again, only judged.
    """
    given = {key: text for key, text in (explanations or {}).items() if text}
    if contexts is None:
        contexts = top_contexts(model, tokenizer, corpus, saes, features, n_top=n_top, progress=progress)
    targets = []
    for (layer, feature), ctx in contexts.items():
        if not ctx:
            continue  # never fired on the corpus: nothing to explain
        explanation = given.get((layer, feature)) or explainer(ctx)
        score = float(judge(explanation))
        if not 0.0 <= score <= 1.0:
            raise SynthesisError(f"the judge returned {score} for feature {feature}; scores must lie in [0, 1]")
        if score >= tau:
            category = categorize(explanation) if categorize else "harmful"
            targets.append(Target(layer, feature, explanation, score, category))
    return targets


def firing(model: object, tokenizer, saes: Mapping[int, QwenScopeSAE], prompts: Sequence[str],
           targets: Sequence[Target], **options) -> np.ndarray:
    """(R15) restricted to the targets: ``(n_prompts, n_targets)`` bool; an empty prompt fires nothing."""
    out = np.zeros((len(prompts), len(targets)), dtype=bool)
    rows = [i for i, p in enumerate(prompts) if p.strip()]
    if not rows or not targets:
        return out
    layers = sorted({t.layer for t in targets})
    acts = sharded_harvest(model, tokenizer, [prompts[i] for i in rows], {layer: saes[layer] for layer in layers},
                           pooling="max", desc="coverage", **options)
    out[rows] = np.stack([np.asarray(acts[t.layer][:, t.feature].todense()).ravel() > 0 for t in targets], axis=1)
    return out


@dataclass
class Coverage:
    support: np.ndarray
    """Per target, the number of prompts that fire it."""
    cov: float
    """(R27) share of targets fired by at least one prompt."""
    missing: list[int]
    """(R24) indices of targets with zero support."""
    weak: list[int]
    """Covered targets with support below the weak threshold."""
    by_category: dict[str, float] = field(default_factory=dict)


def coverage_from_firing(fired: np.ndarray, targets: Sequence[Target], *, weak_support: int = 3) -> Coverage:
    """(R22, R24, R27) from a firing matrix; ``weak_support`` is not specified in the report (docs/method.md §4
    row 9)."""
    if not targets:
        raise SynthesisError("no targets; build them first (build_targets or `qscope safety targets`)")
    support = fired.sum(axis=0) if len(fired) else np.zeros(len(targets), dtype=int)
    covered = support > 0
    categories: dict[str, list[bool]] = {}
    for t, c in zip(targets, covered, strict=True):
        categories.setdefault(t.category, []).append(bool(c))
    return Coverage(support, float(covered.mean()), [i for i, c in enumerate(covered) if not c],
                    [i for i, s in enumerate(support) if 0 < s < weak_support],
                    {cat: float(np.mean(v)) for cat, v in sorted(categories.items())})


def coverage(model: object, tokenizer, saes: Mapping[int, QwenScopeSAE], targets: Sequence[Target],
             prompts: Sequence[str], *, weak_support: int = 3, **options) -> Coverage:
    return coverage_from_firing(firing(model, tokenizer, saes, prompts, targets, **options), targets,
                                weak_support=weak_support)


@dataclass(frozen=True)
class Generators:
    """The report's generators (R25, R26); each takes and returns plain text."""

    vanilla: Callable[[str], str]
    """G_van(e_f): a prompt that exercises the feature described by explanation e_f."""
    adversarial: Callable[[str, str], str]
    """G_adv(x_van, η): the prompt rewritten in attack style η."""
    response: Callable[[str, Literal["harmful", "benign"]], str]
    """G_resp(x, z): a refusal with a safe redirect if z is harmful, else a helpful answer."""
    random: Callable[[int], str] | None = None
    """G_rand(i): the i-th random safety-related prompt, from a generic template that sees no feature explanation
    (the random-synthesis baseline). Without it the baseline calls ``vanilla(GENERIC_REQUEST)``."""


def _read_rows(path: Path, *, repair: bool = False) -> list[dict]:
    """The rows of a synthesis JSONL. A torn last line (a run killed mid-append) is skipped, and with ``repair``
    also cut off the file, so that the next append starts on a fresh line; any other unreadable line is an error."""
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        warnings.warn(f"{str(path)!r}: skipped a half-written last line (an interrupted run)", QScopeWarning,
                      stacklevel=3)
        if repair:
            path.write_text(text, encoding="utf-8")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise SynthesisError(f"{str(path)!r} line {number} is not JSON; it is not a synthesis file written by "
                                 "synthesize, or it was edited; use a new output file") from None
    return rows


def synthesize(model: object, tokenizer, saes: Mapping[int, QwenScopeSAE], targets: Sequence[Target],
               generators: Generators, *, seed_prompts: Sequence[str] = (), budget: int = 100,
               attack_styles: Sequence[str] = ATTACK_STYLES, n_adversarial: int = 2, weak_support: int = 3,
               seed: int = 0, out: str | Path | None = None, provenance: Mapping | None = None,
               benign_categories: Sequence[str] = ("benign",), progress: bool = False) -> list[dict]:
    """Generate and verify examples for uncovered targets first (T_miss), then weakly covered ones.

    ``budget`` counts generated prompts (vanilla and adversarial), with ``out`` those of earlier runs on the file
    included. Every attempt is appended to ``out`` (JSONL) as it is made, with its target's explanation and
    category, the run's settings and ``provenance``, so an interrupted run resumes where it stopped; a resume must
    use the same settings (seed, styles, rewrites, weak support, benign categories, seed prompts) and only the
    budget may grow. Returns the verified rows: with ``out``, all of them in the file, else those of this call.
    The label z is benign for targets whose category is in ``benign_categories``, harmful otherwise.
    """
    from tqdm.auto import tqdm

    if budget < 1:
        raise SynthesisError(f"budget={budget}; give a positive number of prompts to generate")
    keys = [(t.layer, t.feature) for t in targets]
    if len(set(keys)) != len(keys):
        raise SynthesisError("targets repeat a (layer, feature) pair; T is a set of features (R23)")
    settings = {"seed": seed, "attack_styles": list(attack_styles), "n_adversarial": n_adversarial,
                "weak_support": weak_support, "benign_categories": list(benign_categories),
                "seed_prompts_sha256": hashlib.sha256("\n".join(seed_prompts).encode()).hexdigest()}
    path = Path(out) if out else None
    earlier = _read_rows(path, repair=True) if path and path.exists() else []
    if earlier and earlier[-1].get("settings") != settings:
        raise SynthesisError(f"{str(path)!r} was written with settings {earlier[-1].get('settings')}, this call "
                             f"uses {settings}; resume with the same settings (only the budget may grow) or write "
                             "to a new file")
    spent = len(earlier)
    done = {(r["layer"], r["feature"], r["variant"]): r["prompt"] for r in earlier}
    cov = coverage(model, tokenizer, saes, targets, list(seed_prompts), weak_support=weak_support)
    order = cov.missing + sorted(cov.weak, key=lambda i: cov.support[i])
    rng = random.Random(seed)
    kept: list[dict] = []
    bar = tqdm(total=budget, initial=min(spent, budget), disable=not progress, desc="synthesize", unit="prompt")
    for index in order:
        target = targets[index]
        styles = rng.sample(list(attack_styles), min(n_adversarial, len(attack_styles)))
        vanilla: str | None = None
        for variant in ["vanilla", *styles]:
            if spent >= budget:
                break
            if (target.layer, target.feature, variant) in done:
                if variant == "vanilla":
                    vanilla = done[target.layer, target.feature, variant]  # resume: rewrite the saved prompt
                continue
            if variant == "vanilla" or vanilla is None:
                vanilla = generators.vanilla(target.explanation)
            prompt = vanilla if variant == "vanilla" else generators.adversarial(vanilla, variant)
            spent += 1
            bar.update(1)
            verified = bool(firing(model, tokenizer, saes, [prompt], [target])[0, 0])  # "" fires nothing
            label = "benign" if target.category in benign_categories else "harmful"
            row = {"index": spent - 1, "layer": target.layer, "feature": target.feature,
                   "explanation": target.explanation, "category": target.category, "variant": variant,
                   "prompt": prompt, "label": label, "verified": verified,
                   "response": generators.response(prompt, label) if verified else None,
                   "settings": settings, "provenance": dict(provenance or {})}
            if path:
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if verified:
                kept.append(row)
    bar.close()
    if path:
        return [r for r in earlier if r["verified"]] + kept
    return kept


def read_synthesized(path: str | Path, *, verified_only: bool = True) -> list[dict]:
    return [r for r in _read_rows(Path(path)) if r["verified"] or not verified_only]


def coverage_curve(fired: np.ndarray, targets: Sequence[Target], budgets: Sequence[int],
                   seed_fired: np.ndarray | None = None) -> list[float]:
    """Cov (R27) of the seed set plus the first ``b`` generated prompts, for each budget ``b``."""
    base = seed_fired.any(axis=0) if seed_fired is not None and len(seed_fired) else np.zeros(len(targets), bool)
    return [float((base | (fired[:b].any(axis=0) if b else False)).mean()) for b in budgets]


def baseline_prompts(generators: Generators, pool: Sequence[str], budget: int, *,
                     seed: int = 0) -> dict[str, list[str]]:
    """The two comparisons of the report under the same budget: natural sampling from a pool of safety prompts,
    and random safety-related synthesis. The random baseline is explanation-free: it never sees a target (nor its
    explanation); each prompt is ``generators.random(i)`` for a seeded i, or ``generators.vanilla(GENERIC_REQUEST)``
    when the generators have no ``random`` (deterministic generators then repeat one prompt). No coverage guidance,
    no verification."""
    rng = random.Random(seed)
    natural = rng.sample(list(pool), min(budget, len(pool)))
    draw = generators.random or (lambda i: generators.vanilla(GENERIC_REQUEST))
    draws = random.Random(f"{seed}/random synthesis")  # independent of the pool
    random_synth = [draw(draws.randrange(2**31)) for _ in range(budget)]
    return {"natural sampling": natural, "random synthesis": random_synth}


def compare_coverage(model: object, tokenizer, saes: Mapping[int, QwenScopeSAE], targets: Sequence[Target],
                     generators: Generators, *, seed_prompts: Sequence[str], pool: Sequence[str],
                     budgets: Sequence[int], seed: int = 0, rows: Sequence[dict] | None = None,
                     **synth_options) -> dict[str, list[float]]:
    """Cov (R27) vs budget for feature-driven synthesis (only verified examples kept) and the two baselines.

    ``pool``: natural prompts for the sampling baseline; those also in ``seed_prompts`` are left out.
    ``rows``: verified rows already synthesized (``synthesize``'s return or ``read_synthesized(out)``); the
    feature-driven line is then read from them (their ``index`` is the attempt number) instead of synthesizing
    again, so the curve matches the saved file and costs no generation. Without ``rows`` it synthesizes first.
    """
    budget = max(budgets)
    if rows is None:
        rows = synthesize(model, tokenizer, saes, targets, generators, seed_prompts=seed_prompts, budget=budget,
                          seed=seed, **synth_options)
    rows = sorted((r for r in rows if r.get("verified", True)), key=lambda r: r["index"])
    seed_fired = firing(model, tokenizer, saes, list(seed_prompts), targets)
    curves = {"feature-driven": coverage_curve(firing(model, tokenizer, saes, [r["prompt"] for r in rows], targets),
                                               targets, [sum(r["index"] < b for r in rows) for b in budgets],
                                               seed_fired)}
    seed_set = set(seed_prompts)
    fresh = [p for p in pool if p not in seed_set]  # a seed prompt adds no coverage: it is in the baseline already
    if len(fresh) < budget:
        warnings.warn(f"the pool has {len(fresh)} prompts outside the seed set, fewer than the budget {budget}: "
                      "natural sampling stops growing there; give a larger pool", QScopeWarning, stacklevel=2)
    for name, prompts in baseline_prompts(generators, fresh, budget, seed=seed).items():
        curves[name] = coverage_curve(firing(model, tokenizer, saes, prompts, targets), targets, budgets, seed_fired)
    return curves


def curve_budgets(budget: int) -> list[int]:
    """0 and the budget in quarters: the five points of a coverage-vs-budget curve up to ``budget``."""
    return sorted({max(1, budget * i // 4) for i in range(5)} | {0})


def plot_coverage_curves(curves: Mapping[str, Sequence[float]], budgets: Sequence[int], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, values in curves.items():
        ax.plot(budgets, values, marker="o", label=name)
    ax.set_xlabel("generated prompts (budget)")
    ax.set_ylabel("target coverage Cov(D)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
