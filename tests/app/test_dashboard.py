"""The static dashboard: self-contained, escaped, searchable markup; ``qscope dashboard`` on the embedded demo."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from qscope_plugin.app.dashboard import CARD_CSS, card_html, render_dashboard, write_dashboard
from qscope_plugin.cli import main
from qscope_plugin.demo.run import SENTENCES
from qscope_plugin.models import DEMO_MODEL_DIR
from qscope_plugin.recipes.inspection import (
    Cofiring,
    Context,
    FeatureCard,
    Histogram,
    LogitEffects,
    TokenEffect,
)

HOSTILE = "<script>alert(1)</script>"


def _card(feature: int = 7, token: str = HOSTILE, explanation: str | None = '"quoted" & <b>bold</b>') -> FeatureCard:
    return FeatureCard(
        layer=3, feature=feature, explanation=explanation, n_tokens=100, n_firing=4, density=0.04,
        max_activation=5.0, mean_activation=3.0,
        contexts=[Context(text=2, start=0, peak=1, tokens=["a", token, "\n"], activations=[0.0, 5.0, 1.0])],
        histogram=Histogram(edges=[1.0, 2.0, 3.0, 4.0, 5.0], counts=[1, 0, 2, 1]),
        logit_effects=LogitEffects([TokenEffect(token, 11, 2.5)], [TokenEffect("</table>", 12, -1.5)]),
        cofiring=[Cofiring(feature=9, count=3, jaccard=0.5)])


class _Markup(HTMLParser):
    """Tags with their attributes, in order, and every text node."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def having(self, tag: str, attr: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag and attr in a]


def test_token_text_is_escaped_everywhere():
    fragment = card_html(_card())
    assert HOSTILE not in fragment and fragment.count("</table>") == 3 and "<code>&lt;/table&gt;</code>" in fragment
    assert fragment.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2  # the context and the promoted token
    assert "&quot;quoted&quot; &amp; &lt;b&gt;bold&lt;/b&gt;" in fragment
    markup = _Markup(fragment)
    assert not [t for t, _ in markup.tags if t in ("script", "b")]
    assert HOSTILE in "".join(markup.text)  # what the browser shows is the token itself


def test_card_highlights_activating_tokens_with_their_values():
    markup = _Markup(card_html(_card()))
    lit = markup.having("span", "data-act")
    assert [a["data-act"] for a in lit] == ["5", "1"] and [a["title"] for a in lit] == ["5", "1"]
    assert "qs-peak" in lit[0]["class"] and "qs-peak" not in lit[1]["class"]
    assert "↵" in "".join(markup.text)  # a newline token stays visible on its line
    assert len([t for t, _ in markup.tags if t == "rect"]) == 4  # one bar per histogram bin
    assert not markup.having("a", "href") and "#9" in "".join(markup.text)  # card 9 is not on this page: text
    linked = _Markup(card_html(_card(), linked={9}))
    assert linked.having("a", "href")[0]["href"] == "#card-9"  # co-firing links to its card when it is there


def test_card_css_is_scoped_to_the_card():
    rules = re.sub(r"/\*.*?\*/", "", CARD_CSS, flags=re.S)
    selectors = [s.strip() for block in rules.split("}") if "{" in block for s in block.split("{")[0].split(",")]
    assert selectors and all(s.startswith(".qscope-card") for s in selectors), selectors


def test_dashboard_is_one_self_contained_searchable_page(tmp_path):
    cards = [_card(7), _card(12, token="cat", explanation=None)]
    path = write_dashboard(tmp_path / "d.html", cards, title="T <1>", meta={"model": "<m>", "layer": 3})
    page = path.read_text(encoding="utf-8")
    assert page == render_dashboard(cards, title="T <1>", meta={"model": "<m>", "layer": 3})
    markup = _Markup(page)
    for tag, attrs in markup.tags:
        for name in ("src", "href", "action", "data", "poster"):
            value = attrs.get(name) or ""
            assert not re.match(r"\s*(https?:|//)", value, re.I), (tag, name, value)
        assert not (tag == "link" and "stylesheet" in (attrs.get("rel") or "")), attrs
        assert not (tag == "script" and "src" in attrs), attrs
    assert not re.search(r"url\(\s*['\"]?\s*(https?:|//)", page, re.I) and "@import" not in page
    assert [t for t, _ in markup.tags].count("script") == 1 and "T &lt;1&gt;" in page and "&lt;m&gt;" in page
    assert [a["id"] for a in markup.having("input", "id")] == ["feature-search"]
    entries = markup.having("li", "data-feature")
    assert [e["data-feature"] for e in entries] == ["7", "12"]
    assert "cat" in entries[1]["data-search"] and "bold" in entries[0]["data-search"]
    assert [a["data-card"] for a in markup.having("section", "data-card")] == ["7", "12"]


demo_only = pytest.mark.skipif(not DEMO_MODEL_DIR.is_dir(), reason="demo assets not built")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    texts = SENTENCES["zh"][:8] + SENTENCES["en"][:8]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return str(path)


@demo_only
def test_cli_writes_the_dashboard_of_the_demo(data, tmp_path, capsys):
    explanations = tmp_path / "targets.jsonl"
    explanations.write_text(json.dumps({"layer": 3, "feature": 40, "explanation": "forty"}) + "\n"
                            + json.dumps({"layer": 1, "feature": 5, "explanation": "another layer"}) + "\n")
    out = tmp_path / "d.html"
    argv = ["dashboard", "--layer", "3", "--features", "5,40-41", "--data", data, "--out", str(out),
            "--explanations", str(explanations), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out), "layer": 3, "features": [5, 40, 41]}
    markup = _Markup(out.read_text(encoding="utf-8"))
    assert [e["data-feature"] for e in markup.having("li", "data-feature")] == ["5", "40", "41"]
    assert "forty" in "".join(markup.text) and "another layer" not in "".join(markup.text)
    assert main(["dashboard", "--layer", "1", "--top", "3", "--data", data, "--out", str(out)]) == 0
    assert len(_Markup(out.read_text(encoding="utf-8")).having("li", "data-feature")) == 3


@demo_only
@pytest.mark.parametrize(("argv", "message"), [
    (["--features", "1536"], r"feature 1536 is out of range .*1536 features: 0\.\.1535"),
    (["--layer", "4"], r"layer 4 is out of range"),
    (["--column", "body"], r"has no column 'body'; pass one of \['text'\]"),
    (["--features", "all"], r"--features 'all' asks for 1536 cards; .* at most 1000 .*--top N"),
    (["--explanations", "/nonexistent.json"], "cannot read --explanations"),
])
def test_cli_bad_input_exits_2(data, tmp_path, capsys, monkeypatch, argv, message):
    import qscope_plugin.models

    monkeypatch.setattr(qscope_plugin.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    base = ["dashboard", "--layer", "3", "--data", data, "--out", str(tmp_path / "d.html")]
    assert main(base + argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "d.html").exists()


@pytest.mark.parametrize("top", ["0", "1001", "x"])
def test_cli_top_outside_1_to_1000_exits_2(capsys, top):
    with pytest.raises(SystemExit) as exc:
        main(["dashboard", "--layer", "3", "--top", top, "--data", "x.jsonl", "--out", "d.html"])
    assert exc.value.code == 2 and f"{top!r}: expected a number of features in 1..1000" in capsys.readouterr().err


def test_cli_features_and_top_together_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["dashboard", "--layer", "3", "--features", "1", "--top", "3", "--data", "x.jsonl", "--out", "d.html"])
    assert exc.value.code == 2
    assert "argument --top: not allowed with argument --features" in capsys.readouterr().err


@demo_only
def test_cli_empty_data_exits_2(tmp_path, capsys):
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    assert main(["dashboard", "--layer", "3", "--top", "3", "--data", str(blank), "--out", str(tmp_path / "d")]) == 2
    assert "holds no text, only blank strings" in capsys.readouterr().err
    (tmp_path / "none.jsonl").touch()
    assert main(["dashboard", "--layer", "3", "--data", str(tmp_path / "none.jsonl"), "--out", "d.html"]) == 2
    assert "none.jsonl' is empty" in capsys.readouterr().err
