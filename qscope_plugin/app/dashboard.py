"""Feature cards as HTML: one card as a fragment (``card_html``), or a whole dashboard as ONE self-contained file.

    >>> cards = feature_cards(model, tok, texts, sae, top=50, layer=3)
    >>> write_dashboard("dashboard.html", cards, title="Layer 3", meta={"model": "demo"})   # opens from disk
    >>> fragment = f"<style>{CARD_CSS}</style>" + card_html(cards[0])                      # inside another page

Everything the page needs is inline (CSS, the search script, the histograms as SVG): no network, no CDN, no
fonts, so the file can be mailed or opened offline. Every token and explanation is untrusted text and is escaped;
the page holds no data for its script, only HTML attributes (``data-feature``, ``data-search``).
"""

from __future__ import annotations

import html
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from string import Template

from qscope_plugin.app.views import shown_token
from qscope_plugin.recipes.inspection import Context, FeatureCard, Histogram, TokenEffect

TEMPLATES = Path(__file__).parent / "templates"
CARD_CSS = (TEMPLATES / "card.css").read_text(encoding="utf-8")
"""The cards' stylesheet, every rule scoped under ``.qscope-card`` (embed it once in a page that shows cards)."""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _context_html(context: Context, peak_value: float) -> str:
    spans = []
    for i, (token, act) in enumerate(zip(context.tokens, context.activations, strict=True)):
        if act <= 0:
            spans.append(f'<span class="qs-token">{shown_token(token)}</span>')
            continue
        alpha = min(act / peak_value, 1.0) if peak_value > 0 else 1.0
        peak = i == context.peak
        value = f"<sub>{act:.3g}</sub>" if peak else ""
        style = f"background: rgba(227, 98, 9, {0.1 + 0.8 * alpha:.2f})"
        spans.append(f'<span class="qs-token{" qs-peak" if peak else ""}" data-act="{act:.4g}" title="{act:.4g}" '
                     f'style="{style}">{shown_token(token)}{value}</span>')
    where = f"text {context.text}, token {context.start + context.peak}"
    return f'<div class="qs-context"><span class="qs-where">{_e(where)}</span>{"".join(spans)}</div>'


def _histogram_svg(hist: Histogram, width: int = 320, height: int = 90) -> str:
    """Bars of the non-zero activations' histogram, the axis labelled with its first and last edge."""
    peak = max(hist.counts, default=0)
    if peak == 0:
        return '<p class="qs-none">never fires on these texts</p>'
    plot, bar = height - 14, width / len(hist.counts)
    rects = []
    for i, count in enumerate(hist.counts):
        h = plot * count / peak
        tip = f"{hist.edges[i]:.3g} to {hist.edges[i + 1]:.3g}: {count} tokens"
        rects.append(f'<rect x="{i * bar:.1f}" y="{plot - h:.1f}" width="{max(bar - 1, 1):.1f}" height="{h:.1f}">'
                     f"<title>{_e(tip)}</title></rect>")
    labels = (f'<text x="0" y="{height - 2}">{hist.edges[0]:.3g}</text>'
              f'<text x="{width}" y="{height - 2}" text-anchor="end">{hist.edges[-1]:.3g}</text>')
    return (f'<svg class="qs-hist" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="activation histogram">'
            f'{"".join(rects)}{labels}</svg>')


def _effects_table(effects: list[TokenEffect], css: str) -> str:
    rows = "".join(f'<tr><td><code>{shown_token(e.token)}</code></td><td class="qs-num {css}">{e.value:+.3f}</td></tr>'
                   for e in effects)
    return f"<table>{rows}</table>"


def _partner(feature: int, linked: Collection[int]) -> str:
    return f'<a href="#card-{feature}">#{feature}</a>' if feature in linked else f"#{feature}"


def _scores_html(scores: Mapping | None) -> str:
    """``detection 0.93 [0.85, 0.98] of 100 · fuzzing ...``: the explanation's scores, interval and count."""
    if not scores:
        return ""
    parts = [f"{_e(kind)} {s['value']:.2f} [{s['low']:.2f}, {s['high']:.2f}] of {s['n_positive'] + s['n_negative']}"
             for kind, s in scores.items()]
    return (f'<p class="qs-scores" title="balanced accuracy (0.5 chance), 95% interval, contexts scored">'
            f'{" · ".join(parts)}</p>')


def card_html(card: FeatureCard, linked: Collection[int] = ()) -> str:
    """One card as an HTML fragment (``<section class="qscope-card">``); style it with ``CARD_CSS``.

    Co-firing features in ``linked`` (those whose card is on the same page) link to their card; others are text.
    """
    explanation = (f'<p class="qs-explanation">{_e(card.explanation)}</p>' if card.explanation else "")
    explanation += _scores_html(card.scores)
    stats = (f"density {card.density:.3%} ({card.n_firing} of {card.n_tokens} tokens) · "
             f"max {card.max_activation:.4g} · mean when firing {card.mean_activation:.4g}")
    contexts = "".join(_context_html(c, card.max_activation) for c in card.contexts) or \
        '<p class="qs-none">no activating context</p>'
    cofiring = "".join(f'<tr><td>{_partner(c.feature, linked)}</td><td class="qs-num">{c.count}</td>'
                       f'<td class="qs-num">{c.jaccard:.3f}</td></tr>' for c in card.cofiring)
    cofiring = (f"<table><tr><th>feature</th><th>tokens</th><th>Jaccard</th></tr>{cofiring}</table>" if cofiring
                else '<p class="qs-none">none</p>')
    effects = card.logit_effects
    return f"""<section class="qscope-card" id="card-{card.feature}" data-card="{card.feature}">
<h3>Layer {card.layer} · feature {card.feature}</h3>
{explanation}<p class="qs-stats">{stats}</p>
<h4>Top activating contexts</h4>
{contexts}
<div class="qs-row">
<div><h4>Activations when firing</h4>{_histogram_svg(card.histogram)}</div>
<div><h4>Promotes</h4>{_effects_table(effects.promoted, "qs-up")}</div>
<div><h4>Suppresses</h4>{_effects_table(effects.suppressed, "qs-down")}</div>
<div><h4>Fires with</h4>{cofiring}</div>
</div>
</section>"""


def _top_tokens(card: FeatureCard) -> list[str]:
    """What the search looks in besides the explanation: the contexts' peak tokens and the promoted tokens."""
    words = [c.tokens[c.peak] for c in card.contexts] + [e.token for e in card.logit_effects.promoted]
    return list(dict.fromkeys(w.strip() for w in words if w.strip()))


def _entry_html(card: FeatureCard) -> str:
    tokens = _top_tokens(card)
    label = card.explanation or " ".join(tokens[:4])
    search = " ".join([str(card.feature), card.explanation or "", *tokens]).lower()
    return (f'<li data-feature="{card.feature}" data-search="{_e(search)}"><a href="#card-{card.feature}">'
            f'#{card.feature} {_e(label)} <span class="qs-density">{card.density:.2%}</span></a></li>')


def render_dashboard(cards: Sequence[FeatureCard], *, title: str = "Qwen-Scope features",
                     meta: Mapping[str, object] | None = None) -> str:
    """The whole dashboard as one HTML document: a searchable feature list beside the cards, all inline.

    Args:
        title: the page title and heading.
        meta: shown in the header as ``key: value`` (model, release, layer, data, ...).
    """
    on_page = {c.feature for c in cards}
    meta_html = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in (meta or {}).items())
    page = Template((TEMPLATES / "dashboard.html").read_text(encoding="utf-8"))
    return page.substitute(title=_e(title), meta=meta_html, card_css=CARD_CSS,
                           entries="\n".join(map(_entry_html, cards)),
                           cards="\n".join(card_html(c, on_page) for c in cards),
                           script=(TEMPLATES / "dashboard.js").read_text(encoding="utf-8"))


def write_dashboard(path: str | Path, cards: Sequence[FeatureCard], *, title: str = "Qwen-Scope features",
                    meta: Mapping[str, object] | None = None) -> Path:
    """Write ``render_dashboard(cards, ...)`` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(render_dashboard(cards, title=title, meta=meta), encoding="utf-8")
    return path
