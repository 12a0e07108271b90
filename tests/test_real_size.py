"""Every Qwen-Scope backbone at its real configuration, on the meta device (no memory, no weights): it boots in
plain transformers, the TransformerLens bridge and nnsight, its hook points resolve for every layer, and the SAE
catalogue agrees with its config. Full-size SAE files go through the real store."""

from __future__ import annotations

import pytest
import torch
from real_size import CONFIGS, backbone_config, meta_model, text_config, write_release_saes

from qscope_plugin.backends import as_backend
from qscope_plugin.catalogue import releases

BACKBONES = sorted({r.model_id for r in releases()})


def test_every_catalogued_backbone_has_a_configuration():
    assert sorted(CONFIGS) == BACKBONES


@pytest.mark.parametrize("model_id", BACKBONES)
def test_catalogue_agrees_with_the_published_config(model_id):
    cfg = text_config(backbone_config(model_id))
    for rel in (r for r in releases() if r.model_id == model_id):
        assert (rel.d_model, rel.n_layers) == (cfg.hidden_size, cfg.num_hidden_layers), rel.name
        assert rel.family == cfg.model_type.removesuffix("_text")


@pytest.mark.parametrize("model_id", BACKBONES)
@pytest.mark.parametrize("text_only", [False, True], ids=["published", "causal-lm"])
def test_boots_on_meta_and_every_layer_resolves(model_id, text_only):
    model = meta_model(model_id, text_only=text_only)
    backend = as_backend(model)
    cfg = text_config(model.config)
    assert backend.n_layers == cfg.num_hidden_layers
    assert backend.module.get_input_embeddings().weight.shape == (cfg.vocab_size, cfg.hidden_size)
    assert backend.check_layers(range(cfg.num_hidden_layers)) == list(range(cfg.num_hidden_layers))
    if cfg.model_type.startswith("qwen3_5"):  # Qwen3.5: SAEs exist for Gated DeltaNet and attention blocks alike
        kinds = {type(getattr(block, "linear_attn", None) or block.self_attn).__name__ for block in backend.layers}
        assert len(kinds) == 2


@pytest.fixture(scope="module")
def tok():
    from qscope_testing import qwen3_tokenizer

    return qwen3_tokenizer()


@pytest.mark.parametrize("model_id", BACKBONES)
def test_bridge_boots_on_meta_with_every_hook(model_id, tok):
    pytest.importorskip("transformer_lens")
    from qscope_plugin.adapters.transformer_lens import boot, hook_name

    bridge = boot(meta_model(model_id), tokenizer=tok)  # the published layout, booted as its text tower
    cfg = text_config(backbone_config(model_id))
    assert (bridge.cfg.d_model, bridge.cfg.n_layers) == (cfg.hidden_size, cfg.num_hidden_layers)
    assert all(hook_name(n) in bridge.hook_dict for n in range(cfg.num_hidden_layers))


@pytest.mark.parametrize("model_id", BACKBONES)
def test_nnsight_loads_lazily_with_every_block(model_id, tok, tmp_path):
    pytest.importorskip("nnsight")
    from qscope_plugin.adapters.nnsight import block, load

    backbone_config(model_id).save_pretrained(tmp_path)  # nnsight's own lazy load: the config, weights on meta
    lm = load(str(tmp_path), tokenizer=tok)
    cfg = text_config(backbone_config(model_id))
    assert lm._module.get_input_embeddings().weight.is_meta
    assert all(block(lm, n) is not None for n in range(cfg.num_hidden_layers))
    with pytest.raises(AttributeError):  # nnsight's own error past the last block
        block(lm, cfg.num_hidden_layers)


def test_full_size_saes_load_through_the_store(hub_cache):
    """Real width, every layer, one shared blob; loaded by release name through hf_hub_download (offline)."""
    from qscope_plugin.store import SAECache, load_sae, verify

    name = "qwen-scope-3-1.7b-base-w32k-l50"
    links = write_release_saes(hub_cache.root, name, layers=[0, 27])
    assert links[0].resolve() == links[1].resolve()  # content-addressed: identical layers share one blob
    cache = SAECache()
    sae = load_sae(name, 27, cache=cache)
    assert (sae.cfg.d_model, sae.cfg.d_sae, sae.cfg.k, sae.cfg.layer) == (2048, 32768, 50, 27)
    assert [c.status for c in verify(name, [0, 27])] == ["ok", "ok"]
    x = torch.randn(3, 2048)
    values, indices = sae.encode_sparse(x)
    expected = torch.relu(x @ sae.W_enc.T + sae.b_enc).topk(50, dim=-1).values
    torch.testing.assert_close(values.sort(dim=-1).values, expected.sort(dim=-1).values)
