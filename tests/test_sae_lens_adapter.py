from __future__ import annotations

import pytest
import torch

import qscope_plugin  # noqa: F401  (registers the adapter)
from qscope_plugin import load_sae

REPO = "Qwen/SAE-Res-Qwen3.5-2B-Base-W32K-L0_100"
RELEASE = "qwen-scope-3.5-2b-base-w32k-l100"


def test_from_pretrained_goes_through_the_plugin(hub_cache):
    from sae_lens import SAE

    tensors = hub_cache.add_sae(REPO, 11, d_model=32, d_sae=128)
    sae = SAE.from_pretrained(RELEASE, "layer11")
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (32, 128, 100)  # widths from the file
    meta = sae.cfg.metadata
    assert meta.prepend_bos is False  # Qwen tokenizers add no BOS
    assert meta.hook_name == "blocks.11.hook_resid_post"
    assert meta.hf_hook_name == "model.layers.11"
    assert meta.model_name == "Qwen/Qwen3.5-2B-Base"
    # parameters are transposed views of the memory-mapped file, not copies
    assert not sae.W_enc.is_contiguous() and torch.equal(sae.W_enc, tensors["W_enc"].T)
    ours = load_sae(RELEASE, 11, cache=None)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), ours.encode(x), atol=1e-6)
        assert torch.allclose(sae(x), ours.reconstruct(x), atol=1e-5)


def test_bf16_keeps_the_fast_layout(hub_cache):
    from sae_lens import SAE

    hub_cache.add_sae(REPO, 3, d_model=32, d_sae=128)
    sae = SAE.from_pretrained(RELEASE, "layer3", dtype="bfloat16")
    assert sae.W_enc.dtype == torch.bfloat16
    assert sae.W_enc.stride() == (1, 32)  # still (d_sae, d_in) in memory: x @ W_enc is a fast GEMM


def test_upstream_loader_copies_and_needs_a_width_table(hub_cache):
    """What the adapter replaces: SAELens' own loader fails on widths outside its table, copies both matrices,
    and sets prepend_bos=True (wrong for Qwen)."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    hub_cache.add_sae(REPO, 4, d_model=32, d_sae=128)
    cfg, state, _ = loaders.qwen_scope_sae_huggingface_loader(REPO, "layer4.sae.pt")
    assert cfg["d_in"] == 2048 and cfg["prepend_bos"] is True  # from a table, not the 32-wide file
    assert state["W_enc"].is_contiguous() and state["W_enc"].shape == (32, 128)  # a transposed copy
    from sae_lens import SAE

    with pytest.raises(RuntimeError, match="size mismatch"):
        SAE.from_pretrained(RELEASE, "layer4", converter=loaders.qwen_scope_sae_huggingface_loader)


def test_register_is_idempotent_and_restores_missing_releases():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from qscope_plugin.adapters.sae_lens import register

    assert register() == []
    directory = get_pretrained_saes_directory()
    saved = directory.pop(RELEASE)
    try:
        assert register() == [RELEASE]  # an SAELens without this release gets it
        assert list(directory[RELEASE].saes_map)[:2] == ["layer0", "layer1"]
        assert directory[RELEASE].saes_map["layer5"] == "layer5.sae.pt"
    finally:
        directory[RELEASE] = saved


def test_registration_waits_for_sae_lens_import():
    """`import qscope_plugin` must not pay SAELens' import cost, yet register once SAELens is imported."""
    import subprocess
    import sys

    code = (
        "import sys, qscope_plugin\n"
        "assert 'sae_lens' not in sys.modules\n"
        "from sae_lens.loading import pretrained_sae_loaders as L\n"
        "from qscope_plugin.adapters.sae_lens import qwen_scope_loader\n"
        "assert L.NAMED_PRETRAINED_SAE_LOADERS['qwen_scope'] is qwen_scope_loader\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("first_use", [
    "import sae_lens",
    "import qscope_plugin.adapters.sae_lens",  # the adapter module imports SAELens itself
    "qscope_plugin.QwenScopeSAE(t, qscope_plugin.QScopeSAEConfig(4, 8, 2)).to_sae_lens()",
])
def test_registration_in_a_fresh_process_whatever_loads_sae_lens_first(first_use):
    """Regression: when the adapter was what imported SAELens, the import hook ran inside the half-loaded adapter,
    raised ImportError and left SAELens half-registered for the rest of the process."""
    import subprocess
    import sys

    code = ("import torch, qscope_plugin\n"
            "t = {'W_enc': torch.randn(8, 4), 'W_dec': torch.randn(4, 8), 'b_enc': torch.zeros(8), "
            "'b_dec': torch.zeros(4)}\n"
            f"{first_use}\n"
            "from sae_lens.loading import pretrained_sae_loaders as loaders\n"
            "from qscope_plugin.adapters.sae_lens import qwen_scope_loader\n"
            "assert loaders.NAMED_PRETRAINED_SAE_LOADERS['qwen_scope'] is qwen_scope_loader\n"
            "print('registered')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "registered", out.stderr[-2000:]


def test_force_download_reaches_the_hub_client(hub_cache, monkeypatch):
    """SAELens' ``force_download=True`` asks the hub for the file again (offline here, so the request is recorded
    and then served from the cache by the real client)."""
    import huggingface_hub
    from sae_lens import SAE

    real, requests = huggingface_hub.hf_hub_download, []

    def recording(*args, force_download=False, **kwargs):
        requests.append((args[1], force_download))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    hub_cache.add_sae(REPO, 5, d_model=32, d_sae=128)
    SAE.from_pretrained(RELEASE, "layer5")
    assert ("layer5.sae.pt", True) not in requests
    SAE.from_pretrained(RELEASE, "layer5", force_download=True)
    assert ("layer5.sae.pt", True) in requests


def test_demo_release_loads_offline_through_sae_lens(hub_cache):
    """The embedded demo is a SAELens release too, so SAELens tutorials run end to end on the CLI's default."""
    from sae_lens import SAE

    from qscope_plugin.models import DEMO_MODEL_DIR
    from qscope_plugin.store import DEMO_RELEASE

    sae = SAE.from_pretrained(DEMO_RELEASE, "layer3")  # the hub cache is empty: nothing may be downloaded
    ours = load_sae(DEMO_RELEASE, 3, cache=None)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (ours.cfg.d_model, ours.cfg.d_sae, ours.cfg.k)
    assert sae.cfg.metadata.model_name == str(DEMO_MODEL_DIR)  # a folder TransformerLens and transformers load
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(7, ours.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(sae.encode(x), ours.encode(x))
