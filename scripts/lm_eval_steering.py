"""Does steering keep a benchmark score? One steered-vs-unsteered lm-eval evaluation on the demo model, offline.

The task is a two-choice lm-eval task built from the demo's hand-written zh/en sentence pairs
(``qscope_plugin/demo/eval_sentences.json``) through lm-eval's builtin ``piqa`` YAML (``include:``): the context is
the first half of an English sentence, the choices its English second half (correct) and the same sentence in
Chinese. The steered feature is the demo's Chinese-language feature at one layer (the top firing-rate difference,
zh vs en, as ``qscope demo`` finds it), at ±8 residual RMS units. The unsteered model, ``qscope-steered`` with
α = 0 and each steered variant are scored by ``lm_eval.simple_evaluate``; the table (docs/lm_eval.md) is printed.

    python scripts/lm_eval_steering.py [--layer 2] [--scale 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from qscope_plugin.adapters.lm_eval import SteeredHFLM, task_manager  # noqa: E402
from qscope_plugin.backends import as_backend  # noqa: E402
from qscope_plugin.models import DEMO_MODEL_DIR, load_model  # noqa: E402
from qscope_plugin.recipes._harvest import harvest, pad, tokenize  # noqa: E402
from qscope_plugin.recipes.discovery import ContrastOptions, contrast_codes  # noqa: E402
from qscope_plugin.recipes.steering import SteeringSpec  # noqa: E402
from qscope_plugin.store import DEMO_RELEASE, load_sae  # noqa: E402

SENTENCES = json.loads((Path(__file__).parents[1] / "qscope_plugin/demo/eval_sentences.json").read_text())


def write_task(folder: Path) -> None:
    """``zh_or_en``: continue an English half-sentence in English (label 0) rather than with its Chinese version."""
    rows = []
    for en, zh in zip(SENTENCES["en"], SENTENCES["zh"], strict=True):
        words = en.split()
        half = len(words) // 2
        rows.append({"goal": " ".join(words[:half]), "sol1": " ".join(words[half:]), "sol2": zh, "label": 0})
    data = folder / "zh_or_en.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    builtin = Path(lm_eval.__file__).parent / "tasks" / "piqa" / "piqa.yaml"
    (folder / "zh_or_en.yaml").write_text(
        f"include: {builtin}\ntask: zh_or_en\ndataset_path: json\ndataset_name: null\ntraining_split: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n")


def chinese_feature(model, tok, saes: dict, layer: int) -> tuple[int, float]:
    """The top zh-vs-en feature at ``layer`` and the layer's residual RMS per coordinate (α's unit)."""
    backend = as_backend(model)
    zh, en = SENTENCES["zh"], SENTENCES["en"]
    ranking = contrast_codes(harvest(backend, tok, zh[::2], saes), harvest(backend, tok, en[::2], saes),
                             {n: s.cfg.d_sae for n, s in saes.items()}, ContrastOptions(method="rate"))
    ids, mask, positions = pad(tokenize(tok, zh[::2] + en[::2], max_length=None), tok.pad_token_id)
    hidden = backend.capture(ids, mask, layers=[layer], position_ids=positions)[layer]
    mask = mask.bool()
    mask[:, 0] = False
    return ranking[layer][0].feature, float(hidden[mask].norm(dim=-1).mean()) / saes[layer].cfg.d_model ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--scale", type=float, default=8.0, help="|α| in residual RMS units")
    args = parser.parse_args()
    model, tok = load_model(str(DEMO_MODEL_DIR))
    saes = {args.layer: load_sae(DEMO_RELEASE, args.layer)}
    feature, rms = chinese_feature(model, tok, saes, args.layer)
    alpha = args.scale * rms
    with tempfile.TemporaryDirectory() as folder:
        write_task(Path(folder))
        manager = task_manager(folder, include_defaults=False)
        runs = {"HFLM (unsteered)": HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=16)}
        for sign, name in ((0.0, "α = 0"), (-1.0, "suppress (−α)"), (1.0, "amplify (+α)")):
            spec = SteeringSpec.single(args.layer, feature, sign * alpha, direction_norm="unit")
            runs[f"qscope-steered, {name}"] = SteeredHFLM(pretrained=model, tokenizer=tok, device="cpu",
                                                          batch_size=16, spec=spec, saes=saes)
        print(f"demo model, layer {args.layer} feature {feature}, |α| = {args.scale} × RMS {rms:.3f} = {alpha:.3f}, "
              f"task zh_or_en ({len(SENTENCES['en'])} documents), lm-eval {lm_eval.__version__}\n")
        print("| model | acc | acc_norm | mean log p(English) | mean log p(Chinese) |\n|---|---|---|---|---|")
        for name, lm in runs.items():
            out = lm_eval.simple_evaluate(model=lm, tasks=["zh_or_en"], task_manager=manager, log_samples=True)
            result, samples = out["results"]["zh_or_en"], out["samples"]["zh_or_en"]
            english = sum(s["filtered_resps"][0][0] for s in samples) / len(samples)
            chinese = sum(s["filtered_resps"][1][0] for s in samples) / len(samples)
            print(f"| {name} | {result['acc,none']:.3f} | {result['acc_norm,none']:.3f} | {english:.2f} | "
                  f"{chinese:.2f} |")


if __name__ == "__main__":
    main()
