from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from qscope_testing import make_sae_tensors, write_sae_file

from qscope_plugin import FeatureOutOfRangeError, QwenScopeSAE
from qscope_plugin.sae import QScopeSAEConfig, SAEInputError


def reference_encode(t: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """The official app's order: TopK of ReLU(pre), scattered (docs/method.md E1-E2), written out plainly."""
    pre = x @ t["W_enc"].T + t["b_enc"]
    acts = torch.relu(pre)
    z = torch.zeros_like(acts)
    for i in range(acts.shape[0]):
        top = torch.argsort(acts[i], descending=True)[:k]
        z[i, top] = acts[i, top]
    return z


def reference_decode(t: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return z @ t["W_dec"].T + t["b_dec"]


@pytest.fixture
def sae_and_tensors(tmp_path):
    tensors = write_sae_file(tmp_path / "layer3.sae.pt", d_model=16, d_sae=64)
    return QwenScopeSAE.from_file(tmp_path / "layer3.sae.pt", k=8, layer=3), tensors


def test_loads_without_copy_in_file_layout(sae_and_tensors):
    sae, tensors = sae_and_tensors
    assert sae.cfg == QScopeSAEConfig(d_model=16, d_sae=64, k=8, layer=3)
    assert sae.W_enc.shape == (64, 16) and sae.W_dec.shape == (16, 64)
    assert sae.W_enc.is_contiguous() and sae.W_dec.is_contiguous()
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post"
    for key in tensors:
        assert torch.equal(getattr(sae, key), tensors[key])


def test_encode_decode_equal_reference(sae_and_tensors):
    sae, t = sae_and_tensors
    x = torch.randn(2, 5, 16)
    z = sae.encode(x)
    assert torch.allclose(z.reshape(10, 64), reference_encode(t, x.reshape(10, 16), 8), atol=1e-6)
    assert torch.allclose(sae.decode(z), reference_decode(t, z), atol=1e-6)
    assert torch.allclose(sae.reconstruct(x), reference_decode(t, z), atol=1e-5)
    assert torch.allclose(sae.pre_acts(x), x @ t["W_enc"].T + t["b_enc"], atol=1e-6)


def test_b_dec_is_not_subtracted_before_encoding(sae_and_tensors):
    sae, t = sae_and_tensors
    x = torch.randn(4, 16)
    wrong = reference_encode(t, x - t["b_dec"], 8)
    assert not torch.allclose(sae.encode(x), wrong, atol=1e-3)


def test_relu_applies_when_fewer_than_k_are_positive(tmp_path):
    t = make_sae_tensors(d_model=8, d_sae=32)
    t["b_enc"] = torch.full((32,), -10.0)
    torch.save(t, tmp_path / "layer0.sae.pt")
    sae = QwenScopeSAE.from_file(tmp_path / "layer0.sae.pt", k=8)
    z = sae.encode(torch.randn(3, 8) * 0.1)
    assert (z >= 0).all() and (z > 0).sum() == 0  # the model-card demo (no ReLU) would keep 8 negatives


def test_matches_sae_lens_topk_sae(sae_and_tensors):
    """Same weights through SAELens' own TopKSAE (contiguous copies, its own math)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    sae, t = sae_and_tensors
    theirs = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=8, apply_b_dec_to_input=False))
    theirs.load_state_dict({"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"].T.contiguous(),
                            "b_enc": t["b_enc"], "b_dec": t["b_dec"]})
    x = torch.randn(7, 16)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), theirs.encode(x), atol=1e-6)
        assert torch.allclose(sae.reconstruct(x), theirs(x), atol=1e-5)


def test_to_sae_lens_shares_storage(sae_and_tensors):
    sae, _ = sae_and_tensors
    theirs = sae.to_sae_lens()
    assert theirs.W_enc.data_ptr() == sae.W_enc.data_ptr() and theirs.W_dec.data_ptr() == sae.W_dec.data_ptr()
    assert theirs.cfg.metadata.prepend_bos is False
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 64), seed=st.integers(0, 2**16), scale=st.floats(0.01, 10))
def test_sparse_paths_equal_dense(n, k, seed, scale):
    t = make_sae_tensors(d_model=16, d_sae=64, seed=seed)
    from qscope_plugin.sae import QScopeSAEConfig as Cfg

    sae = QwenScopeSAE(t, Cfg(d_model=16, d_sae=64, k=k))
    x = scale * torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    values, idx = sae.encode_sparse(x)
    assert values.shape == idx.shape == (n, k)
    assert (values >= 0).all()
    z = sae.encode(x)
    assert ((z > 0).sum(-1) <= k).all()
    tol = 1e-4 * max(1.0, scale)
    assert torch.allclose(sae.decode_sparse(values, idx), sae.decode(z), atol=tol)
    copy = sae.to()  # feature-major decoder: the embedding-bag path
    assert torch.allclose(copy.decode_sparse(values, idx), sae.decode(z), atol=tol)
    assert torch.allclose(copy.decode(z), sae.decode(z), atol=tol)


def test_to_copies_once_into_a_feature_major_decoder(sae_and_tensors, monkeypatch):
    import qscope_plugin.sae as sae_module

    sae, t = sae_and_tensors
    monkeypatch.setattr(sae_module, "STAGING_ELEMENTS", 16 * 5)  # transposed 5 features at a time: 13 blocks
    copy = sae.to("cpu")
    assert copy.W_dec.shape == (16, 64) and copy.W_dec.stride() == (1, 16)  # column i is one contiguous row
    assert torch.equal(copy.W_dec, t["W_dec"]) and copy.W_dec.data_ptr() != sae.W_dec.data_ptr()
    assert torch.equal(copy.direction(5), t["W_dec"][:, 5])
    values, idx = sae.encode_sparse(torch.randn(3, 4, 16))
    expected = torch.einsum("btk,dbtk->btd", values, t["W_dec"][:, idx]) + t["b_dec"]
    for decoder in (sae, copy):  # strided-column gather and embedding bag
        assert torch.allclose(decoder.decode_sparse(values, idx), expected, atol=1e-5)
        assert torch.allclose(decoder.decode_sparse(values, idx.to(torch.int16)), expected, atol=1e-5)
        assert torch.equal(decoder.decode_sparse(values[..., :0], idx[..., :0]), t["b_dec"].expand(3, 4, 16))
    # bf16 on CPU: AVX2 keeps the file layout (a feature-major bf16 GEMM is ~80x slower there, docs/upstream.md
    # §1.4), AVX-512 takes SAELens' feature-major one; each capability is fixed so both run on any CPU
    for capability, stride in (("AVX2", (64, 1)), ("AVX512", (1, 16))):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        half = sae.to(dtype=torch.bfloat16)
        assert half.W_dec.stride() == stride, capability
        assert torch.allclose(half.decode_sparse(values, idx).float(), expected, atol=0.05, rtol=0.02), capability


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_bf16_cpu_layout_follows_the_cpu_capability(sae_and_tensors, monkeypatch, capability):
    """AVX2 keeps the file layout for bf16 copies; AVX-512 gets SAELens' (encoder transposed, decoder
    feature-major); both compute the same codes."""
    sae, t = sae_and_tensors
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    half = sae.to(dtype=torch.bfloat16)
    file_layout = capability == "AVX2"
    assert half.W_enc.shape == (64, 16) and half.W_enc.stride() == ((16, 1) if file_layout else (1, 64))
    assert half.W_dec.shape == (16, 64) and half.W_dec.stride() == ((64, 1) if file_layout else (1, 16))
    assert torch.equal(half.W_enc.float(), t["W_enc"].bfloat16().float())
    assert torch.equal(half.W_dec.float(), t["W_dec"].bfloat16().float())
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    values, idx = half.encode_sparse(x)
    expected = torch.relu(F.linear(x.float(), half.W_enc.float(), half.b_enc.float()))
    assert torch.allclose(values.float().sort(-1).values, expected.topk(8, dim=-1).values.sort(-1).values,
                          atol=0.05, rtol=0.02)


def test_long_batches_encode_in_chunks_under_the_memory_budget(sae_and_tensors, monkeypatch):
    """Pre-activations ``(tokens, d_sae)`` never exceed ENCODE_BUDGET_BYTES at once; the codes are unchanged."""
    import qscope_plugin.sae as sae_module

    sae, _ = sae_and_tensors
    x = torch.randn(3, 11, 16, generator=torch.Generator().manual_seed(1))  # 33 tokens
    whole_values, whole_idx = sae.encode_sparse(x)
    monkeypatch.setattr(sae_module, "ENCODE_BUDGET_BYTES", 5 * 64 * 4)  # 5 tokens of d_sae=64 floats
    widest, linear = [], F.linear
    monkeypatch.setattr(sae_module.F, "linear", lambda a, *rest: widest.append(a.reshape(-1, 16).shape[0])
                        or linear(a, *rest))
    values, idx = sae.encode_sparse(x)
    assert values.shape == idx.shape == (3, 11, 8) and max(widest) == 5 and len(widest) == 7
    assert torch.allclose(values.sort(-1).values, whole_values.sort(-1).values, atol=1e-5)  # GEMM blocking differs
    assert torch.allclose(torch.gather(torch.relu(x @ sae.W_enc.T + sae.b_enc), -1, idx), values, atol=1e-6)
    assert torch.equal(idx.sort(-1).values, whole_idx.sort(-1).values)


def test_bf16_runs_and_tracks_fp32(sae_and_tensors):
    sae, _ = sae_and_tensors
    half = sae.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and sae.dtype == torch.float32  # .to() copies, original untouched
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    full = sae.reconstruct(x)
    # bf16 rounding can swap a feature at the top-k boundary, so compare in aggregate
    assert (half.reconstruct(x).float() - full).norm() / full.norm() < 0.1


def test_direction_and_norms(sae_and_tensors):
    sae, t = sae_and_tensors
    assert torch.equal(sae.direction(5), t["W_dec"][:, 5])
    assert torch.allclose(sae.direction(5, normalize=True).norm(), torch.tensor(1.0))
    assert torch.allclose(sae.decoder_norms(), t["W_dec"].norm(dim=0))
    rows, bias = sae.encoder_rows([1, 7])
    assert torch.equal(rows, t["W_enc"][[1, 7]]) and torch.equal(bias, t["b_enc"][[1, 7]])


def test_fvu_matches_definition(sae_and_tensors):
    sae, t = sae_and_tensors
    x = torch.randn(50, 16)
    x_hat = reference_decode(t, reference_encode(t, x, 8))
    expected = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert sae.fvu(x) == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("bad", [torch.randn(3, 15), torch.randn(()), "text"])
def test_wrong_activation_shape_is_one_clear_error(sae_and_tensors, bad):
    sae, _ = sae_and_tensors
    with pytest.raises(SAEInputError, match=r"expected \(\.\.\., 16\)"):
        sae.encode(bad)


@pytest.mark.parametrize("feature", [-1, 64, 2.0])
def test_feature_out_of_range(sae_and_tensors, feature):
    sae, _ = sae_and_tensors
    with pytest.raises(FeatureOutOfRangeError, match=r"64 features: 0\.\.63"):
        sae.direction(feature)


def test_invalid_k(tmp_path):
    write_sae_file(tmp_path / "layer0.sae.pt", d_model=8, d_sae=16)
    with pytest.raises(SAEInputError, match="1 <= k <= d_sae"):
        QwenScopeSAE.from_file(tmp_path / "layer0.sae.pt", k=17)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(sae_and_tensors, dtype):
    sae, _ = sae_and_tensors
    gpu = sae.to("cuda", dtype)
    x = torch.randn(4, 16)
    assert gpu.reconstruct(x).device.type == "cuda"
    rel = (gpu.reconstruct(x).float().cpu() - sae.reconstruct(x)).norm() / sae.reconstruct(x).norm()
    assert rel < (1e-5 if dtype == torch.float32 else 0.1)


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mapped_file(ptr: int) -> str | None:
    """The file behind the memory mapping that holds address ``ptr`` (``/proc/self/maps``), if any."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            if lo <= ptr < hi:
                return fields[5].strip() if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_from_file_memory_maps_the_file(tmp_path):
    import gc

    path = tmp_path / "layer0.sae.pt"
    d_model, d_sae = 256, 32768  # W_enc + W_dec = 64 MiB of fp32
    torch.save({"W_enc": torch.ones(d_sae, d_model), "W_dec": torch.ones(d_model, d_sae),
                "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_model)}, path)
    gc.collect()
    size = path.stat().st_size
    assert size > 64 * 2**20

    before = _rss()
    sae = QwenScopeSAE.from_file(path, k=8)
    grown = _rss() - before
    assert grown < size / 16, f"loading grew RSS by {grown / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"
    for t in (sae.W_enc, sae.W_dec):  # the tensors live in a mapping of the file itself, not in a copy
        assert _mapped_file(t.untyped_storage().data_ptr()) == str(path.resolve())
    assert sae.W_enc.sum().item() == d_sae * d_model  # touching the pages maps them in: the RSS probe works
    assert _rss() - before > 16 * 2**20

    del sae
    gc.collect()
    copied = QwenScopeSAE.from_file(path, k=8, mmap=False)  # control: a plain load copies out of the file
    # (no RSS check here: in a long test run the allocator reuses freed memory, so RSS need not grow)
    assert _mapped_file(copied.W_enc.untyped_storage().data_ptr()) != str(path.resolve())


def test_non_finite_activations_warn_once_per_sae():
    import warnings

    from qscope_plugin.errors import QScopeWarning

    sae = QwenScopeSAE(make_sae_tensors(16, 64), QScopeSAEConfig(16, 64, 8, layer=3))
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae.encode_sparse(x)  # finite input: silent
    x[2, 5] = float("nan")
    with pytest.warns(QScopeWarning, match=r"layer 3: 1 of 64 input activations are NaN/inf"):
        sae.encode(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae.encode_sparse(x)  # once per SAE, not per call
    with pytest.warns(QScopeWarning, match="NaN/inf"):  # another SAE (a .to() copy) warns on its own
        sae.to().encode_sparse(torch.full((1, 16), float("inf")))
