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
