from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from qscope_testing import qwen3_tokenizer, tiny_qwen3, tiny_saes

from qscope_plugin.backends import Backend
from qscope_plugin.errors import QScopeWarning
from qscope_plugin.recipes._harvest import harvest
from qscope_plugin.recipes.chat import ChatModel, parse_category, parse_score, strip_thinking
from qscope_plugin.recipes.safety_synthesis import (
    ATTACK_STYLES,
    TEMPLATES,
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
    codes = harvest(model, tok, variants(TRIGGER) + variants(NEUTRAL), {1: saes[1]})
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
    first = synthesize(model, tok, saes, targets, stub_generators([]), budget=4, out=tmp_path / "a.jsonl", seed=3)
    resumed = synthesize(model, tok, saes, targets, stub_generators([]), budget=9, out=tmp_path / "a.jsonl", seed=3)
    fresh = synthesize(model, tok, saes, targets, stub_generators([]), budget=9, out=tmp_path / "b.jsonl", seed=3)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    # the resumed call returns every kept row of the file, not only the ones it made
    assert 0 < len(first) < len(resumed) and resumed == fresh == read_synthesized(tmp_path / "b.jsonl")
    row = read_synthesized(tmp_path / "b.jsonl", verified_only=False)[0]
    assert (row["explanation"], row["category"]) == (targets[0].explanation, targets[0].category)
    assert row["settings"]["seed"] == 3 and row["settings"]["n_adversarial"] == 2


def test_resume_repairs_a_torn_last_line(planted, tmp_path):
    """A run killed mid-append leaves half a line; the resume cuts it and continues as an unbroken run would."""
    model, tok, saes, targets = planted
    torn, whole = tmp_path / "torn.jsonl", tmp_path / "whole.jsonl"
    synthesize(model, tok, saes, targets, stub_generators([]), budget=3, out=torn)
    lines = torn.read_text().splitlines(keepends=True)
    torn.write_text("".join(lines[:2]) + lines[2][:20])  # the third attempt was being written
    with pytest.warns(QScopeWarning, match="half-written last line"):
        assert len(read_synthesized(torn, verified_only=False)) == 2
    assert not torn.read_text().endswith("\n")  # reading alone leaves the file as it is
    with pytest.warns(QScopeWarning, match="half-written last line"):
        synthesize(model, tok, saes, targets, stub_generators([]), budget=5, out=torn)
    synthesize(model, tok, saes, targets, stub_generators([]), budget=5, out=whole)
    assert torn.read_text() == whole.read_text()
    torn.write_text("not json\n" + torn.read_text())
    with pytest.raises(SynthesisError, match="line 1 is not JSON"):
        synthesize(model, tok, saes, targets, stub_generators([]), budget=6, out=torn)


def test_resume_with_other_settings_is_refused(planted, tmp_path):
    model, tok, saes, targets = planted
    out = tmp_path / "s.jsonl"
    synthesize(model, tok, saes, targets, stub_generators([]), budget=3, out=out, seed=0)
    for changed in ({"seed": 1}, {"n_adversarial": 1}, {"seed_prompts": [NEUTRAL]}, {"attack_styles": ["x", "y"]}):
        with pytest.raises(SynthesisError, match="resume with the same settings"):
            synthesize(model, tok, saes, targets, stub_generators([]), budget=6, out=out, **changed)
    assert len(read_synthesized(out, verified_only=False)) == 3  # nothing was appended


def test_nothing_to_synthesize(planted, tmp_path):
    """Every target already well covered by the seed prompts: no attempt, no file, no error."""
    model, tok, saes, targets = planted
    log: list = []
    kept = synthesize(model, tok, saes, targets[:2], stub_generators(log), seed_prompts=[TRIGGER] * 3, budget=5,
                      out=tmp_path / "s.jsonl")
    assert kept == [] and log == [] and not (tmp_path / "s.jsonl").exists()


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
    with pytest.warns(QScopeWarning, match="pool has 2 prompts outside the seed set, fewer than the budget 6"):
        curves = compare_coverage(model, tok, saes, targets, stub_generators([]), seed_prompts=[NEUTRAL],
                                  pool=[NEUTRAL, "a dog ran", "rain today"], budgets=budgets, n_adversarial=2)
    assert set(curves) == {"feature-driven", "natural sampling", "random synthesis"}
    assert curves["feature-driven"] == pytest.approx([0, 2 / 3, 2 / 3, 2 / 3])  # the trigger fires both targets
    assert curves["natural sampling"] == [0, 0, 0, 0]  # the pool never contains the trigger
    assert all(a <= b for c in curves.values() for a, b in zip(c, c[1:], strict=False))
    assert plot_coverage_curves(curves, budgets, tmp_path / "c.png").stat().st_size > 0
    # a pool prompt already in the seed set is never drawn: the one budgeted draw is the trigger, for every seed
    for seed in range(5):
        natural = compare_coverage(model, tok, saes, targets, stub_generators([]), seed_prompts=[NEUTRAL],
                                   pool=[NEUTRAL, TRIGGER], budgets=[0, 1], seed=seed, rows=[])["natural sampling"]
        assert natural == pytest.approx([0, 2 / 3])


def test_baselines_are_explanation_free():
    """The random-synthesis baseline is given no targets; it asks the generators for generic prompts only."""
    from qscope_plugin.recipes.safety_synthesis import GENERIC_REQUEST, baseline_prompts

    log: list = []
    out = baseline_prompts(stub_generators(log), ["p1", "p2"], 5, seed=1)
    assert out["random synthesis"] == [NEUTRAL] * 5 and log == [("vanilla", GENERIC_REQUEST)] * 5
    seeds: list = []
    gens = stub_generators([])
    gens = type(gens)(gens.vanilla, gens.adversarial, gens.response, random=lambda i: seeds.append(i) or f"r{i}")
    again = baseline_prompts(gens, ["p1", "p2"], 4, seed=1)["random synthesis"]
    assert len(set(seeds)) == 4 and again == [f"r{i}" for i in seeds]  # seeded draws, one per prompt
    assert baseline_prompts(gens, ["p1"], 4, seed=1)["random synthesis"] == again


def test_curve_reuses_the_synthesized_rows(planted, tmp_path):
    from qscope_plugin.recipes.safety_synthesis import compare_coverage

    model, tok, saes, targets = planted
    kept = synthesize(model, tok, saes, targets, stub_generators([]), seed_prompts=[NEUTRAL], budget=6,
                      n_adversarial=2, out=tmp_path / "s.jsonl")
    log: list = []
    pool = [f"{NEUTRAL} {i}" for i in range(6)]
    curves = compare_coverage(model, tok, saes, targets, stub_generators(log), seed_prompts=[NEUTRAL],
                              pool=pool, budgets=[0, 1, 6], rows=read_synthesized(tmp_path / "s.jsonl",
                                                                                  verified_only=False))
    assert not any(kind == "adversarial" or text.startswith("trigger") for kind, text in log)  # no 2nd synthesis
    assert curves["feature-driven"] == pytest.approx([0, 2 / 3, 2 / 3]) and len(kept) == 6
    # rows that fire nothing: the curve follows the rows given, not a fresh synthesis
    fake = [dict(kept[0], prompt=NEUTRAL)]
    assert compare_coverage(model, tok, saes, targets, stub_generators([]), seed_prompts=[NEUTRAL], pool=pool,
                            budgets=[0, 6], rows=fake)["feature-driven"] == [0, 0]


def test_answer_parsing():
    assert strip_thinking("<think>7 maybe 0.9</think>\n\n0.25") == "0.25"
    assert strip_thinking("<think>cut off by the token limit 0.9") == ""
    cases = {"<think>I'd say 7</think> 0.8": 0.8, "8/10": 0.8, "Score: 8 / 10.": 0.8, "75%": 0.75, ".5": 0.5,
             "7": 0.0, "in 2024 I rate it 1": 1.0, "no idea": 0.0, "0.3, not 9/10": 0.3, "1.5 then 0.2": 0.2,
             "3/0": 0.0, "-0.4": 0.0, "0 to 1: 0.8": 0.8, "0-1 scale, 0.3": 0.3,
             "Score: 0.6 (between 0 and 1)": 0.6, "between 0 and 1, I say 1": 1.0}
    assert {a: parse_score(a) for a in cases} == pytest.approx(cases)
    cats = ("violence", "self-harm", "harm", "benign")
    assert parse_category("<think>violence? no</think> Benign.", cats) == "benign"
    assert parse_category("Category: self-harm", cats) == "self-harm"  # not "harm"
    assert parse_category("mostly harmful", cats, default="other") == "other"


class ScriptedLM(Backend):
    """Test-only backend: records the prompts it is given and answers a fixed text (no model runs)."""

    device = torch.device("cpu")

    def __init__(self, tok, answer: str) -> None:
        super().__init__(self, torch.nn.Identity())
        self.tok, self.answer, self.seen = tok, answer, []

    def generate(self, input_ids, attention_mask=None, **options):
        self.seen.append(self.tok.decode(input_ids[0]))
        return torch.tensor([self.tok(self.answer, add_special_tokens=False)["input_ids"]])


class NoTemplate:
    """A tokenizer without a chat template (delegates everything else)."""

    chat_template = None

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)


def test_chat_model_applies_the_chat_template():
    tok = qwen3_tokenizer()
    lm = ScriptedLM(tok, "<think>\nseven? 7</think>\n\n0.7<|im_end|>")
    chat = ChatModel(lm, tok)
    assert chat.judge()("mentions weapons") == pytest.approx(0.7)
    assert lm.seen[-1].startswith("<|im_start|>user\nFeature description: mentions weapons")
    assert lm.seen[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking=False
    ChatModel(lm, tok, enable_thinking=True)("hi")
    assert lm.seen[-1].endswith("<|im_start|>assistant\n")
    for raw in (ChatModel(lm, NoTemplate(tok)), ChatModel(lm, tok, chat_template=False)):
        assert raw("plain text") == "0.7" and lm.seen[-1] == "plain text"
    with pytest.raises(SynthesisError, match="no chat template"):
        ChatModel(lm, NoTemplate(tok), chat_template=True)


def test_categorizer_sets_target_categories(planted):
    model, tok, saes, targets = planted
    lm = ScriptedLM(tok, "Category: Benign")
    chat = ChatModel(lm, tok, categories=("weapons", "benign"))
    assert chat.categorizer()("x") == "benign" and "weapons, benign" in lm.seen[-1]
    assert ChatModel(ScriptedLM(tok, "<think>benign?</think>weapons"), tok).categorizer()("x") == "weapons"
    assert ChatModel(ScriptedLM(tok, "unsure"), tok).categorizer()("x") == "uncategorized"
    features = {1: [t.feature for t in targets[:2]]}
    built = build_targets(model, tok, saes, features, [TRIGGER], lambda ctx: "e", lambda e: 0.9,
                          categorize=chat.categorizer())
    assert [t.category for t in built] == ["benign", "benign"]
    kept = synthesize(model, tok, saes, [Target(1, targets[0].feature, "trigger", 0.9, "weapons")],
                      stub_generators([]), budget=1)
    assert kept[0]["label"] == "harmful"  # any non-benign category gets a refusal


@pytest.fixture
def cli_env(planted, monkeypatch):
    """`qscope safety ...` on the planted tiny model, every chat call scripted by its template (test-only)."""
    import qscope_plugin.cli as cli
    import qscope_plugin.cli.safety as safety_cli
    from qscope_plugin.recipes import chat

    model, tok, saes, targets = planted
    monkeypatch.setattr(safety_cli, "load_backbone", lambda args: (model, tok))
    monkeypatch.setattr(safety_cli, "load_saes", lambda source, layers, device=None: saes)
    calls: list = []

    def scripted(self, text, *, sample_seed=None):
        calls.append(text)
        if "risk category" in text:
            return "benign"
        if "Score:" in text:
            return "<think>maybe 0.1</think> 9/10"
        return TRIGGER if text.startswith("Write one user request") else NEUTRAL

    monkeypatch.setattr(chat.ChatModel, "__call__", scripted)
    return cli, targets, calls


def test_cli_targets_are_categorized(cli_env, tmp_path, capsys):
    cli, targets, calls = cli_env
    corpus, out = tmp_path / "corpus.txt", tmp_path / "t.jsonl"
    corpus.write_text(f"{TRIGGER}\n{NEUTRAL}\n")
    features = ",".join(str(t.feature) for t in targets[:2])
    assert cli.main(["safety", "targets", "--layers", "1", "--features", features, "--corpus", str(corpus),
                     "--out", str(out), "--categories", "weapons,benign"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["category"], r["score"]) for r in rows] == [("benign", 0.9), ("benign", 0.9)]
    assert "benign: 2" in capsys.readouterr().out and any("weapons, benign" in c for c in calls)


def test_cli_curve_does_not_synthesize_twice(cli_env, tmp_path, capsys):
    cli, targets, calls = cli_env
    tfile, seed, synth, pool = (tmp_path / name for name in ("t.jsonl", "seed.txt", "s.jsonl", "pool.txt"))
    save_targets(targets, tfile)
    seed.write_text(NEUTRAL + "\n")
    pool.write_text("a dog ran\nrain today\n")
    argv = ["safety", "synthesize", str(tfile), "--seed-prompts", str(seed), "--budget", "2", "--out", str(synth)]
    assert cli.main(argv) == 0
    with pytest.warns(QScopeWarning, match="pool has 2 prompts"):  # resumes
        assert cli.main([*argv[:-3], "4", "--out", str(synth), "--curve", str(tmp_path / "c.png"),
                         "--pool", str(pool)]) == 0
    rows = read_synthesized(synth, verified_only=False)
    vanilla = [c for c in calls if c.startswith("Write one user request")]
    assert len(rows) == 4 and len(vanilla) == 2  # 2 targets x 1 vanilla; the curve generated no target prompt
    printed = capsys.readouterr().out
    assert f"{sum(r['verified'] for r in rows)} verified example(s)" in printed.splitlines()[-2]
    assert (tmp_path / "c.png").stat().st_size > 0


def test_generators_sample_like_the_random_baseline_and_reproducibly(planted):
    """Feature-driven and random synthesis decode alike (seeded sampling); a seed fixes every draw."""
    model, tok, _, _ = planted
    chat = ChatModel(model, tok, max_new_tokens=8)
    draws = [chat.generators(seed=s).vanilla("weapons") for s in (0, 0, 1, 2, 3)]
    assert draws[0] == draws[1] and len(set(draws)) > 1  # reproducible per seed, different across seeds
    greedy = chat.generators(sample=False)
    assert greedy.vanilla("weapons") == chat(chat.template("vanilla").format(explanation="weapons"))
    assert greedy.adversarial("p", "role-play") == chat(chat.template("adversarial").format(prompt="p",
                                                                                          style="role-play"))


def test_cli_synthesis_options_reach_the_loop(cli_env, tmp_path, capsys):
    cli, targets, calls = cli_env
    tfile, synth, templates = tmp_path / "t.jsonl", tmp_path / "s.jsonl", tmp_path / "templates"
    save_targets(targets, tfile)
    shutil.copytree(TEMPLATES, templates)
    (templates / "vanilla.txt").write_text("Write one user request, edited: {explanation}\nRequest:")
    assert cli.main(["safety", "synthesize", str(tfile), "--budget", "6", "--out", str(synth), "--n-adversarial",
                     "1", "--attack-styles", "opera,haiku", "--templates", str(templates)]) == 0
    rows = read_synthesized(synth, verified_only=False)
    assert {r["variant"] for r in rows} <= {"vanilla", "opera", "haiku"} and len(rows) == 6
    assert rows[0]["settings"]["attack_styles"] == ["opera", "haiku"] and rows[0]["settings"]["n_adversarial"] == 1
    assert rows[0]["provenance"]["templates"] == str(templates) and rows[0]["provenance"]["chat_model"]
    assert any(c.startswith("Write one user request, edited:") for c in calls)


@pytest.mark.parametrize(("argv", "message"), [
    (["--curve", "c.png"], "--curve needs --pool"),
    (["--attack-styles", " , "], "--attack-styles is empty"),
    (["--templates", "missing-folder"], "is not a folder"),
])
def test_cli_synthesis_usage_errors(cli_env, tmp_path, capsys, monkeypatch, argv, message):
    cli, targets, _ = cli_env
    monkeypatch.chdir(tmp_path)
    save_targets(targets, tmp_path / "t.jsonl")
    assert cli.main(["safety", "synthesize", "t.jsonl", "--out", "s.jsonl", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_an_empty_targets_file_and_names_the_bad_option(cli_env, tmp_path, capsys):
    cli, _, _ = cli_env
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "p.txt").write_text("hello\n")
    assert cli.main(["safety", "coverage", str(tmp_path / "empty.jsonl"), "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "holds no targets" in capsys.readouterr().err
    assert cli.main(["safety", "targets", "--layers", "1", "--features", "0-99999", "--corpus",
                     str(tmp_path / "p.txt"), "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "feature 99999 is out of range for the layer-0 SAE (128 features" in capsys.readouterr().err


def test_targets_take_explanations_from_a_qscope_explain_file(planted):
    model, tok, saes, targets = planted
    features = {1: [t.feature for t in targets[:2]]}
    asked = []
    given = {(1, targets[0].feature): "written by qscope explain"}
    built = build_targets(model, tok, saes, features, [TRIGGER], lambda ctx: asked.append(ctx) or "asked",
                          lambda e: 0.9, explanations=given)
    assert [t.explanation for t in built] == ["written by qscope explain", "asked"] and len(asked) == 1
