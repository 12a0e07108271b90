"""SAE files are untrusted pickles: load with weights_only=True and give one clear error for every bad file."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from qscope_testing import make_sae_tensors

from qscope_plugin import QwenScopeSAE
from qscope_plugin.errors import SAEFileError


class _Exploit:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path):
    marker = tmp_path / "pwned"
    payload = {**make_sae_tensors(d_model=8, d_sae=16), "extra": _Exploit(str(marker))}
    torch.save(payload, tmp_path / "layer0.sae.pt")
    with pytest.raises(SAEFileError, match=r"refused to load .* not a plain tensor file \(.*posix\.system\)") as e:
        QwenScopeSAE.from_file(tmp_path / "layer0.sae.pt", k=4)
    assert "weights_only" not in str(e.value)  # PyTorch's advice to load it unsafely is not passed on
    assert not marker.exists()
    # the same file *would* run code if loaded unsafely: proof that the test can fail
    torch.load(tmp_path / "layer0.sae.pt", weights_only=False)
    assert marker.exists()


def test_legacy_raw_pickle_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    (tmp_path / "layer0.sae.pt").write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(SAEFileError):
        QwenScopeSAE.from_file(tmp_path / "layer0.sae.pt", k=4)
    assert not marker.exists()


def test_truncated_file(tmp_path: Path):
    torch.save(make_sae_tensors(d_model=8, d_sae=16), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "layer0.sae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFileError, match="cannot read .* download it again"):
        QwenScopeSAE.from_file(tmp_path / "layer0.sae.pt", k=4)
    assert zipfile.is_zipfile(tmp_path / "full.pt")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.pop("b_dec"), "expected tensors"),
        (lambda t: t.update(W_dec=torch.zeros(8, 15)), r"W_dec has shape \(8, 15\), expected \(8, 16\)"),
        (lambda t: t.update(W_enc=torch.zeros(16)), "W_enc must be 2-D"),
        (lambda t: t.update(threshold=torch.zeros(16)), "unexpected entries"),
        (lambda t: t.update(b_enc=torch.zeros(16, dtype=torch.int64)), "one float dtype"),
    ],
)
def test_structure_errors(tmp_path: Path, mutate, message):
    tensors = make_sae_tensors(d_model=8, d_sae=16)
    mutate(tensors)
    torch.save(tensors, tmp_path / "layer0.sae.pt")
    with pytest.raises(SAEFileError, match=message):
        QwenScopeSAE.from_file(tmp_path / "layer0.sae.pt", k=4)


def test_not_a_dict(tmp_path: Path):
    torch.save(torch.zeros(3), tmp_path / "layer0.sae.pt")
    with pytest.raises(SAEFileError, match="not a Qwen-Scope SAE"):
        QwenScopeSAE.from_file(tmp_path / "layer0.sae.pt", k=4)


def test_nan_weights_caught_by_validate(tmp_path: Path):
    tensors = make_sae_tensors(d_model=8, d_sae=16)
    tensors["W_enc"][3, 2] = float("nan")
    torch.save(tensors, tmp_path / "layer0.sae.pt")
    sae = QwenScopeSAE.from_file(tmp_path / "layer0.sae.pt", k=4)  # structure is fine: loads lazily
    with pytest.raises(SAEFileError, match="W_enc has 1 non-finite"):
        sae.validate()


def test_zero_decoder_caught_by_validate(tmp_path: Path):
    tensors = make_sae_tensors(d_model=8, d_sae=16)
    tensors["W_dec"].zero_()
    torch.save(tensors, tmp_path / "layer0.sae.pt")
    with pytest.raises(SAEFileError, match="every decoder column is zero"):
        QwenScopeSAE.from_file(tmp_path / "layer0.sae.pt", k=4).validate()
