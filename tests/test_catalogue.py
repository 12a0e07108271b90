from __future__ import annotations

import pytest

from qscope_plugin import release, releases
from qscope_plugin.errors import LayerOutOfRangeError, UnknownReleaseError


def test_fourteen_groups_with_544_saes():
    assert len(releases()) == 14
    assert sum(r.n_layers for r in releases()) == 544


def test_matches_sae_lens_registry():
    """Drift between our table and SAELens' pretrained_saes.yaml fails here, not at users."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    for r in releases():
        entry = directory[r.name]
        assert entry.repo_id == r.repo_id
        assert entry.model == r.model_id
        assert list(entry.saes_map) == list(r.sae_ids)
        assert set(entry.expected_l0.values()) == {r.k}
        assert entry.conversion_func == "qwen_scope"


def test_sizes_follow_the_spec():
    r = release("qwen-scope-3-1.7b-base-w32k-l50")
    assert r.bytes_per_layer == 537_010_176  # 537.0 MB, docs/method.md §1.3
    assert release("qwen-scope-3.5-27b-w80k-l100").d_sae == 81920
    assert [r.name for r in releases() if r.instruct] == ["qwen-scope-3.5-27b-w80k-l50", "qwen-scope-3.5-27b-w80k-l100"]
    assert {r.d_sae // r.d_model for r in releases()} == {16, 64}


def test_lookup_by_repo_id():
    assert release("Qwen/SAE-Res-Qwen3.5-2B-Base-W32K-L0_100").name == "qwen-scope-3.5-2b-base-w32k-l100"


def test_unknown_release_suggests_close_names():
    with pytest.raises(UnknownReleaseError, match="did you mean 'qwen-scope-3-8b-base-w64k-l50'"):
        release("qwen-scope-3-8b-base-w64k-l5")
    with pytest.raises(ValueError, match="qscope releases"):  # also a ValueError, as SAELens raises
        release("gpt2-small")


@pytest.mark.parametrize("layer", [-1, 28, 1.0, True, "3"])
def test_check_layer_rejects(layer):
    with pytest.raises(LayerOutOfRangeError, match=r"0\.\.27"):
        release("qwen-scope-3-1.7b-base-w32k-l50").check_layer(layer)


def test_backbone_mismatch_warns_but_never_refuses():
    from qscope_plugin.catalogue import check_backbone
    from qscope_plugin.errors import QScopeWarning

    rel = release("qwen-scope-3.5-2b-base-w32k-l100")
    assert check_backbone(rel, "Qwen/Qwen3.5-2B-Base") is True
    with pytest.warns(QScopeWarning, match="trained on Qwen/Qwen3.5-2B-Base, not 'Qwen/Qwen3.5-2B'"):
        assert check_backbone(rel, "Qwen/Qwen3.5-2B") is False
