"""The callbacks behind the app's tabs (``Explorer``), without a browser, on the embedded demo.

What a tab shows is checked against a direct computation: hooks and the SAE for Analyze and Compare, the steering
recipe for Steer, the card recipe for Feature. Bad input must come back as a message, never as an exception.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from qscope_plugin.app.dashboard import card_html
from qscope_plugin.app.explorer import AppInputError, Explorer, demo_texts
from qscope_plugin.app.views import completion_html
from qscope_plugin.errors import IndexOutOfRangeError
from qscope_plugin.hooks import capture_residual
from qscope_plugin.models import DEMO_MODEL_DIR
from qscope_plugin.recipes.inspection import feature_cards
from qscope_plugin.recipes.steering import Sampling, SteeringSpec, generate
from qscope_plugin.store import DEMO_RELEASE, load_sae

pytestmark = pytest.mark.skipif(not DEMO_MODEL_DIR.is_dir(), reason="demo assets not built")

TEXT_A, TEXT_B = "我今天早上喝了一杯热茶。", "This morning I drank a cup of hot tea."


@pytest.fixture(scope="module")
def explorer() -> Explorer:
    return Explorer.load(texts=demo_texts()[:40])


def dense_codes(explorer: Explorer, text: str, layer: int) -> tuple[list[int], torch.Tensor]:
    """Token ids and ``(T, d_sae)`` codes of ``text`` at ``layer``: one hooked forward and the SAE, by hand."""
    ids = explorer.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), capture_residual(explorer.model, layer) as acts:
        explorer.model(ids)
    return ids[0].tolist(), load_sae(DEMO_RELEASE, layer).encode(acts[layer][0]).float()


def test_analyze_shows_each_tokens_strongest_features(explorer):
    text = "This morning I drank a cup of hot tea."
    table, status = explorer.analyze(text, 2, 4)
    assert status == ""
    rows = re.findall(r"<tr><td class=\"num\">(\d+)</td>.*?</tr>", table)
    _, z = dense_codes(explorer, text, 2)
    assert [int(r) for r in rows] == list(range(z.shape[0]))
    for row, codes in zip(re.findall(r"<tr><td class=\"num\">\d+</td>(.*?)</tr>", table), z, strict=True):
        shown = [(int(f), float(v)) for f, v in re.findall(r'data-feature="(\d+)">\d+: ([\d.]+)<', row)]
        top = codes.topk(4)
        assert [f for f, _ in shown] == top.indices.tolist()
        assert [v for _, v in shown] == pytest.approx(top.values.tolist(), abs=5e-3)


@pytest.mark.parametrize(("method", "shown"), [("rate", "firing rate, text A"), ("mean", "mean activation, text A")])
def test_compare_ranks_by_the_difference_of_the_two_texts(explorer, method, shown):
    """(R2) / (R1) by hand: first token and tokens common to both texts dropped, firing rates (or mean
    activations) over what is left, ranked by |A − B|."""
    table, found, status = explorer.compare(TEXT_A, TEXT_B, 1, 3, 4, method, True, True, False, {})
    assert status == "" and shown in table
    for layer in (1, 2, 3):
        (ids_a, z_a), (ids_b, z_b) = dense_codes(explorer, TEXT_A, layer), dense_codes(explorer, TEXT_B, layer)
        shared = set(ids_a) & set(ids_b)
        kept = [z[[t for t in range(1, len(ids)) if ids[t] not in shared]] for ids, z in ((ids_a, z_a), (ids_b, z_b))]
        side = [(z > 0).float().mean(0) if method == "rate" else z.mean(0) for z in kept]
        diff = side[0] - side[1]
        mine = {f: d for (n, f), d in found.items() if n == layer}
        assert len(mine) == 4
        assert sorted(abs(d) for d in mine.values()) == pytest.approx(sorted(diff.abs().topk(4).values.tolist()))
        assert all(d == pytest.approx(float(diff[f]), abs=1e-5) for f, d in mine.items())


def test_identical_texts_compare_to_no_feature_and_steer_keeps_its_fixed_presets(explorer):
    """The reviewer's repro: equal texts gave three rows of 0, and Steer "Medium" then ran with α = 0."""
    table, kept, status = explorer.compare("the cat", "the cat", 3, 3, 3, "rate", True, True, False, {(3, 1): 0.5})
    assert table == "" and kept == {(3, 1): 0.5} and "every position of the positive (A) texts" in status
    table, found, status = explorer.compare("the cat", "the cat", 3, 3, 3, "rate", True, False, False, {})
    assert status == "" and found == {} and "No features" in table
    steered, _, status = explorer.steer("今天早上", 3, 5, "Medium", differences={(3, 5): 0.0}, max_new_tokens=2)
    assert status == "" and "α = 20," in steered


def test_steer_equals_the_recipe_and_uses_presets_calibrated_by_compare(explorer):
    _, found, _ = explorer.compare(TEXT_A, TEXT_B, 3, 3, 3, "rate", True, False, False, {})
    (layer, feature), r = next(iter(found.items()))
    assert r != 0
    assert f"r = {r:+.4g}" in explorer.presets_text(layer, feature, found)
    steered, unsteered, status = explorer.steer("今天早上", layer, feature, "Medium", differences=found,
                                                max_new_tokens=8)
    assert status == ""
    saes = {layer: load_sae(DEMO_RELEASE, layer)}
    direct = generate(explorer.model, explorer.tokenizer, "今天早上", SteeringSpec.single(layer, feature, 2 * abs(r)),
                      saes, max_new_tokens=8, top_alternatives=10)
    assert steered == completion_html(f"Steered (α = {2 * abs(r):.4g}, raw direction)", direct.steered)
    assert unsteered == completion_html("Unsteered", direct.unsteered)
    strong, plain, _ = explorer.steer("今天早上", layer, feature, "Strong", max_new_tokens=8)  # no Compare: α = 100
    assert "α = 100," in strong and strong.split("</h4>")[1] != plain.split("</h4>")[1]


def test_positions_and_sampling_reach_the_recipe(explorer):
    prompt, layer, feature = "今天早上我", 3, 28
    saes = {layer: load_sae(DEMO_RELEASE, layer)}
    steered, _, status = explorer.steer(prompt, layer, feature, "Custom", 60.0, "unit", "0-1", False, "sampled",
                                        0.8, 0.9, 5, 6)
    assert status == ""
    spec = SteeringSpec.single(layer, feature, 60.0, direction_norm="unit", positions="prompt", prompt_positions=[0, 1])
    direct = generate(explorer.model, explorer.tokenizer, prompt, spec, saes, max_new_tokens=6, top_alternatives=10,
                      sampling=Sampling(0.8, 0.9, 5))
    assert steered == completion_html("Steered (α = 60, unit direction)", direct.steered)


@pytest.mark.parametrize(("text", "generated", "expected"), [
    ("all", True, {"positions": "all"}),
    ("all", False, {"positions": "prompt"}),
    ("0,1,5", True, {"positions": "all", "prompt_positions": [0, 1, 5]}),
    (" 3-5 ", False, {"positions": "prompt", "prompt_positions": [3, 4, 5]}),
])
def test_positions_box(text, generated, expected):
    assert Explorer._positions(text, generated, n_prompt=6) == expected


def test_positions_box_is_bounded_by_the_prompt_before_it_is_expanded():
    """``0-999999999`` against a 12-token prompt used to allocate ~23 GiB; it is refused from its ends."""
    with pytest.raises(IndexOutOfRangeError, match=r"prompt position 999999999 is out of range for the prompt "
                                                   r"\(12 prompt positions: 0..11\)"):
        Explorer._positions("0-999999999", True, n_prompt=12)


@pytest.mark.parametrize("word", ["prompt", "generated", " generated "])
@pytest.mark.parametrize("generated", [True, False])
def test_positions_box_refuses_the_words_the_checkbox_decides(word, generated):
    """'prompt' with the box ticked used to steer everything; the checkbox alone decides generated tokens."""
    with pytest.raises(AppInputError, match=f"positions '{word.strip()}': the box takes 'all' or prompt indices"):
        Explorer._positions(word, generated, n_prompt=6)


def test_feature_card_equals_the_card_recipe(explorer):
    card, status = explorer.feature(2, 100)
    assert status == ""
    (direct,) = feature_cards(explorer.model, explorer.tokenizer, explorer.texts, load_sae(DEMO_RELEASE, 2), [100],
                              layer=2, progress=False)
    assert card == card_html(direct) and 'data-card="100"' in card


def test_feature_cards_of_one_layer_share_one_harvest(explorer, monkeypatch):
    """The texts are fixed per app: the second card of a layer reuses the first's harvest, no forward."""
    from qscope_plugin.app import explorer as module

    calls = []
    harvest_once = module.harvest_corpus
    monkeypatch.setattr(module, "harvest_corpus", lambda *a, **k: calls.append(k["layer"]) or harvest_once(*a, **k))
    fresh = Explorer(explorer.model, explorer.tokenizer, DEMO_RELEASE, explorer.texts)
    first, second, other = fresh.feature(1, 100), fresh.feature(1, 7), fresh.feature(0, 7)
    assert calls == [1, 0] and fresh.feature(1, 100) == first
    (direct,) = feature_cards(explorer.model, explorer.tokenizer, explorer.texts, load_sae(DEMO_RELEASE, 1), [7],
                              layer=1, progress=False)
    assert second == (card_html(direct), "") and other[1] == ""


@pytest.mark.parametrize(("call", "message"), [
    (lambda e: e.analyze("", 3), "no texts given"),
    (lambda e: e.analyze("hi", 4), r"layer 4 is out of range .*\(4 layers: 0..3\)"),
    (lambda e: e.analyze("hi", -1), "layer -1 is out of range"),
    (lambda e: e.analyze("hi", 1.5), "layer 1.5 is out of range"),
    (lambda e: e.analyze("hi", None), "layer None is out of range"),
    (lambda e: e.analyze("hi", 3, 0), "top features per token 0 cannot be used"),
    (lambda e: e.steer("hi", 3, 1536), r"feature 1536 is out of range .*\(1536 features: 0..1535\)"),
    (lambda e: e.steer("hi", 3, 5, "Custom", float("nan")), "alpha=nan .* not a finite number"),
    (lambda e: e.steer("hi", 3, 5, "Custom", float("inf")), "alpha=inf .* not a finite number"),
    (lambda e: e.steer("hi", 3, 5, "Custom", None), "custom strength None is not a number"),
    (lambda e: e.steer("hi", 3, 5, "Huge"), "strength preset 'Huge'; expected one of Light"),
    (lambda e: e.steer("hi", 3, 5, positions="7-3"), "positions '7-3' is a reversed range"),
    (lambda e: e.steer("hi", 3, 5, positions="x"), "positions 'x' cannot be read"),
    (lambda e: e.steer("hi", 3, 5, positions="0,9"),
     r"prompt position 9 is out of range for the prompt \(2 prompt positions: 0..1\)"),
    (lambda e: e.steer("hi", 3, 5, positions="0-999999999"), "prompt position 999999999 is out of range"),
    (lambda e: e.steer("hi " * 600, 3, 5), r"the prompt is 1201 tokens; the app takes at most 512 tokens per text"),
    (lambda e: e.steer("x" * 10**7, 3, 5), "the prompt is 10000000 characters, more than 512 tokens"),
    (lambda e: e.analyze("hi " * 600, 3), "the text is 1201 tokens; .*--max-tokens"),
    (lambda e: e.analyze("a\ud800b", 3), "not valid Unicode text"),
    (lambda e: e.analyze(None, 3), "the text is NoneType, not text"),
    (lambda e: e.steer("hi " * 150, 3, 5, max_new_tokens=256), "past the model's context of 512 positions"),
    (lambda e: e.steer("hi", 3, 5, positions="generated", steer_generated=False), "tick or untick"),
    (lambda e: e.steer("hi", 3, 5, decoding="beam"), "decoding 'beam'"),
    (lambda e: e.steer("hi", 3, 5, decoding="sampled", temperature=0.0), "temperature=0.0"),
    (lambda e: e.steer("hi", 3, 5, max_new_tokens=0), "new tokens 0 cannot be used"),
    (lambda e: e.steer("", 3, 5), "no prompt given"),
    (lambda e: e.feature(3, -2), "feature -2 is out of range"),
])
def test_bad_input_is_a_message_in_the_page(explorer, call, message):
    *outputs, status = call(explorer)
    assert all(out == "" for out in outputs)
    assert status.startswith('<div class="qs-error" role="alert">⚠ ')
    assert re.search(message, status.replace("&#x27;", "'")), status


def test_a_bad_compare_keeps_the_calibration_it_had(explorer):
    before = {(3, 28): 0.5}
    for args in ((TEXT_A, TEXT_B, 3, 1), (TEXT_A, "", 0, 3), (TEXT_A, TEXT_B, 0, 3, 0), (TEXT_A, TEXT_B, 0, 9)):
        table, kept, status = explorer.compare(*args, differences=before)
        assert table == "" and kept == before and "qs-error" in status
    assert "run backwards" in explorer.compare(TEXT_A, TEXT_B, 3, 1)[2]
    assert "text B is empty; type a text on both sides" in explorer.compare(TEXT_A, " ", 0, 3)[2]


def test_a_compare_range_wider_than_the_sae_cache_is_refused(explorer, monkeypatch):
    from qscope_plugin.store import DEFAULT_CACHE

    monkeypatch.setattr(DEFAULT_CACHE, "max_layers", 2)
    table, kept, status = explorer.compare(TEXT_A, TEXT_B, 1, 3, differences={(3, 28): 0.5})
    assert table == "" and kept == {(3, 28): 0.5}
    assert "layers 1..3 are 3 SAEs; Compare loads at most 2 at once" in status
    assert explorer.compare(TEXT_A, TEXT_B, 2, 3)[2] == ""


def test_presets_without_compare_are_the_official_apps(explorer):
    assert explorer.presets_text(3, 28).startswith("Presets: Light 5 · Medium 20 · Strong 100 (the official")
    assert "Light 0.25 · Medium 1 · Strong 5 " in explorer.presets_text(3.0, 28, {(3, 28): -0.5})
    assert "Light 5 " in explorer.presets_text(None, "x", {(3, 28): -0.5})  # an unfinished field: the defaults


def test_a_bug_is_not_swallowed(explorer, monkeypatch):
    """Only the plugin's input errors become messages; anything else propagates (Gradio reports it)."""
    from qscope_plugin.app import explorer as module

    def internal_value_error(*args, **kwargs):
        raise ValueError("shape mismatch inside torch")  # a ValueError that is not one of the plugin's

    for name, call in (("analyze", lambda: explorer.analyze("hi", 3)),
                       ("contrast", lambda: explorer.compare(TEXT_A, TEXT_B, 3, 3)),
                       ("generate", lambda: explorer.steer("hi", 3, 5, max_new_tokens=2))):
        monkeypatch.setattr(module, name, internal_value_error)
        with pytest.raises(ValueError, match="shape mismatch inside torch"):
            call()


def test_demo_texts_are_non_blank():
    assert len(demo_texts()) > 100 and all(t.strip() for t in demo_texts())


def test_a_layer_not_cached_offline_is_a_message_naming_the_fetch(hub_cache):
    """A real release, nothing cached, HF_HUB_OFFLINE=1: the page says which `qscope fetch` to run."""
    from qscope_testing import qwen3_tokenizer, tiny_qwen3

    release = "qwen-scope-3-1.7b-base-w32k-l50"
    offline = Explorer(tiny_qwen3(n_layers=2), qwen3_tokenizer(), release, ["a text"])
    table, status = offline.analyze("hello", 1)
    assert table == "" and f"qscope fetch {release} --layers 1" in status and "not in the local cache" in status


def test_requests_in_parallel_never_see_each_others_steering(explorer):
    """Gradio runs requests in threads: while one steers (hooks on the model), another's forward must be clean."""
    import threading

    clean = explorer.analyze(TEXT_B, 3, 5)
    stop, seen = threading.Event(), []

    def steer_repeatedly():
        while not stop.is_set():
            explorer.steer(TEXT_B, 0, 7, "Custom", 500.0, max_new_tokens=4)

    worker = threading.Thread(target=steer_repeatedly)
    worker.start()
    try:
        seen = [explorer.analyze(TEXT_B, 3, 5) for _ in range(40)]
    finally:
        stop.set()
        worker.join()
    assert all(result == clean for result in seen)


def test_any_sae_folder_and_backbone(tmp_path):
    """Not only the demo: a folder of layer{n}.sae.pt files beside another model, read the same way."""
    from qscope_testing import qwen3_tokenizer, tiny_qwen3, write_sae_file

    for layer in (0, 1):
        write_sae_file(tmp_path / f"layer{layer}.sae.pt", d_model=64, d_sae=96, seed=layer)
    (tmp_path / "qscope.json").write_text(json.dumps({"k": 8}))
    mine = Explorer(tiny_qwen3(n_layers=2), qwen3_tokenizer(), str(tmp_path), ["some text", "more text"])
    table, status = mine.analyze("hello world", 1)
    assert status == "" and table.count("<tr><td") == 2
    steered, unsteered, status = mine.steer("hello", 1, 95, "Strong", max_new_tokens=3)
    assert status == "" and "α = 100," in steered and "Unsteered" in unsteered
    assert "feature 96 is out of range" in mine.feature(1, 96)[1]
    assert "(2 layers: 0..1)" in mine.analyze("hello", 2)[1]
