from __future__ import annotations

import numpy as np
import pytest
from qscope_testing import qwen3_tokenizer, tiny_qwen3, tiny_saes

from qscope_plugin.recipes._common import encode_texts
from qscope_plugin.recipes.safety_synthesis import (
    ATTACK_STYLES,
    ChatModel,
    Generators,
    SynthesisError,
    Target,
    build_targets,
    coverage,
    coverage_curve,
    coverage_from_firing,
    load_targets,
    read_synthesized,
    save_targets,
    synthesize,
)

TARGETS = [Target(3, f, f"feature {f}", 0.9, cat) for f, cat in ((1, "harmful"), (2, "harmful"), (5, "benign"))]


def test_coverage_equations_by_hand():
    fired = np.array([[1, 0, 0], [1, 0, 1], [1, 0, 0], [0, 0, 1]], dtype=bool)  # 4 prompts x 3 targets
    cov = coverage_from_firing(fired, TARGETS, weak_support=3)
    assert cov.support.tolist() == [3, 0, 2]
    assert cov.cov == pytest.approx(2 / 3)  # (R27)
    assert cov.missing == [1]  # (R24)
    assert cov.weak == [2]  # covered, support 2 < 3
    assert cov.by_category == {"benign": 1.0, "harmful": 0.5}
    assert coverage_curve(fired, TARGETS, [0, 1, 2, 4]) == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3])
    seed = np.array([[0, 1, 0]], dtype=bool)
    assert coverage_curve(fired, TARGETS, [0, 4], seed_fired=seed) == pytest.approx([1 / 3, 1.0])
    with pytest.raises(SynthesisError, match="no targets"):
        coverage_from_firing(fired[:, :0], [])


def test_targets_roundtrip(tmp_path):
    save_targets(TARGETS, tmp_path / "t.jsonl")
    assert load_targets(tmp_path / "t.jsonl") == TARGETS
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(SynthesisError, match="expected JSONL"):
        load_targets(tmp_path / "bad.jsonl")


TRIGGER, NEUTRAL = "zebra zebra zebra zebra", "the cat sat on the mat"


@pytest.fixture(scope="module")
def planted():
    """Two targets that the trigger phrase fires and neutral text does not, found on the real harvesting path."""
    model, tok = tiny_qwen3(n_layers=2), qwen3_tokenizer()
    saes = tiny_saes(model)
    variants = lambda text: [text] + [f"{text} ({style})" for style in ATTACK_STYLES]  # noqa: E731
    codes = encode_texts(model, tok, variants(TRIGGER) + variants(NEUTRAL), {1: saes[1]})
    fired = [set(c.indices[1][c.values[1] > 0].tolist()) for c in codes]
    n = len(ATTACK_STYLES) + 1
    only_trigger = sorted(set.intersection(*fired[:n]) - set.union(*fired[n:]))
    unused = sorted(set(range(128)) - set.union(*fired))
    assert len(only_trigger) >= 2 and unused
    targets = [Target(1, only_trigger[0], "trigger-0", 0.9), Target(1, only_trigger[1], "trigger-1", 0.8, "benign"),
               Target(1, unused[0], "no-trigger", 0.7)]
    return model, tok, saes, targets


def stub_generators(log: list) -> Generators:
    """Test-only: the prompt contains the trigger iff the explanation says so; every call is logged."""

    def vanilla(explanation: str) -> str:
        log.append(("vanilla", explanation))
        return TRIGGER if explanation.startswith("trigger") else NEUTRAL

    def adversarial(prompt: str, style: str) -> str:
        log.append(("adversarial", style))
        return f"{prompt} ({style})"

    return Generators(vanilla, adversarial, lambda prompt, label: f"[{label} response]")


def test_loop_keeps_exactly_the_verified_examples(planted, tmp_path):
    model, tok, saes, targets = planted
    log: list = []
    out = tmp_path / "synth.jsonl"
    kept = synthesize(model, tok, saes, targets, stub_generators(log), seed_prompts=[NEUTRAL], budget=9,
                      n_adversarial=2, out=out, provenance={"release": "tiny"})
    rows = read_synthesized(out, verified_only=False)
    assert len(rows) == 9 and sum(kind == "adversarial" for kind, _ in log) == 6
    assert all(r["verified"] == ("zebra" in r["prompt"]) for r in rows)
    assert kept == [r for r in rows if r["verified"]] and len(kept) == 6 and not any(r["feature"] == targets[2].feature
                                                                                      for r in kept)
    assert all(r["response"] == f"[{r['label']} response]" for r in kept)
    assert {r["label"] for r in kept} == {"harmful", "benign"} and kept[0]["provenance"] == {"release": "tiny"}
    # coverage reaches what the planted data allows: the two trigger targets, never the third
    before = coverage(model, tok, saes, targets, [NEUTRAL])
    after = coverage(model, tok, saes, targets, [NEUTRAL] + [r["prompt"] for r in kept])
    assert before.cov == 0.0 and after.cov == pytest.approx(2 / 3) and after.missing == [2]


def test_resume_continues_where_it_stopped(planted, tmp_path):
    model, tok, saes, targets = planted
    synthesize(model, tok, saes, targets, stub_generators([]), budget=4, out=tmp_path / "a.jsonl", seed=3)
    synthesize(model, tok, saes, targets, stub_generators([]), budget=9, out=tmp_path / "a.jsonl", seed=3)
    synthesize(model, tok, saes, targets, stub_generators([]), budget=9, out=tmp_path / "b.jsonl", seed=3)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_bad_budget(planted):
    model, tok, saes, targets = planted
    with pytest.raises(SynthesisError, match="budget=0"):
        synthesize(model, tok, saes, targets, stub_generators([]), budget=0)
    with pytest.raises(SynthesisError, match="repeat a"):
        synthesize(model, tok, saes, [targets[0], targets[0]], stub_generators([]), budget=1)


def test_end_to_end_with_a_local_transformers_model(planted, tmp_path):
    """Real generation through the provided ChatModel (tiny budget; a random model writes nonsense)."""
    model, tok, saes, _ = planted
    chat = ChatModel(model, tok, max_new_tokens=6)
    features = {1: sorted({t.feature for t in planted[3][:2]})}  # features known to fire on the corpus
    targets = build_targets(model, tok, saes, features, [TRIGGER, NEUTRAL, "hello world"],
                            chat.explainer(), chat.judge(), tau=0.0)
    assert targets and all(0.0 <= t.score <= 1.0 and t.explanation for t in targets)
    kept = synthesize(model, tok, saes, targets, chat.generators(), budget=3, n_adversarial=1,
                      out=tmp_path / "s.jsonl")
    rows = read_synthesized(tmp_path / "s.jsonl", verified_only=False)
    assert len(rows) == 3 and len(kept) == sum(r["verified"] for r in rows)


def test_coverage_vs_budget_against_the_baselines(planted, tmp_path):
    from qscope_plugin.recipes.safety_synthesis import compare_coverage, plot_coverage_curves

    model, tok, saes, targets = planted
    budgets = [0, 1, 3, 6]
    curves = compare_coverage(model, tok, saes, targets, stub_generators([]), seed_prompts=[NEUTRAL],
                              pool=[NEUTRAL, "a dog ran", "rain today"], budgets=budgets, n_adversarial=2)
    assert set(curves) == {"feature-driven", "natural sampling", "random synthesis"}
    assert curves["feature-driven"] == pytest.approx([0, 2 / 3, 2 / 3, 2 / 3])  # the trigger fires both targets
    assert curves["natural sampling"] == [0, 0, 0, 0]  # the pool never contains the trigger
    assert all(a <= b for c in curves.values() for a, b in zip(c, c[1:], strict=False))
    assert plot_coverage_curves(curves, budgets, tmp_path / "c.png").stat().st_size > 0
