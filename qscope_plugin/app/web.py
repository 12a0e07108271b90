"""``qscope app``: the local Gradio web app over an ``Explorer`` (Analyze, Compare, Steer, Feature).

    >>> from qscope_plugin.app.explorer import Explorer
    >>> from qscope_plugin.app.web import serve
    >>> serve(Explorer.load(), port=7860)                 # the embedded demo on http://127.0.0.1:7860

Presentation only: the layout and its wiring; every callback is an ``Explorer`` method. The page works with no
internet: analytics and Gradio's update check are off, the theme uses system fonts (the default theme's web fonts
would be fetched), and nothing is shared. Gradio is imported here only, and only ``qscope app`` imports this module.

Requests are bounded here as well as in the ``Explorer``: every callback that runs the model shares one Gradio
concurrency group of size 1 (there is one model), the queue holds at most ``queue_size`` waiting requests (a
request past that is answered at once with Gradio's "Queue is full" error, HTTP 503, instead of waiting behind
the others), and uploads are refused past ``MAX_FILE_SIZE`` (the app takes no files).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from qscope_plugin.app import GRADIO_MISSING
from qscope_plugin.app.dashboard import CARD_CSS
from qscope_plugin.app.explorer import MAX_NEW_TOKENS, PRESETS, Explorer
from qscope_plugin.app.views import APP_CSS
from qscope_plugin.errors import QScopeError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio reads it at import
try:
    import gradio as gr
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError(GRADIO_MISSING) from None

EXAMPLE_TEXT = "今天早上我喝了一杯热茶，then I went to work."
EXAMPLE_PAIR = ("今天早上我喝了一杯热茶。", "This morning I drank a cup of hot tea.")
EXAMPLE_PROMPT = "今天早上"
PAGE_CSS = APP_CSS + CARD_CSS + """
#analyze-out [data-feature], #compare-out [data-feature] { cursor: pointer; text-decoration: underline dotted; }
"""
QUEUE_SIZE = 16
"""Requests waiting for the model at most; one more is refused at once ("Queue is full"), never left to wait."""
MAX_FILE_SIZE = "1mb"
"""The app takes no files; anything posted to Gradio's upload route past this is refused."""
MODEL = "model"
"""The one concurrency group of every callback that runs the model: one request at a time, as there is one model."""
SYSTEM_FONTS = (["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "Consolas", "monospace"])


def _theme() -> gr.themes.Base:
    sans, mono = SYSTEM_FONTS
    return gr.themes.Default(font=sans, font_mono=mono)


def _layer_box(explorer: Explorer, label: str, elem_id: str, value: int | None = None) -> gr.Number:
    last = explorer.n_layers - 1
    return gr.Number(value=last if value is None else value, label=f"{label} (0..{last})", elem_id=elem_id)


def _run(button: gr.Button, fn: Callable, inputs: list, outputs: list, *submits: gr.Textbox) -> None:
    """One callback on the button and on Enter in the given text boxes, in the model's concurrency group."""
    gr.on([button.click, *(box.submit for box in submits)], fn, inputs, outputs, concurrency_limit=1,
          concurrency_id=MODEL)


def _analyze_tab(explorer: Explorer) -> None:
    text = gr.Textbox(EXAMPLE_TEXT, label="Text", lines=3, elem_id="analyze-text")
    with gr.Row():
        layer = _layer_box(explorer, "Layer", "analyze-layer")
        top = gr.Number(5, label="Top features per token", elem_id="analyze-top")
    button = gr.Button("Analyze", variant="primary", elem_id="analyze-run")
    status, table = gr.HTML(elem_id="analyze-status"), gr.HTML(elem_id="analyze-out")
    _run(button, explorer.analyze, [text, layer, top], [table, status])


def _compare_tab(explorer: Explorer, differences: gr.State) -> None:
    with gr.Row():
        text_a = gr.Textbox(EXAMPLE_PAIR[0], label="Text A", lines=3, elem_id="compare-a")
        text_b = gr.Textbox(EXAMPLE_PAIR[1], label="Text B", lines=3, elem_id="compare-b")
    with gr.Row():
        middle = explorer.n_layers // 2  # one layer: a range loads one SAE per layer
        first = _layer_box(explorer, "First layer", "compare-first", middle)
        last = _layer_box(explorer, "Last layer", "compare-last", middle)
        top_k = gr.Number(5, label="Top-K per layer", elem_id="compare-top")
        method = gr.Radio([("firing rate (official app)", "rate"), ("mean activation", "mean")], value="rate",
                          label="Ranking", elem_id="compare-method")
    with gr.Row():
        exclude_first = gr.Checkbox(True, label="Exclude the first token", elem_id="compare-first-token")
        drop_shared = gr.Checkbox(False, label="Drop tokens common to both texts", elem_id="compare-common-tokens")
        drop_prefix = gr.Checkbox(False, label="Drop the common prefix", elem_id="compare-common-prefix")
    button = gr.Button("Compare", variant="primary", elem_id="compare-run")
    status, table = gr.HTML(elem_id="compare-status"), gr.HTML(elem_id="compare-out")
    inputs = [text_a, text_b, first, last, top_k, method, exclude_first, drop_shared, drop_prefix, differences]
    _run(button, explorer.compare, inputs, [table, differences, status])


def _steer_tab(explorer: Explorer, differences: gr.State) -> tuple[gr.Number, gr.Number]:
    prompt = gr.Textbox(EXAMPLE_PROMPT, label="Prompt", lines=2, elem_id="steer-prompt")
    with gr.Row():
        layer = _layer_box(explorer, "Layer", "steer-layer")
        feature = gr.Number(0, label="Feature", elem_id="steer-feature")
        preset = gr.Radio(list(PRESETS), value="Medium", label="Strength", elem_id="steer-preset")
        custom = gr.Number(5.0, label="Custom strength α", elem_id="steer-alpha")
    presets = gr.Markdown(explorer.presets_text(explorer.n_layers - 1, 0), elem_id="steer-presets")
    with gr.Row():
        norm = gr.Radio(["raw", "unit"], value="raw", label="Direction", elem_id="steer-norm")
        positions = gr.Textbox("all", label="Prompt positions: all | 0,1,5 | 3-7", elem_id="steer-positions")
        generated = gr.Checkbox(True, label="Steer generated tokens", elem_id="steer-generated")
        new_tokens = gr.Number(24, label=f"New tokens (1..{MAX_NEW_TOKENS})", elem_id="steer-new-tokens")
    with gr.Row():
        decoding = gr.Radio(["greedy", "sampled"], value="greedy", label="Decoding", elem_id="steer-decoding")
        temperature = gr.Number(1.0, label="Temperature", elem_id="steer-temperature")
        top_p = gr.Number(0.95, label="Top-p", elem_id="steer-top-p")
        seed = gr.Number(0, label="Seed", elem_id="steer-seed")
    button = gr.Button("Steer", variant="primary", elem_id="steer-run")
    status = gr.HTML(elem_id="steer-status")
    with gr.Row():
        steered, unsteered = gr.HTML(elem_id="steer-steered"), gr.HTML(elem_id="steer-unsteered")
    gr.on([layer.change, feature.change, differences.change], explorer.presets_text, [layer, feature, differences],
          presets)
    inputs = [prompt, layer, feature, preset, custom, norm, positions, generated, decoding, temperature, top_p, seed,
              new_tokens, differences]
    _run(button, explorer.steer, inputs, [steered, unsteered, status], prompt)
    return layer, feature


def _feature_tab(explorer: Explorer) -> tuple[gr.Number, gr.Number]:
    gr.Markdown(f"The card of one feature over the app's {len(explorer.texts)} texts: top-activating contexts, "
                "activation histogram, the tokens its decoder direction promotes and suppresses, co-firing features.")
    with gr.Row():
        layer = _layer_box(explorer, "Layer", "feature-layer")
        feature = gr.Number(0, label="Feature", elem_id="feature-id")
    button = gr.Button("Show card", variant="primary", elem_id="feature-run")
    status, card = gr.HTML(elem_id="feature-status"), gr.HTML(elem_id="feature-card")
    _run(button, explorer.feature, [layer, feature], [card, status])
    return layer, feature


def _search_row(explorer: Explorer) -> tuple[gr.Radio, Callable]:
    """Text -> features by explanation (``--explanations``); picking one fills Steer's and Feature's boxes."""
    with gr.Row():
        query = gr.Textbox(label=f"Search features by explanation ({len(explorer.explanations)} explained)",
                           placeholder="e.g. chinese" if explorer.explanations else "start with --explanations FILE",
                           elem_id="search-text", scale=4)
        button = gr.Button("Search", elem_id="search-run", scale=1)
    results = gr.Radio([], label="Features found (pick one: it fills Steer and Feature)", elem_id="search-results")

    def find(text: str):
        found = explorer.search(text)
        note = "no explanations loaded: start the app with --explanations FILE (`qscope explain`)" \
            if not explorer.explanations else f"{len(found)} feature(s) match"
        return gr.update(choices=found, value=None, label=f"Features found: {note}")

    _run(button, find, [query], [results], query)

    def pick(choice: str | None):
        if not choice:
            return (gr.update(),) * 4
        layer, feature = (int(part) for part in choice.split(":"))
        return layer, feature, layer, feature

    return results, pick


FEATURE_LINKS_JS = """
() => {
  // A feature id in Analyze or Compare opens its card in the Feature tab (layer: Analyze's box, Compare's row).
  const setBox = (selector, value) => {
    const box = document.querySelector(selector);
    if (!box) return;
    Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set.call(box, String(value));
    box.dispatchEvent(new Event("input", { bubbles: true }));
  };
  document.addEventListener("click", (event) => {
    const chip = event.target.closest("#analyze-out [data-feature], #compare-out [data-feature]");
    if (!chip) return;
    const row = chip.closest("tr");
    const layer = chip.closest("#analyze-out") ? document.querySelector("#analyze-layer input").value
                                               : row.cells[0].textContent.trim();
    const feature = chip.getAttribute("data-feature");
    const tab = [...document.querySelectorAll("button[role=tab]")].find((b) => b.textContent.trim() === "Feature");
    if (tab) tab.click();  // the tab's boxes exist once it is shown
    setTimeout(() => {
      setBox("#feature-layer input", layer);
      setBox("#feature-id input", feature);
      setTimeout(() => { const run = document.querySelector("#feature-run"); if (run) run.click(); }, 200);
    }, 300);
  });
}
"""


def build_app(explorer: Explorer) -> gr.Blocks:
    """The four tabs over ``explorer``; launch it with ``serve`` (or ``launch(theme=..., css=PAGE_CSS)``)."""
    with gr.Blocks(title="qscope app", analytics_enabled=False) as app:
        gr.Markdown(f"## Qwen-Scope feature explorer\nSAEs `{explorer.source}` ({explorer.n_layers} layers) on "
                    f"`{explorer.model_name}`.", elem_id="app-header")
        differences = gr.State({})
        results, pick = _search_row(explorer)
        with gr.Tabs():
            with gr.Tab("Analyze", id="analyze"):
                _analyze_tab(explorer)
            with gr.Tab("Compare", id="compare"):
                _compare_tab(explorer, differences)
            with gr.Tab("Steer", id="steer"):
                steer_boxes = _steer_tab(explorer, differences)
            with gr.Tab("Feature", id="feature"):
                feature_boxes = _feature_tab(explorer)
        results.change(pick, [results], [*steer_boxes, *feature_boxes])
        app.load(None, None, None, js=FEATURE_LINKS_JS)
    return app


def serve(explorer: Explorer, *, host: str = "127.0.0.1", port: int = 7860,
          announce: Callable[[str], None] = print, block: bool = True, queue_size: int = QUEUE_SIZE) -> gr.Blocks:
    """Serve the app on ``host:port`` (this machine only by default) and ``announce`` its URL once it answers.

    At most ``queue_size`` requests wait for the model; more are refused at once. ``block=False`` returns the
    running app (``app.close()`` stops it), for tests and notebooks.
    """
    app = build_app(explorer).queue(max_size=queue_size, default_concurrency_limit=1)
    try:
        app.launch(server_name=host, server_port=port, share=False, quiet=True, prevent_thread_lock=True,
                   theme=_theme(), css=PAGE_CSS, footer_links=[], max_file_size=MAX_FILE_SIZE)
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise QScopeError(f"cannot serve on {host}:{port} ({e}); pass a free --port, e.g. --port 7861") from None
    announce(app.local_url)
    if block:
        app.block_thread()
    return app
