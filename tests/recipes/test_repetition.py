"""Repetition (report §8): detector, repeat ratio, (R32) features, steered rollout groups, causal check."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qscope_testing import tiny_qwen3, tiny_saes

from qscope_plugin.backends import as_backend
from qscope_plugin.errors import FeatureOutOfRangeError
from qscope_plugin.models import DEMO_MODEL_DIR
from qscope_plugin.recipes.repetition import (
    RepeatSpan,
    RepetitionError,
    RepetitionFeatures,
    _add_at_decode,
    causal_check,
    find_repeats,
    is_repetitive,
    old_logprobs,
    repeat_ratio,
    repeated_fraction,
    repeating_suffix,
    repetition_features,
    repetition_reward,
    repetition_spec,
    rollout_groups,
)
from qscope_plugin.recipes.steering import SteeringError, SteeringSpec, steering_vectors

demo = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo assets not built")


def _brute(ids: list[int], ngram: int, min_repeats: int, max_period: int) -> list[RepeatSpan]:
    """The definition read literally: every maximal periodic interval, smaller units first, overlaps dropped."""
    found: list[RepeatSpan] = []
    n = len(ids)
    for p in range(ngram, max_period + 1):
        for s in range(n):
            for e in range(s + min_repeats * p, n + 1):
                periodic = all(ids[i] == ids[i - p] for i in range(s + p, e))
                left_max = s == 0 or ids[s + p - 1] != ids[s - 1]
                right_max = e == n or ids[e] != ids[e - p]
                if periodic and left_max and right_max and not any(f.start < e and s < f.end for f in found):
                    found.append(RepeatSpan(s, e, p))
    return sorted(found, key=lambda x: x.start)


def test_hand_counted_cases():
    ids = [5, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 9]
    assert find_repeats(ids) == [RepeatSpan(1, 11, 3)]
    span = find_repeats(ids)[0]
    assert span.occurrences() == [(1, 10), (2, 8), (3, 9)]  # 1 appears last at 10 (partial fourth copy)
    assert repeated_fraction(ids) == pytest.approx(7 / 12)
    assert not is_repetitive(ids) and is_repetitive(ids, endless=False)
    assert is_repetitive([4, 7, 8, 7, 8, 7, 8, 7])  # loops to the end
    assert find_repeats([1, 1, 1, 1]) == [RepeatSpan(0, 4, 1)]  # period 1 wins over 2
    assert find_repeats([1, 1, 2, 1, 1]) == []
    assert repeat_ratio([[1, 2, 1, 2, 1, 2], [1, 2, 3], [3, 3, 3, 0]]) == pytest.approx(1 / 3)
    assert repetition_reward([[1, 2, 1, 2, 1, 2], [1, 2, 3]]) == [pytest.approx(-4 / 6 - 1.0), 0.0]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=18), st.integers(1, 2), st.integers(2, 3), st.integers(2, 5))
def test_detector_equals_brute_force(ids, ngram, min_repeats, max_period):
    assert find_repeats(ids, ngram=ngram, min_repeats=min_repeats, max_period=max_period) == \
        _brute(ids, ngram, min_repeats, max_period)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=12), st.lists(st.integers(100, 120), min_size=2,
       max_size=4, unique=True), st.integers(3, 5), st.integers(0, 12))
def test_planted_copies_are_found(text, unit, copies, where):
    """A unit of distinct tokens absent from the text, copied ``copies`` times, is one span of that period."""
    where = min(where, len(text))
    ids = text[:where] + unit * copies + text[where:]
    spans = [s for s in find_repeats(ids, max_period=4) if s.start <= where < s.end]
    assert spans == [RepeatSpan(where, where + len(unit) * copies, len(unit))]
    assert (spans[0].end == len(ids)) == (where == len(text))  # the planted loop is endless iff it ends the text
    if where == len(text):  # (the random text may hold a loop of its own, so only this direction is certain)
        assert is_repetitive(ids, max_period=4)
    for first, last in spans[0].occurrences():
        assert ids[first] == ids[last] and last - first == len(unit) * (copies - 1)


def _suffix_oracle(ids: list[int], ngram: int, min_repeats: int, max_period: int) -> RepeatSpan | None:
    """The documented definition by enumeration: every suffix u^k, k >= min_repeats whole copies of a unit of
    ngram..max_period tokens; the longest, the shortest unit among equals."""
    n, best = len(ids), None
    for p in range(ngram, max_period + 1):
        for k in range(min_repeats, n // p + 1):
            if ids[n - k * p :] == ids[n - p :] * k and (best is None or k * p > best.end - best.start):
                best = RepeatSpan(n - k * p, n, p)
    return best


def _repeated_oracle(ids: list[int], ngram: int, min_repeats: int, max_period: int) -> float:
    """Tokens that repeat the one a unit earlier inside some interval of >= min_repeats copies, by enumeration."""
    n, repeated = len(ids), set()
    for p in range(ngram, max_period + 1):
        for s in range(n):
            for e in range(s + min_repeats * p, n + 1):
                if all(ids[i] == ids[i - p] for i in range(s + p, e)):
                    repeated.update(range(s + p, e))
    return len(repeated) / n if n else 0.0


@st.composite
def _looping(draw: st.DrawFn) -> list[int]:
    """Random text over a small alphabet (periods overlap by chance), often with a planted tail: a unit (itself
    possibly a loop, e.g. 7 7 7 9) copied a few times, sometimes cut mid-copy or followed by junk."""
    tokens = st.integers(0, 3)
    ids = draw(st.lists(tokens, max_size=10))
    if draw(st.booleans()):
        inner = draw(st.lists(tokens, min_size=1, max_size=3))
        unit = inner * draw(st.integers(1, 4)) + draw(st.lists(tokens, max_size=2))  # nested when inner repeats
        tail = unit * draw(st.integers(1, 5))
        ids += tail[: len(tail) - draw(st.integers(0, len(unit) - 1))]  # a partial last copy now and then
        ids += draw(st.lists(tokens, max_size=2))
    return ids


@settings(max_examples=400, deadline=None)
@given(_looping(), st.integers(1, 3), st.integers(2, 4), st.integers(1, 8))
def test_detector_is_the_documented_definition(ids, ngram, min_repeats, max_period):
    max_period = max(max_period, ngram)
    params = {"ngram": ngram, "min_repeats": min_repeats, "max_period": max_period}
    expected = _suffix_oracle(ids, ngram, min_repeats, max_period)
    assert repeating_suffix(ids, **params) == expected
    assert is_repetitive(ids, **params) == (expected is not None)
    assert repeated_fraction(ids, **params) == pytest.approx(_repeated_oracle(ids, ngram, min_repeats, max_period))
    assert is_repetitive(ids, endless=False, **params) == bool(find_repeats(ids, **params))
    reward = -repeated_fraction(ids, **params) - (expected is not None)
    assert repetition_reward([ids], **params) == [pytest.approx(reward)]


@pytest.mark.parametrize(("ids", "suffix", "share"), [
    ([1, 2, 1, 2, 1, 2, 1, 3, 1, 3, 1, 3], RepeatSpan(6, 12, 2), 9 / 12),  # '1 3' x3 overlaps the '1 2' run
    ([7, 7, 7, 9] * 3, RepeatSpan(0, 12, 4), 10 / 12),  # the period-1 runs do not hide the period-4 loop
    ([5, 1, 1, 1, 2, 1, 2, 1, 2], RepeatSpan(3, 9, 2), 6 / 9),
    ([5, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 9], None, 7 / 12),  # a loop that was left: not endless
    ([3, 3, 3, 3, 3], RepeatSpan(0, 5, 1), 4 / 5),  # the shortest unit of the longest suffix
])
def test_issue_examples(ids, suffix, share):
    assert repeating_suffix(ids) == suffix
    assert is_repetitive(ids) == (suffix is not None)
    assert repeated_fraction(ids) == pytest.approx(share)
    assert repetition_reward([ids]) == [pytest.approx(-share - (suffix is not None))]


def test_find_repeats_keeps_what_its_docstring_says():
    assert find_repeats([1, 2, 1, 2, 1, 2, 1, 3, 1, 3, 1, 3]) == [RepeatSpan(0, 7, 2)]  # [6, 12) shares token 6
    assert find_repeats([7, 7, 7, 9] * 3) == [RepeatSpan(0, 3, 1), RepeatSpan(4, 7, 1), RepeatSpan(8, 11, 1)]
    assert find_repeats([1, 1, 1, 1]) == [RepeatSpan(0, 4, 1)]


def test_repeat_ratio_on_planted_tails_against_the_definition():
    """The issue's check: random texts with planted tails, the repeat ratio against the enumerated definition."""
    import random

    rng = random.Random(0)
    cases = []
    for _ in range(300):
        unit = [rng.randrange(4) for _ in range(rng.randint(1, 4))]
        unit = unit * rng.randint(1, 3) + [rng.randrange(4)] * rng.randint(0, 1)
        cases.append([rng.randrange(4) for _ in range(rng.randint(0, 8))] + unit * rng.randint(1, 4)
                     + [rng.randrange(4) for _ in range(rng.randint(0, 1))])
    expected = sum(_suffix_oracle(c, 1, 3, 32) is not None for c in cases) / len(cases)
    assert 0.1 < expected < 0.9 and repeat_ratio(cases) == pytest.approx(expected)


@demo
@pytest.mark.parametrize("text", ["I said ha ha ha! ha ha ha! ha ha ha!",
                                  "She said: no no no, no no no, no no no, no no no,"])
def test_demo_tokenizer_texts_that_loop_to_the_end(text):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)(text, add_special_tokens=False)["input_ids"]
    suffix = repeating_suffix(ids)
    assert suffix is not None and suffix.end == len(ids) and suffix.copies >= 3 and is_repetitive(ids)
    assert all(s.period == 1 for s in find_repeats(ids))  # the display spans alone miss it (the bug)
    assert repetition_reward([ids])[0] < -1


def test_a_long_loop_is_one_suffix():
    """A loop of 21,000 tokens (longer than any completion GRPO samples) is measured whole."""
    unit = list(range(100, 107))
    ids = [1, 2, 3] + unit * 3000
    assert repeating_suffix(ids) == RepeatSpan(3, len(ids), 7)
    assert repeated_fraction(ids) == pytest.approx((len(ids) - 10) / len(ids))


def test_bad_parameters_are_one_error():
    with pytest.raises(RepetitionError, match="min_repeats"):
        find_repeats([1, 2], min_repeats=1)
    with pytest.raises(RepetitionError, match="no completions"):
        repeat_ratio([])


@pytest.fixture(scope="module")
def tiny():
    model = tiny_qwen3(n_layers=3, vocab_size=300)
    return model, tiny_saes(model, d_sae=32, k=4)


def _spec(alpha=40.0):
    return SteeringSpec.single(1, 5, alpha, positions="generated")


def test_rollout_groups_flag_and_unsteered_logprobs(tiny):
    model, saes = tiny
    prompt = [11, 42, 7, 99, 3]
    torch.manual_seed(0)
    (group,) = rollout_groups(model, [prompt], _spec(), saes, group_size=4, max_new_tokens=12)
    assert group.steered == [False, False, False, True]
    torch.manual_seed(0)
    plain = as_backend(model).generate(torch.tensor([prompt] * 4), max_new_tokens=12, do_sample=True,
                                       pad_token_id=0)
    assert group.completion_ids[:3] == plain.tolist()[:3]  # normal rows: token-identical, hook or not
    assert group.completion_ids[3] != plain.tolist()[3]  # the steered one did change
    # old log-probs = the unsteered model's, on the same padded batch, exactly; and per row alone, closely
    assert group.logprobs == old_logprobs(model, prompt, group.completion_ids)
    for ids, lp in zip(group.completion_ids, group.logprobs, strict=True):
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        alone = logits.gather(-1, torch.tensor(ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lp), alone, atol=1e-5, rtol=1e-5)
    # ... and not the steered model's: the steered row's log-probs move under the steering edit
    vectors = steering_vectors(_spec(), saes)
    with _add_at_decode(as_backend(model), vectors, torch.tensor([len(prompt)])):
        steered_lp = old_logprobs(model, prompt, [group.completion_ids[3]])
    assert steered_lp[0] != group.logprobs[3]


def test_rollout_bad_input(tiny):
    model, saes = tiny
    with pytest.raises(RepetitionError, match="G >= 2"):
        rollout_groups(model, [[1, 2]], _spec(), saes, group_size=1, max_new_tokens=2)
    with pytest.raises((RepetitionError, SteeringError), match="finite"):
        rollout_groups(model, [[1, 2]], _spec(float("nan")), saes, group_size=2, max_new_tokens=2)
    with pytest.raises(FeatureOutOfRangeError):
        rollout_groups(model, [[1, 2]], SteeringSpec.single(1, 999, 1.0), saes, group_size=2, max_new_tokens=2)
    with pytest.raises(RepetitionError, match="finite"):
        repetition_spec({1: [5]}, float("inf"))


@pytest.fixture(scope="module")
def demo_setup():
    from qscope_plugin import load_sae
    from qscope_plugin.models import default_model, default_release, load_model

    model, tok = load_model(default_model())
    return model, tok, {n: load_sae(default_release(), n) for n in range(4)}


@demo
def test_planted_repetition_raises_the_planted_feature(demo_setup):
    """Plant a feature that reads h(t_last) − h(t_first) at layer 2; (R32) must rank it first, with the score a
    brute-force dense encode gives."""
    from qscope_plugin.sae import SAE_KEYS, QwenScopeSAE

    model, tok, saes = demo_setup
    phrase = "我就买了，"
    texts = [f"今天天气很好。{phrase * 4}", f"他说：{phrase * 3}然后走了。", "没有重复的句子。"]
    backend = as_backend(model)
    pairs, hidden = [], []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        h = backend.capture(torch.tensor([ids]), layers=[2])[2][0].float()
        p = [x for s in find_repeats(ids) for x in s.occurrences()]
        pairs.append(p)
        hidden.append(h)
    direction = torch.cat([h[[b for _, b in p]] - h[[a for a, _ in p]] for h, p in zip(hidden, pairs, strict=True)
                           if p]).mean(0)
    planted = 7
    sd = {k: getattr(saes[2], k).clone() for k in SAE_KEYS}
    sd["W_enc"][planted] = 50 * direction / direction.norm()
    sae = QwenScopeSAE(sd, saes[2].cfg)
    found = repetition_features(model, tok, texts, {2: sae}, n_features=3)
    assert found.features[2][0] == planted and found.n_texts == 2
    brute = []
    for h, p in zip(hidden, pairs, strict=True):
        if p:
            z = sae.encode(h)
            brute.append((z[[b for _, b in p]] - z[[a for a, _ in p]]).mean(0))
    torch.testing.assert_close(torch.tensor(found.scores[2][0]), torch.stack(brute).mean(0)[planted].float(),
                               atol=1e-4, rtol=1e-4)
    assert RepetitionFeatures.from_json(found.to_json()) == found


@demo
def test_no_repeats_and_bad_features_are_clear_errors(demo_setup):
    model, tok, saes = demo_setup
    with pytest.raises(RepetitionError, match="no repeated tokens"):
        repetition_features(model, tok, ["今天早上我喝了一杯热茶。"], saes)
    spec = repetition_spec({1: [10 ** 6]}, 1.0)
    with pytest.raises(FeatureOutOfRangeError):
        causal_check(model, tok, ["今天"], spec, saes, [1.0], max_new_tokens=2)


@demo
def test_grpo_trainer_steps_with_the_steered_rollout(demo_setup, tmp_path):
    pytest.importorskip("trl")
    import copy

    from datasets import Dataset
    from trl import GRPOTrainer

    from qscope_plugin.adapters.trl import dapo_config, repetition_reward_func, repetition_rollout_func

    model, tok, saes = demo_setup
    model = copy.deepcopy(model)
    seen: list[tuple[list[bool], list[list[int]]]] = []

    def flagged(completion_ids, steered, **kwargs):
        """Records what TRL forwards; the steered completion is the group's negative."""
        seen.append((list(steered), [list(c) for c in completion_ids]))
        return [-1.0 if s else 0.0 for s in steered]

    before = model.model.layers[3].mlp.down_proj.weight.detach().clone()
    rows = Dataset.from_list([{"prompt": "今天早上我"}, {"prompt": "这个城市的"}])
    args = dapo_config(str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                       max_completion_length=8, learning_rate=1e-3, use_cpu=True, logging_steps=1, seed=0)
    trainer = GRPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tok,
                          reward_funcs=[flagged, repetition_reward_func()],
                          rollout_func=repetition_rollout_func(repetition_spec({2: [3]}, 20.0), saes))
    trainer.train()
    assert seen and all(flags == [False, True, False, True] for flags, _ in seen)
    assert all(len(c) <= 8 for _, ids in seen for c in ids)
    assert not torch.equal(before, model.model.layers[3].mlp.down_proj.weight)
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 2


@demo
def test_cli_features_then_check(tmp_path, capsys):
    import json

    from qscope_plugin.cli import main

    out = tmp_path / "rep.json"
    looping = ["医生建议大家不要去，" + "我就买了，" * 4, "今天早上，" + "我说我，" * 4]
    assert main(["repetition", "features", *looping, "--n-features", "2", "--out", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["n_texts"] == 2 and all(len(f) == 2 for f in shown["features"].values())
    assert main(["repetition", "check", "今天早上", "医生建议", "--features", str(out), "--alphas=-4,4",
                 "--steer-layers", "2", "--max-new-tokens", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["alpha"] for r in rows] == [-4.0, 4.0] and all(0 <= r["features"] <= 1 for r in rows)


@demo
@pytest.mark.parametrize(("argv", "message"), [
    (["check", "x", "--features", "missing.json", "--alphas", "nan"], "finite"),
    (["check", "x", "--features", "missing.json"], "'missing.json' cannot be read"),
    (["features", "没有重复的句子。", "--out", "x.json"], "no repeated tokens"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    from qscope_plugin.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["repetition", *argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qscope")]  # not progress
    assert len(errors) == 1 and message in errors[0]


def test_groups_batched_under_left_padding(tiny):
    """Prompts of different lengths share one generate; each group's old log-probs are still its own forward."""
    model, saes = tiny
    prompts = [[11, 42, 7, 99, 3], [5, 6], [8, 9, 10]]
    torch.manual_seed(1)
    groups = rollout_groups(model, prompts, _spec(), saes, group_size=3, max_new_tokens=6, groups_per_batch=2)
    assert [g.prompt_ids for g in groups] == prompts and all(g.steered == [False, False, True] for g in groups)
    for g in groups:
        assert all(len(c) == 6 for c in g.completion_ids)
        assert g.logprobs == old_logprobs(model, g.prompt_ids, g.completion_ids)
