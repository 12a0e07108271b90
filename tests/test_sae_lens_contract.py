"""SAELens' own contract for Qwen-Scope, asserted with the plugin active (issue 21).

These mirror what SAELens' tests assert about its loader (``tests/loading/test_pretrained_sae_loaders.py``:
config fields and values, the ``ValueError`` messages) through the public entry points ``SAE.from_pretrained`` /
``load_sae_config_from_huggingface``, plus ``save_model`` / ``load_from_disk``. Offline, on the fake hub cache.
"""

from __future__ import annotations

import pytest
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


@pytest.fixture
def no_downloads(hub_cache, monkeypatch):
    """An empty offline hub cache, and any attempt to fetch a file fails the test."""
    import huggingface_hub
    from sae_lens.loading import pretrained_sae_loaders

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to fetch {args or kwargs} from the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", refuse)
    return hub_cache


@pytest.mark.parametrize(("release", "sae_id", "d_in", "d_sae", "k", "model_name"), [
    ("qwen-scope-3-1.7b-base-w32k-l50", "layer5", 2048, 32768, 50, "Qwen/Qwen3-1.7B-Base"),
    ("qwen-scope-3-1.7b-base-w32k-l50", "layer7", 2048, 32768, 50, "Qwen/Qwen3-1.7B-Base"),
    ("qwen-scope-3.5-27b-w80k-l100", "layer42", 5120, 80 * 1024, 100, "Qwen/Qwen3.5-27B"),  # no "-Base" suffix
    ("qwen-scope-3-30b-a3b-base-w128k-l100", "layer47", 2048, 128 * 1024, 100, "Qwen/Qwen3-30B-A3B-Base"),
    ("qwen-scope-3.5-9b-base-w64k-l50", "layer0", 4096, 64 * 1024, 50, "Qwen/Qwen3.5-9B-Base"),
])
def test_config_reads_no_weights_and_matches_sae_lens(no_downloads, release, sae_id, d_in, d_sae, k, model_name):
    """Asking for a config fetches nothing (the cache is empty and offline) and says what SAELens' loader says."""
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    repo_id, folder_name = get_repo_id_and_folder_name(release, sae_id)
    cfg = loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS["qwen_scope"](repo_id, folder_name, "meta")
    layer = int(sae_id.removeprefix("layer"))
    assert cfg["architecture"] == "topk" and cfg["activation_fn"] == "topk"
    assert cfg["activation_fn_kwargs"] == {"k": k}
    assert (cfg["d_in"], cfg["d_sae"], cfg["model_name"]) == (d_in, d_sae, model_name)
    assert cfg["hook_name"] == f"blocks.{layer}.hook_resid_post" and cfg["hf_hook_name"] == f"model.layers.{layer}"
    assert cfg["hook_head_index"] is None and cfg["device"] == "meta"
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is False
    assert cfg["prepend_bos"] is False  # deliberate: Qwen-Scope was trained without BOS
    upstream = loaders.get_qwen_scope_config_from_hf(repo_id, folder_name, "meta")
    assert {key: cfg[key] for key in upstream if key != "prepend_bos"} == {
        key: value for key, value in upstream.items() if key != "prepend_bos"}
    # the public entry point gives SAELens' own answer too (after its defaulting), prepend_bos aside
    public = loaders.load_sae_config_from_huggingface(release, sae_id, device="meta")
    expected = loaders.handle_config_defaulting({**upstream, "prepend_bos": False})
    assert public == expected


def test_config_overrides_apply(no_downloads):
    from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_CONFIG_GETTERS

    cfg = NAMED_PRETRAINED_SAE_CONFIG_GETTERS["qwen_scope"](
        REPO, "layer0.sae.pt", "cpu", cfg_overrides={"dataset_path": "custom/dataset", "context_size": 4096})
    assert cfg["dataset_path"] == "custom/dataset" and cfg["context_size"] == 4096


@pytest.mark.parametrize("entry", ["config", "loader"])
@pytest.mark.parametrize(("repo_id", "folder_name", "message"), [
    (REPO, "invalid.pt", "Could not find layer number in filename: invalid.pt"),
    ("Qwen/SAE-Res-Qwen99-1B-Base-W32K-L0_50", "layer0.sae.pt", "Unknown Qwen Scope base model"),
    ("someone/random-repo", "layer0.sae.pt", "Could not parse Qwen Scope repo_id"),
])
def test_invalid_input_is_a_value_error_before_any_network_access(no_downloads, entry, repo_id, folder_name, message):
    """SAELens' error contract: ``ValueError`` with its phrases, raised before the hub is asked for anything."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    table = loaders.NAMED_PRETRAINED_SAE_CONFIG_GETTERS if entry == "config" else loaders.NAMED_PRETRAINED_SAE_LOADERS
    with pytest.raises(ValueError, match=message):
        table["qwen_scope"](repo_id=repo_id, folder_name=folder_name, device="cpu")


def test_layer_out_of_range_is_refused_without_network(no_downloads):
    from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_CONFIG_GETTERS

    with pytest.raises(ValueError, match="layer 28 is out of range"):
        NAMED_PRETRAINED_SAE_CONFIG_GETTERS["qwen_scope"](REPO, "layer28.sae.pt", "cpu")
