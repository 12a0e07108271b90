"""Hostile requests to every tab, under resource limits: each call returns its outputs and a status (a message
for bad input), never raises, stays within a memory bound and within a bound on the model's work.

Hypothesis drives the Explorer's public methods (what Gradio calls) with huge ranges (``0-999999999``), huge and
empty texts, control characters, unpaired surrogates, NaN/inf, negative and enormous numbers and wrong types.
Every call runs under ``RLIMIT_AS`` = current size + ``HEADROOM`` (a runaway allocation fails in the test instead
of the machine); its peak RSS growth is measured and bounded. The work bound is counted, not timed: the tokens
the model's embedding sees per call must stay within ``WORK_MULTIPLE`` model contexts plus one harvest of the
Feature tab's texts, so no request costs more than a fixed multiple of a normal one.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qscope_testing import ResourceBound

from qscope_plugin.app.explorer import Explorer, demo_texts
from qscope_plugin.models import DEMO_MODEL_DIR

pytestmark = pytest.mark.skipif(not DEMO_MODEL_DIR.is_dir(), reason="demo assets not built")

HEADROOM = 2 << 30
"""Address space a call may add (its allocations, torch's and the tokenizer's thread arenas)."""
MEMORY_BOUND = 1 << 30
"""Peak RSS growth a call may cause: 0-999999999 positions used to take 23 GiB."""
WORK_MULTIPLE = 4
"""Steer's worst case: a generation and a scoring forward each, steered and unsteered, of prompt + new tokens."""
EXAMPLES = 30

HUGE_TEXTS = ["", " ", "\x00", "x" * 1_000_000, "hi " * 2000, "今天" * 400, "\ud800", "a\udfffb", "\u202eevil\n\t\r",
              "<script>alert(1)</script>", "%s{0}\\n", "🙂" * 300]
NUMBERS = st.one_of(st.integers(-2, 6), st.sampled_from([28, 1535, 1536, 2**31, -2**63, 10**30]),
                    st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
                    st.sampled_from(["3", "", "1e308", [1], {"a": 1}]))
TEXTS = st.one_of(st.sampled_from(HUGE_TEXTS), st.text(st.characters(exclude_categories=()), max_size=40),
                  st.none(), st.integers())
POSITIONS = st.one_of(st.sampled_from(["all", "0", "0-999999999", "0,1,5", "3-7", "7-3", "prompt", "generated", "",
                                       "1" * 40, "0-" + "9" * 5000, ",".join(map(str, range(5000))), "-1", None]),
                      st.text(max_size=12))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def explorer() -> Explorer:
    return Explorer.load(texts=demo_texts()[:40])


@pytest.fixture(scope="module")
def work(explorer):
    """Tokens the model's embedding sees, appended per forward, and the bound a call's total must stay under."""
    seen: list[int] = []
    handle = explorer.model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(
        args[0].numel()))
    texts = sum(len(explorer.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in explorer.texts)
    yield seen, WORK_MULTIPLE * explorer.max_tokens + texts
    handle.remove()


ANSWERED: dict[str, int] = {}
"""Calls per method that returned a result (an empty status): the fuzzing must reach the model, not only refuse."""


def _call(explorer, work, method: str, /, **kwargs) -> tuple:
    seen, bound = work
    seen.clear()
    with ResourceBound(HEADROOM) as used:
        out = getattr(explorer, method)(**kwargs)
    assert isinstance(out, tuple) and isinstance(out[-1], str), out
    assert used.growth <= MEMORY_BOUND, f"{method} grew the peak RSS by {used.growth / 2**20:.0f} MiB"
    assert sum(seen) <= bound, f"{method} ran {sum(seen)} tokens through the model, more than {bound}"
    ANSWERED[method] = ANSWERED.get(method, 0) + (out[-1] == "")
    return out


@st.composite
def _one_hostile(draw: st.DrawFn, valid: dict[str, st.SearchStrategy],
                 hostile: dict[str, st.SearchStrategy]) -> dict[str, object]:
    """Keyword arguments that are all valid but (mostly) one, drawn hostile: each call reaches the check it aims
    at, and a call with no hostile argument reaches the model."""
    target = draw(st.sampled_from([None, *hostile]))
    return {name: draw(hostile[name] if name == target else strategy) for name, strategy in valid.items()}


LAYER, FEATURE = st.integers(0, 3), st.integers(0, 1535)
SHORT = st.sampled_from(["今天早上我喝了一杯热茶", "The weather today is", "hi", "a b c d e f g"])


def test_analyze(explorer, work):
    @SETTINGS
    @given(kwargs=_one_hostile({"text": SHORT, "layer": LAYER, "top_n": st.integers(1, 64)},
                               {"text": TEXTS, "layer": NUMBERS, "top_n": NUMBERS}))
    def run(kwargs):
        _call(explorer, work, "analyze", **kwargs)

    run()
    assert ANSWERED["analyze"] > 0


def test_compare(explorer, work):
    valid = {"text_a": SHORT, "text_b": SHORT, "first_layer": LAYER, "last_layer": st.just(3),
             "top_k": st.integers(1, 100), "method": st.sampled_from(["rate", "mean"]),
             "exclude_first_token": st.booleans(), "drop_shared_tokens": st.booleans(),
             "drop_common_prefix": st.booleans()}
    hostile = {"text_a": TEXTS, "text_b": TEXTS, "first_layer": NUMBERS, "last_layer": NUMBERS, "top_k": NUMBERS,
               "method": st.sampled_from(["x", "", None])}

    @SETTINGS
    @given(kwargs=_one_hostile(valid, hostile))
    def run(kwargs):
        table, kept, status = _call(explorer, work, "compare", **kwargs, differences={(3, 28): 0.5})
        assert isinstance(kept, dict) and (status == "" or kept == {(3, 28): 0.5})

    run()
    assert ANSWERED["compare"] > 0


def test_steer(explorer, work):
    valid = {"prompt": SHORT, "layer": LAYER, "feature": FEATURE,
             "preset": st.sampled_from(["Light", "Medium", "Strong", "Custom"]), "custom_alpha": st.floats(-50, 50),
             "direction_norm": st.sampled_from(["raw", "unit"]), "positions": st.sampled_from(["all", "0", "0-1"]),
             "steer_generated": st.booleans(), "decoding": st.sampled_from(["greedy", "sampled"]),
             "temperature": st.floats(0.1, 2), "top_p": st.floats(0.1, 1), "seed": st.integers(0, 2**31 - 1),
             "max_new_tokens": st.integers(1, 8)}
    hostile = {"prompt": TEXTS, "layer": NUMBERS, "feature": NUMBERS, "preset": st.sampled_from(["x", "", None]),
               "custom_alpha": NUMBERS, "direction_norm": st.sampled_from(["x", None]), "positions": POSITIONS,
               "decoding": st.sampled_from(["beam", None]), "temperature": NUMBERS, "top_p": NUMBERS, "seed": NUMBERS,
               "max_new_tokens": st.one_of(NUMBERS, st.sampled_from([257, 4096, 10**9]))}

    @SETTINGS
    @given(kwargs=_one_hostile(valid, hostile))
    def run(kwargs):
        _call(explorer, work, "steer", **kwargs)

    run()
    assert ANSWERED["steer"] > 0


def test_feature_and_presets(explorer, work):
    @settings(SETTINGS, max_examples=20)
    @given(kwargs=_one_hostile({"layer": LAYER, "feature": FEATURE}, {"layer": NUMBERS, "feature": NUMBERS}))
    def run(kwargs):
        _call(explorer, work, "feature", **kwargs)
        assert explorer.presets_text(**kwargs, differences={(3, 28): float("nan")}).startswith("Presets: ")

    run()
    assert ANSWERED["feature"] > 0
