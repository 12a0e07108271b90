"""Tokens shown as text (qscope_plugin.tokens): byte tokens of a split character never show as "�", in any view."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qscope_plugin.tokens import lone_token_texts, pieces_text, token_pieces, token_texts

REPLACEMENT = "\ufffd"
MIXED = "今天早上 the weather 鑫 🤖 龘 ok"
"""Whole-token Chinese, and characters the demo vocabulary has no token for: 鑫 is three tokens of one byte, 🤖
four, 龘 two (counted below, so that the test cannot pass vacuously)."""


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from qscope_plugin.models import DEMO_MODEL_DIR

    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def _expected(tokenizer, ids: list[int]) -> list[str]:
    """Brute force with Python's own decoder: the characters completed at token i are those its prefix of bytes
    decodes to beyond the previous prefix; a token that completes none shows its bytes escaped."""
    pieces = token_pieces(tokenizer, ids)
    data, shown, before = b"", [], ""
    for piece in pieces:
        data += piece
        prefix = data.decode("utf-8", errors="ignore")  # a prefix of valid UTF-8: only its tail can be cut
        new = prefix[len(before):]
        shown.append(new or "".join(f"\\x{b:02x}" for b in piece))
        before = prefix
    return shown


def test_a_character_split_into_byte_tokens_shows_on_the_token_that_completes_it(tok):
    ids = tok(MIXED).input_ids
    assert sum(REPLACEMENT in tok.decode([i]) for i in ids) == 3 + 4 + 2  # decoded alone, byte tokens are "�"
    shown = token_texts(tok, ids)
    assert shown == _expected(tok, ids)
    assert REPLACEMENT not in "".join(shown) and all(shown)
    assert shown[:2] == ["今天", "早上"]
    assert shown[shown.index("鑫") - 2:shown.index("鑫")] == ["\\xe9", "\\x91"]
    assert "🤖" in shown and "龘" in shown
    assert lone_token_texts(tok, tok("鑫").input_ids) == ["\\xe9", "\\x91", "\\xab"]


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=24))
def test_any_text_shows_as_its_characters(tok, text):
    ids = tok(text).input_ids
    shown = token_texts(tok, ids)
    assert shown == _expected(tok, ids)
    assert REPLACEMENT not in "".join(shown) or REPLACEMENT in text


@pytest.mark.parametrize(("pieces", "shown"), [
    ([b"\x91", b"\xab", b" ok"], ["\\x91", "\\xab", " ok"]),  # a window that starts mid-character
    ([b"a", b"\xe9"], ["a", "\\xe9"]),  # ... or ends in one
    ([b"\xc0\x80", b"x"], ["\\xc0\\x80", "x"]),  # an overlong form is not a character
    ([b"\xe9", "<|endoftext|>", b"\x91\xab"], ["\\xe9", "<|endoftext|>", "\\x91\\xab"]),  # a special token cuts
    ([b" \xe9", b"\x91", b"\xab!"], [" ", "\\x91", "鑫!"]),
    ([b"\xf0\x9f", b"\xa4\x96"], ["\\xf0\\x9f", "🤖"]),
])
def test_pieces_at_the_edges(pieces, shown):
    assert pieces_text(pieces) == shown


def test_a_tokenizer_that_is_not_byte_level_decodes_each_token():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"hello": 0, "wörld": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    assert token_texts(tokenizer, [0, 1, 2]) == ["hello", "wörld", "[UNK]"]


@pytest.mark.slow
def test_every_view_shows_the_completed_character(demo_model, tmp_path):
    """The per-token table, feature cards, the static dashboard and a steered completion of the demo, on text with
    characters split into byte tokens: none of them shows "�"."""
    from qscope_plugin.app.dashboard import write_dashboard
    from qscope_plugin.app.views import analysis_html, completion_html
    from qscope_plugin.recipes.discovery import analyze
    from qscope_plugin.recipes.inspection import feature_cards
    from qscope_plugin.recipes.steering import SteeringSpec, generate
    from qscope_plugin.store import DEMO_RELEASE, load_sae

    model, tokenizer = demo_model
    sae = load_sae(DEMO_RELEASE, 3)
    rows = analyze(model, tokenizer, MIXED, {3: sae}, top_n=2)
    assert [r.token for r in rows] == token_texts(tokenizer, tokenizer(MIXED).input_ids)
    assert "鑫" in analysis_html(rows) and REPLACEMENT not in analysis_html(rows)

    texts = [MIXED, "鑫鑫 and 龘", "天气很好 🤖🤖"]
    cards = feature_cards(model, tokenizer, texts, sae, layer=3, top=8, progress=False)
    tokens = [t for card in cards for c in card.contexts for t in c.tokens]
    tokens += [e.token for card in cards for e in card.logit_effects.promoted + card.logit_effects.suppressed]
    assert "鑫" in tokens and REPLACEMENT not in "".join(tokens)
    page = write_dashboard(tmp_path / "d.html", cards, title="layer 3").read_text(encoding="utf-8")
    assert "鑫" in page and REPLACEMENT not in page

    result = generate(model, tokenizer, "鑫", SteeringSpec.single(3, cards[0].feature, 4.0), {3: sae},
                      max_new_tokens=8)
    html = completion_html("steered", result.steered)
    for choice in result.steered.tokens:
        assert REPLACEMENT not in choice.token + "".join(a for a, _ in choice.alternatives)
    assert REPLACEMENT not in html
