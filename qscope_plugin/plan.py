"""Will it fit? The memory of a harvest on given devices, from configs alone (no weights are read).

    >>> plan = make_plan(config, sae_dims, layers=range(28), devices=["cuda:0", "cuda:1"], memory=[80 << 30] * 2)
    >>> plan.fits, plan.batch_size, plan.layers_per_pass, plan.devices[0].backbone_bytes

The model is split over the devices as ``device_map="auto"`` splits it: whole decoder blocks, in order, each device
filled up to its share of the backbone (the embedding on the first device, the final norm and LM head on the last).
Each SAE goes where its layer is, in the model's dtype (``qscope_plugin.placement``). Per device the plan counts:

- the backbone's share: the parameter bytes of the modules placed there, counted on a meta-device copy of the
  model (every shape exact, no memory);
- SAEs: ``2 · d_sae · d_model + d_sae + d_model`` values per layer held there (fewer when ``layers_per_pass``
  bounds them), in the model's dtype on an accelerator and as the float32 file on the host (its mapped pages,
  resident once read but not private: the kernel can drop them);
- activations per batch of ``batch × seq`` tokens, at the one block computing at a time: the residual stream and
  the block output its hook holds, plus the larger of the block's intermediates (norm, q / k / v / attention
  output, the MLP's gate / up / product; experts: the routed tokens' share) and one SAE encode's
  pre-activations (chunked by ``sae.ENCODE_BUDGET_BYTES``).

The largest batch size whose peak fits every device is chosen; when even a batch of one cannot sit beside all
layers' SAEs, the layers are split into passes (``layers_per_pass``). A plan that cannot fit says which option to
change.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qscope_plugin.errors import QScopeError

HEADROOM = 0.9
"""Share of each device's memory a plan fills: allocator fragmentation and the CUDA context take the rest."""
MAX_BATCH = 256
"""The largest batch size a plan proposes: beyond it a harvest gains little and pads more."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20, "g": 1e9,
          "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


class PlanError(QScopeError, ValueError):
    """A plan that cannot be made (unknown config, bad memory size) or a run that cannot fit."""


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"80 GB"``, ``"512MiB"`` or a plain number of bytes, as an int."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match[2].lower()
    if match is None or unit not in _UNITS:
        raise PlanError(f"memory size {text!r} not understood; write e.g. 80GiB, 40GB or 512MiB")
    return int(float(match[1]) * _UNITS[unit])


@dataclass(frozen=True)
class SAEDims:
    d_model: int
    d_sae: int
    n_layers: int

    def values_per_layer(self) -> int:
        return 2 * self.d_sae * self.d_model + self.d_sae + self.d_model


@dataclass
class DevicePlan:
    """What one device holds under the plan (bytes)."""

    device: str
    memory: int
    layers: list[int]
    """Decoder blocks placed here."""
    backbone_bytes: int
    sae_bytes_per_layer: int
    sae_layers: list[int]
    """Layers whose SAEs sit here (those of ``layers`` that are harvested)."""
    sae_bytes_held: int = 0
    """At most ``layers_per_pass`` of them at once."""
    activation_bytes_per_row: int = 0
    """Peak activation bytes per batch row of ``seq`` tokens at one block of this device."""
    activation_bytes: int = 0
    """At the planned batch size."""
    peak_bytes: int = 0


@dataclass
class Plan:
    model: str
    dtype: str
    seq: int
    layers: list[int]
    devices: list[DevicePlan] = field(default_factory=list)
    batch_size: int = 0
    layers_per_pass: int = 0
    passes: int = 0
    fits: bool = False
    advice: str = ""
    """Why it does not fit and which option to change; empty when it fits."""

    def to_json(self) -> dict:
        return asdict(self)

    def check(self) -> Plan:
        """Self when it fits; else a ``PlanError`` with ``advice``."""
        if not self.fits:
            raise PlanError(self.advice)
        return self


def read_config(model: str) -> dict:
    """The ``config.json`` of a model folder, or of a hub id from the local cache (offline: no download)."""
    folder = Path(model)
    path: Path | None = folder / "config.json" if (folder / "config.json").is_file() else None
    if path is None and not folder.exists():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "config.json")
        except ValueError:  # not a valid repo id either
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None:
        raise PlanError(f"no config.json for {model!r}: not a model folder, and not in the Hugging Face cache; pass "
                        f"a folder saved with save_pretrained or fetch the config once (`huggingface-cli download "
                        f"{model} config.json`)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{str(path)!r} is not a readable config.json ({e}); pass a folder saved with "
                        "save_pretrained") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise PlanError(f"{str(path)!r} has no model_type; expected a transformers config.json")
    return config


def _text(config: dict) -> dict:
    return config.get("text_config") or config


def meta_parameters(config: dict) -> tuple[int, list[int], int]:
    """``(embedding, per-block, head + final norm)`` parameter counts of the text model of ``config``, counted on
    the meta device (``AutoModelForCausalLM``: a multimodal checkpoint loads as its text tower)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qscope_plugin.hooks import resolve_layers

    raw = dict(config)
    if "text_config" in raw:
        raw = {**raw["text_config"], "model_type": f"{raw['model_type']}_text"}
    raw.pop("architectures", None)
    cfg = AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items() if k != "transformers_version"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    blocks = resolve_layers(model)
    per_block = [sum(p.numel() for p in block.parameters()) for block in blocks]
    head = sum(p.numel() for p in model.get_output_embeddings().parameters())
    embed = sum(p.numel() for p in model.get_input_embeddings().parameters())
    if getattr(cfg, "tie_word_embeddings", False):
        head = 0  # one matrix, on the first device; transformers moves the head beside it
    rest = sum(p.numel() for p in model.parameters()) - embed - head - sum(per_block)
    return embed, per_block, head + rest


def activation_bytes_per_row(config: dict, seq: int, dtype_bytes: int, sae: SAEDims | None) -> int:
    """Peak bytes per batch row of ``seq`` tokens while one block computes (see the module docstring).

    The block's intermediates and the SAE encode in its hook are not alive at once (the hook runs on the block's
    output, after its intermediates are freed), so the peak is the larger of the two, over the residual stream
    and the block output the hook holds. Attention scores are not counted: SDPA's fused kernels (flash /
    memory-efficient on CUDA, flash on CPU) do not materialise them.
    """
    text = _text(config)
    d, heads = text["hidden_size"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or d // heads
    kv = text.get("num_key_value_heads", heads)
    if "num_experts" in text:
        inter = text.get("num_experts_per_tok", 1) * text["moe_intermediate_size"]
        inter += text.get("shared_expert_intermediate_size", 0)
    else:
        inter = text["intermediate_size"]
    block = (2 * d + 2 * heads * head_dim + 2 * kv * head_dim + 3 * inter) * dtype_bytes * seq
    encode = 0
    if sae is not None:
        from qscope_plugin.sae import ENCODE_BUDGET_BYTES

        encode = min(seq * sae.d_sae * dtype_bytes, ENCODE_BUDGET_BYTES)
    return max(block, encode) + 2 * d * dtype_bytes * seq


def split_layers(embed: int, per_block: Sequence[int], head: int, budgets: Sequence[float]) -> list[list[int]]:
    """Blocks per device in order, as ``device_map="auto"`` fills them: each device up to its share of the
    backbone in proportion to its memory (the embedding counts on the first, the head on the last)."""
    total = embed + sum(per_block) + head
    shares = [total * b / sum(budgets) for b in budgets]
    out: list[list[int]] = [[] for _ in budgets]
    device, used = 0, embed
    for n, size in enumerate(per_block):
        if used + size / 2 > shares[device] and device < len(budgets) - 1 and out[device]:
            device, used = device + 1, 0
        out[device].append(n)
        used += size
    return out


def make_plan(config: dict, sae: SAEDims, *, layers: Iterable[int], devices: Sequence[str], memory: Sequence[int],
              dtype: str | None = None, seq: int = 512, batch_size: int | None = None,
              layers_per_pass: int | None = None, model: str = "model") -> Plan:
    """The plan of a harvest of ``layers`` (see the module docstring); ``batch_size`` / ``layers_per_pass`` fixed
    when given, else the largest that fit."""
    dtype = dtype or str(_text(config).get("torch_dtype") or config.get("torch_dtype") or "float32")
    dtype = dtype.replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    if len(memory) != len(devices):
        raise PlanError(f"{len(memory)} memory sizes for {len(devices)} devices; give one, or one per device")
    nbytes = DTYPE_BYTES[dtype]
    layers = sorted(set(layers))
    embed, per_block, head = meta_parameters(config)
    if len(per_block) != sae.n_layers or _text(config)["hidden_size"] != sae.d_model:
        raise PlanError(f"the SAEs (d_model {sae.d_model}, {sae.n_layers} layers) do not fit this model "
                        f"(hidden {_text(config)['hidden_size']}, {len(per_block)} layers); pass the release "
                        "trained on it")
    placement = split_layers(embed, per_block, head, memory)
    plan = Plan(model=model, dtype=dtype, seq=seq, layers=layers)
    sae_layer_bytes = sae.values_per_layer() * nbytes
    for i, (device, mem, blocks) in enumerate(zip(devices, memory, placement, strict=True)):
        params = sum(per_block[n] for n in blocks) + (embed if i == 0 else 0) + (head if i == len(devices) - 1
                                                                                 else 0)
        plan.devices.append(DevicePlan(
            device=device, memory=mem, layers=blocks, backbone_bytes=params * nbytes,
            sae_bytes_per_layer=sae.values_per_layer() * 4 if device == "cpu" else sae_layer_bytes,
            sae_layers=[n for n in blocks if n in layers],
            activation_bytes_per_row=activation_bytes_per_row(config, seq, nbytes, sae)))
    _fit(plan, batch_size, layers_per_pass)
    return plan


def _fit(plan: Plan, batch_size: int | None, layers_per_pass: int | None) -> None:
    """Choose layers per pass (all, else fewer) and the largest batch that fits; fill peaks and advice."""
    n = max(len(plan.layers), 1)
    candidates = [layers_per_pass] if layers_per_pass else list(range(n, 0, -1))
    for per_pass in candidates:
        held = [min(len(d.sae_layers), per_pass) * d.sae_bytes_per_layer for d in plan.devices]
        room = [HEADROOM * d.memory - d.backbone_bytes - h for d, h in zip(plan.devices, held, strict=True)]
        rows = min((math.floor(r / d.activation_bytes_per_row) if d.activation_bytes_per_row else MAX_BATCH)
                   for r, d in zip(room, plan.devices, strict=True))
        if rows >= (batch_size or 1):
            plan.layers_per_pass, plan.passes = per_pass, math.ceil(n / per_pass)
            plan.batch_size = batch_size or min(rows, MAX_BATCH)
            plan.fits = True
            break
    else:
        per_pass = candidates[-1]
        held = [min(len(d.sae_layers), per_pass) * d.sae_bytes_per_layer for d in plan.devices]
        plan.layers_per_pass, plan.passes, plan.batch_size = per_pass, math.ceil(n / per_pass), batch_size or 1
    for d, h in zip(plan.devices, held, strict=True):
        d.sae_bytes_held = h
        d.activation_bytes = d.activation_bytes_per_row * plan.batch_size
        d.peak_bytes = d.backbone_bytes + h + d.activation_bytes
    if not plan.fits:
        worst = max(plan.devices, key=lambda d: d.peak_bytes / d.memory)
        if worst.backbone_bytes > HEADROOM * worst.memory:
            plan.advice = (f"the backbone alone needs {gib(worst.backbone_bytes)} on {worst.device}, which has "
                           f"{gib(worst.memory)}: add devices with --device (e.g. cuda:0,cuda:1) or a smaller "
                           "--dtype")
        elif batch_size and batch_size > 1:
            plan.advice = (f"batch size {batch_size} needs {gib(worst.peak_bytes)} on {worst.device} "
                           f"({gib(worst.memory)}): lower --batch-size")
        else:
            plan.advice = (f"{worst.device} cannot hold the backbone's share and one layer's SAE "
                           f"({gib(worst.peak_bytes)} of {gib(worst.memory)}): keep SAEs on the host with "
                           "--sae-device cpu, fewer --layers or more devices with --device")


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def device_memory(device: str) -> int:
    """Bytes this machine has for ``device``: a CUDA device's total memory, or the host's available memory
    (psutil's figure when it is installed, else all physical memory)."""
    from qscope_plugin.models import check_device

    dev = check_device(device)  # refused when this machine cannot use it: pass --memory to plan for another one
    if dev is not None and dev.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(dev).total_memory
    try:
        import psutil
    except ImportError:  # not a dependency: all physical memory then
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return psutil.virtual_memory().available


def render(plan: Plan) -> str:
    """The plan as a table, one row per device."""
    lines = [f"{plan.model} in {plan.dtype}, {len(plan.layers)} SAE layers, sequences of {plan.seq} tokens", "",
             f"{'device':<10} {'memory':>11} {'blocks':>9} {'backbone':>11} {'SAE/layer':>11} {'SAEs held':>11} "
             f"{'act/batch':>11} {'peak':>11}"]
    for d in plan.devices:
        blocks = f"{d.layers[0]}-{d.layers[-1]}" if d.layers else "-"
        lines.append(f"{d.device:<10} {gib(d.memory):>11} {blocks:>9} {gib(d.backbone_bytes):>11} "
                     f"{gib(d.sae_bytes_per_layer):>11} {gib(d.sae_bytes_held):>11} {gib(d.activation_bytes):>11} "
                     f"{gib(d.peak_bytes):>11}")
    lines.append("")
    if plan.fits:
        lines.append(f"fits: batch size {plan.batch_size}, {plan.layers_per_pass} layers per pass "
                     f"({plan.passes} pass{'es' if plan.passes > 1 else ''})")
    else:
        lines.append(f"does not fit: {plan.advice}")
    return "\n".join(lines)
