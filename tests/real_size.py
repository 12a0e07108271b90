"""The Qwen-Scope backbones at their real size, and full-size SAE files, for tests and ``benchmarks/``.

    >>> cfg = backbone_config("Qwen/Qwen3-1.7B-Base")                     # a transformers config, exact dims
    >>> model = meta_model("Qwen/Qwen3.5-27B")                            # boots on the meta device: no memory
    >>> write_release_saes(hub_root, "qwen-scope-3-1.7b-base-w32k-l50")   # every layer, real width, one blob

Kept beside ``qscope_testing.py`` (whose hub cache layout it reuses) so that the CI test imports it directly and
``benchmarks/bench_real_size.py`` puts this folder on ``sys.path``: one copy of the configurations for both.

Sources. The values are the published ``config.json`` files of the hub repos named in each entry. They were
transcribed here without network access: the Qwen3 dense/MoE values are the widely mirrored ``config.json`` of
those repos (and agree with transformers' own ``Qwen3Config`` / ``Qwen3MoeConfig`` documentation); the Qwen3.5
values agree with transformers 5.24's ``Qwen3_5TextConfig`` (documented as Qwen/Qwen3.5-27B) and
``Qwen3_5MoeTextConfig`` (Qwen/Qwen3.5-35B-A3B) and with public third-party copies (24 layers, hidden 2048, 8 heads,
2 KV heads, head_dim 256, vocab 248,320 for Qwen3.5-2B; 64 layers, hidden 5120, 24 heads, 4 KV heads, FFN 17408
for Qwen3.5-27B). Fields marked ``# unverified`` could not be checked against a copy of the file and come from
the family's other sizes; none of them changes d_model or the layer count, which the CI test checks against the
SAE catalogue.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

_QWEN3_COMMON = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
                 "head_dim": 128, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768,
                 "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
                 "use_sliding_window": False, "use_cache": True, "vocab_size": 151936, "torch_dtype": "bfloat16"}

_QWEN3_5_TEXT_COMMON = {"attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True,
                        "eos_token_id": 248044, "head_dim": 256, "hidden_act": "silu", "initializer_range": 0.02,
                        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                        "max_position_embeddings": 262144, "rms_norm_eps": 1e-06, "vocab_size": 248320,
                        "full_attention_interval": 4, "mtp_num_hidden_layers": 1,
                        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10],
                                            "rope_type": "default", "rope_theta": 10000000,
                                            "partial_rotary_factor": 0.25}}

# The published Qwen3.5 checkpoints are *ForConditionalGeneration with a nested text_config and a vision tower.
_QWEN3_5_VISION = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,  # unverified
                   "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
                   "temporal_patch_size": 2, "num_position_embeddings": 2304}


def _hybrid(n_layers: int) -> list[str]:
    """Three Gated DeltaNet layers, then one gated full-attention layer, repeated (docs/method.md §1.1 rule 7)."""
    return (["linear_attention"] * 3 + ["full_attention"]) * (n_layers // 4)


def _qwen3_5(text: dict, tie: bool, vision_depth: int = 24) -> dict:
    n_layers = text["num_hidden_layers"]
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration" if "num_experts" in text
                              else "Qwen3_5ForConditionalGeneration"],
            "model_type": "qwen3_5_moe" if "num_experts" in text else "qwen3_5",
            "image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053,
            "vision_end_token_id": 248054, "tie_word_embeddings": tie,
            "text_config": {**_QWEN3_5_TEXT_COMMON, **text, "tie_word_embeddings": tie,
                            "layer_types": _hybrid(n_layers)},
            "vision_config": {**_QWEN3_5_VISION, "depth": vision_depth, "out_hidden_size": text["hidden_size"]}}


CONFIGS: dict[str, dict] = {
    # https://huggingface.co/Qwen/Qwen3-1.7B-Base/blob/main/config.json
    "Qwen/Qwen3-1.7B-Base": {**_QWEN3_COMMON, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                             "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                             "max_window_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                             "tie_word_embeddings": True},
    # https://huggingface.co/Qwen/Qwen3-8B-Base/blob/main/config.json
    "Qwen/Qwen3-8B-Base": {**_QWEN3_COMMON, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                           "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                           "max_window_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                           "tie_word_embeddings": False},
    # https://huggingface.co/Qwen/Qwen3-30B-A3B-Base/blob/main/config.json
    "Qwen/Qwen3-30B-A3B-Base": {**_QWEN3_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                                "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                                "max_window_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                                "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                                "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                                "output_router_logits": False, "router_aux_loss_coef": 0.001,
                                "tie_word_embeddings": False},
    # https://huggingface.co/Qwen/Qwen3.5-2B-Base/blob/main/config.json
    "Qwen/Qwen3.5-2B-Base": _qwen3_5({"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                                      "num_attention_heads": 8, "num_key_value_heads": 2,
                                      "linear_num_key_heads": 16, "linear_num_value_heads": 16}, tie=True),
    # https://huggingface.co/Qwen/Qwen3.5-9B-Base/blob/main/config.json
    "Qwen/Qwen3.5-9B-Base": _qwen3_5({"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
                                      "num_attention_heads": 16, "num_key_value_heads": 4,
                                      "linear_num_key_heads": 16, "linear_num_value_heads": 32}, tie=False),
    # https://huggingface.co/Qwen/Qwen3.5-27B/blob/main/config.json
    "Qwen/Qwen3.5-27B": _qwen3_5({"hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 64,
                                  "num_attention_heads": 24, "num_key_value_heads": 4,
                                  "linear_num_key_heads": 16, "linear_num_value_heads": 48},
                                 tie=False, vision_depth=27),
    # https://huggingface.co/Qwen/Qwen3.5-35B-A3B-Base/blob/main/config.json
    "Qwen/Qwen3.5-35B-A3B-Base": _qwen3_5({"hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
                                           "num_key_value_heads": 2, "linear_num_key_heads": 16,
                                           "linear_num_value_heads": 32, "moe_intermediate_size": 512,
                                           "shared_expert_intermediate_size": 512, "num_experts": 256,
                                           "num_experts_per_tok": 8, "router_aux_loss_coef": 0.001,
                                           "output_router_logits": False}, tie=False, vision_depth=27),
}
"""``config.json`` of every Qwen-Scope backbone, keyed by the hub id the catalogue pairs it with."""


def backbone_config(model_id: str, *, text_only: bool = False):
    """The transformers config of ``model_id`` as published; ``text_only`` gives the Qwen3.5 ``text_config``
    alone (what ``AutoModelForCausalLM`` builds: the text tower the SAEs read)."""
    from transformers import AutoConfig

    raw = copy.deepcopy(CONFIGS[model_id])
    if text_only and "text_config" in raw:
        text = raw["text_config"]
        raw = {**text, "model_type": f"{raw['model_type']}_text",
               "architectures": [raw["architectures"][0].replace("ForConditionalGeneration", "ForCausalLM")]}
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    cfg._name_or_path = model_id
    return cfg


def text_config(cfg):
    """The decoder's config: ``text_config`` of a multimodal config, else the config itself."""
    return getattr(cfg, "text_config", None) or cfg


def meta_model(model_id: str, *, text_only: bool = False):
    """The model of ``model_id`` built on the meta device: every module and shape, no memory."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = backbone_config(model_id, text_only=text_only)
    multimodal = hasattr(cfg, "text_config")
    with torch.device("meta"):
        model = (AutoModelForImageTextToText if multimodal else AutoModelForCausalLM).from_config(cfg)
    return model.eval()


# ----------------------------------------------------------------------------------------------- SAE files

SNAPSHOT = "f" * 40


def write_sae_blob(path: Path, d_model: int, d_sae: int, *, seed: int = 0) -> Path:
    """One random ``layer{n}.sae.pt`` of real size in the exact Qwen-Scope format (float32, file layouts).

    Values come from ``torch.rand`` in one pass per tensor (a fast generator: 512 MiB in seconds) and are
    scaled so that encodes give a spread of positive pre-activations, as trained SAEs do.
    """
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": (torch.rand(d_sae, d_model, generator=g) - 0.5) / d_model**0.5,
               "W_dec": (torch.rand(d_model, d_sae, generator=g) - 0.5) / d_model**0.5,
               "b_enc": (torch.rand(d_sae, generator=g) - 0.5) * 0.1,
               "b_dec": torch.rand(d_model, generator=g) - 0.5}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)
    return path


def write_release_saes(hub_root: Path, release_name: str, *, layers: list[int] | None = None,
                       distinct: bool = False) -> list[Path]:
    """Every layer of a release in a Hugging Face hub cache under ``hub_root``, exactly as ``hf_hub_download``
    lays it out (``qscope_testing.FakeHubCache``); existing layers are kept, so a later run reuses them.

    By default all layers hold the same random tensors: the hub cache is content-addressed, so they share one
    blob (512 MiB on disk for 28 layers instead of 14 GiB) and the store's integrity check (blob name =
    SHA-256) still holds. ``distinct`` writes one blob per layer (different seeds) for page-cache-realistic runs.
    """
    from qscope_testing import FakeHubCache

    from qscope_plugin.catalogue import release

    rel = release(release_name)
    cache = FakeHubCache(hub_root, revision=SNAPSHOT)
    links, shared = [], None
    for n in range(rel.n_layers) if layers is None else layers:
        link = cache.snapshot(rel.repo_id) / f"layer{n}.sae.pt"
        if not link.exists():
            if shared is None or distinct:
                staging = hub_root / f"staging-{n}.pt"
                write_sae_blob(staging, rel.d_model, rel.d_sae, seed=n if distinct else 0)
                shared = cache.add_blob(rel.repo_id, staging)
            cache.link(rel.repo_id, link.name, shared)
        links.append(link)
    return links
