"""SAELens' own contract for Qwen-Scope, asserted with the plugin active (issue 21).

These mirror what SAELens' tests assert about its loader (``tests/loading/test_pretrained_sae_loaders.py``:
config fields and values, the ``ValueError`` messages) through the public entry points ``SAE.from_pretrained`` /
``load_sae_config_from_huggingface``, plus ``save_model`` / ``load_from_disk``. Offline, on the fake hub cache.
"""

from __future__ import annotations

import torch

import qscope_plugin  # noqa: F401  (registers the adapter)

REPO = "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"
RELEASE = "qwen-scope-3-1.7b-base-w32k-l50"


def test_save_model_and_load_from_disk_round_trip(hub_cache, tmp_path):
    from sae_lens import SAE

    hub_cache.add_sae(REPO, 7, d_model=32, d_sae=128)
    sae = SAE.from_pretrained(RELEASE, "layer7")
    weights, cfg = sae.save_model(tmp_path / "saved")  # raised "non contiguous tensor: W_dec" on the views
    assert weights.is_file() and cfg.is_file()
    assert not sae.W_dec.is_contiguous()  # copies were made for the file, not for the loaded SAE
    back = SAE.load_from_disk(tmp_path / "saved")
    assert type(back) is type(sae) and (back.cfg.d_in, back.cfg.d_sae, back.cfg.k) == (32, 128, 50)
    assert back.cfg.metadata.hook_name == "blocks.7.hook_resid_post"
    for name, param in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], param), name  # bit-identical weights
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the file holds SAELens' contiguous layout: the GEMMs may round differently
        assert torch.equal(back.encode(x) > 0, sae.encode(x) > 0)
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(back(x), sae(x), rtol=1e-6, atol=1e-5)
