"""Every generation path refuses a prompt plus new tokens longer than the model's context before generating.

The check is one (``Backend.check_generation``), shared by steering, the repetition recipes, the code-switch
ratio of ``qscope sasft eval`` and the local chat model that writes safety-synthesis prompts. The demo model's
context is 512 positions: a prompt that fits alone is refused once the new tokens push it past, and the same
prompt with a few new tokens runs (the refusal is the sum, not the prompt).
"""

from __future__ import annotations

import pytest

from qscope_plugin.backends import as_backend
from qscope_plugin.errors import ContextLengthError
from qscope_plugin.store import DEMO_RELEASE, load_sae

LONG = "hi " * 150
"""Fits the demo's 512 positions alone (asserted below), not with 256 new tokens."""
PAST = "past the model's context of 512 positions"


@pytest.fixture(scope="module")
def model_tok(demo_model):
    model, tok = demo_model
    assert as_backend(model).context_length == 512
    assert 256 < len(tok(LONG, add_special_tokens=False)["input_ids"]) < 512 - 8
    return model, tok


def test_repetition_extend(model_tok):
    from qscope_plugin.recipes.repetition import extend

    model, tok = model_tok
    with pytest.raises(ContextLengthError, match=PAST):
        extend(model, tok, ["short", LONG], max_new_tokens=256)  # the longest prompt of the batch counts
    assert extend(model, tok, [LONG], max_new_tokens=2)[0].startswith(LONG)


def test_repetition_causal_check(model_tok):
    from qscope_plugin.recipes.repetition import causal_check
    from qscope_plugin.recipes.steering import SteeringSpec

    model, tok = model_tok
    saes = {3: load_sae(DEMO_RELEASE, 3)}
    with pytest.raises(ContextLengthError, match=PAST):
        causal_check(model, tok, [LONG], SteeringSpec.single(3, 5, 1.0), saes, [1.0], max_new_tokens=256)


def test_repetition_rollout_groups(model_tok):
    from qscope_plugin.recipes.repetition import rollout_groups
    from qscope_plugin.recipes.steering import SteeringSpec

    model, tok = model_tok
    saes = {3: load_sae(DEMO_RELEASE, 3)}
    ids = tok(LONG, add_special_tokens=False)["input_ids"]
    with pytest.raises(ContextLengthError, match=PAST):
        rollout_groups(model, [ids], SteeringSpec.single(3, 5, 1.0), saes, group_size=2, max_new_tokens=256)


def test_code_switch_ratio(model_tok):
    from qscope_plugin.recipes.code_switch import code_switch_ratio

    model, tok = model_tok
    with pytest.raises(ContextLengthError, match=PAST):
        code_switch_ratio(model, tok, ["hello", LONG], languages=["zh"], max_new_tokens=256, batch_size=1)
    assert len(code_switch_ratio(model, tok, [LONG], languages=["zh"], max_new_tokens=2).completions) == 1


def test_sasft_eval_cli_exits_2(tmp_path, monkeypatch, capsys):
    from qscope_plugin.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sasft", "eval", LONG, "--languages", "zh", "--max-new-tokens", "256"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qscope")]
    assert len(errors) == 1 and PAST in errors[0], errors


def test_safety_synthesis_generation(model_tok, tmp_path):
    from qscope_plugin.recipes.chat import ChatModel
    from qscope_plugin.recipes.safety_synthesis import Target, synthesize

    model, tok = model_tok
    saes = {3: load_sae(DEMO_RELEASE, 3)}
    generators = ChatModel(model, tok, max_new_tokens=510).generators()  # any template prompt pushes it past
    with pytest.raises(ContextLengthError, match=PAST):
        synthesize(model, tok, saes, [Target(3, 5, "violent requests", 0.9)], generators, budget=1,
                   out=tmp_path / "s.jsonl")
