"""HTML of recipe results for the web app: tables and token strips, escaped, styled by ``APP_CSS``.

    >>> analysis_html(analyze(model, tok, "Hello world", {3: sae}))
    >>> completion_html("steered", result.steered)

Pure string building: nothing here runs a model or computes a statistic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

from qscope_plugin.recipes.discovery import FeatureScore, TokenFeatures
from qscope_plugin.recipes.steering import Completion

APP_CSS = """
.qs-table { border-collapse: collapse; font-size: 0.9em; margin: 0.4em 0 1em; }
.qs-table th, .qs-table td { border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
.qs-table td.num { text-align: right; font-variant-numeric: tabular-nums; }
.qs-chip { display: inline-block; margin: 1px 3px; padding: 0 4px; border-radius: 4px; background: #eef2ff; }
.qs-token { white-space: pre-wrap; border-radius: 3px; padding: 0 1px; }
.qs-text { line-height: 1.9; margin: 0.3em 0 0.8em; }
.qs-alt { color: #444; background: #f3f4f6; white-space: pre; }
"""
"""Styles of the app's tables and token strips (passed to Gradio's ``launch(css=...)``)."""


def shown_token(text: str) -> str:
    """A token as shown in the app and on cards: escaped, with its line breaks and tabs visible (spaces are kept
    by the ``qs-token`` CSS class)."""
    return escape(text.replace("\n", "↵").replace("\t", "→"), quote=True)


def _table(header: Sequence[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="qs-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def analysis_html(rows: list[TokenFeatures]) -> str:
    """Per-token top features of one layer: position, token, then ``feature: activation`` chips."""
    cells = [[str(r.position), f'<span class="qs-token">{shown_token(r.token)}</span>',
              "".join(f'<span class="qs-chip" data-feature="{f}">{f}: {v:.2f}</span>' for f, v in r.features)
              or "<em>none fire</em>"] for r in rows]
    return _table(["pos", "token", "top features (id: activation)"], cells, numeric={0})


def comparison_html(ranking: Mapping[int, list[FeatureScore]], method: str) -> str:
    """Top features per layer of a Compare: both sides' statistic and their (signed) difference."""
    what = "firing rate" if method == "rate" else "mean activation"
    cells = [[str(layer), str(rank), f'<span data-feature="{s.feature}">{s.feature}</span>', f"{s.positive:.3f}",
              f"{s.negative:.3f}", f"{s.score:+.3f}"]
             for layer, scores in sorted(ranking.items()) for rank, s in enumerate(scores, 1)]
    if not cells:
        return "<p><em>No features: every feature has the same statistic on both texts (A − B = 0).</em></p>"
    return _table(["layer", "rank", "feature", f"{what}, text A", f"{what}, text B", "A − B"], cells,
                  numeric={0, 1, 3, 4, 5})


def _shade(prob: float) -> str:
    """Background for a token: green when the model was sure of it, red when it was not."""
    hue = round(120 * prob)
    return f"hsl({hue}, 70%, 85%)"


def completion_html(title: str, completion: Completion) -> str:
    """One completion: its tokens shaded by probability (candidates on hover), then a table of every step with its
    probability and top candidates."""
    strip = "".join(
        f'<span class="qs-token" style="background:{_shade(t.prob)}" title="'
        + escape(" | ".join(f"{a!r} {p:.3f}" for a, p in t.alternatives)) + f'">{shown_token(t.token)}</span>'
        for t in completion.tokens)
    rows = [[str(step), f'<span class="qs-token">{shown_token(t.token)}</span>', f"{t.prob:.3f}",
             "".join(f'<span class="qs-chip qs-alt">{shown_token(a)}&nbsp;{p:.3f}</span>' for a, p in t.alternatives)]
            for step, t in enumerate(completion.tokens)]
    table = _table(["step", "token", "p", "top candidates"], rows, numeric={0, 2})
    return f"<h4>{escape(title)}</h4><div class=\"qs-text\">{strip or '<em>(nothing generated)</em>'}</div>{table}"
