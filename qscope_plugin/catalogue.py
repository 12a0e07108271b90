"""The Qwen-Scope release catalogue: the 14 SAE groups, named as SAELens names them.

    >>> from qscope_plugin import release
    >>> r = release("qwen-scope-3-1.7b-base-w32k-l50")
    >>> r.repo_id, r.d_sae, r.k, r.sae_ids[14]
    ('Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50', 32768, 50, 'layer14')

The backbone pairing comes from the report's Table 1, not from the model cards, whose "Base model" field is
unreliable (docs/method.md §1.1 rule 5). ``tests/test_catalogue.py`` checks this table against SAELens' registry.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Literal

from qscope_plugin.errors import QScopeWarning, UnknownReleaseError, layer_out_of_range

Family = Literal["qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe"]

DEMO_RELEASE = "qscope-demo-qwen3-4l"
"""The SAEs of the demo model shipped inside the package (not on the hub; see ``store.DEMO_SAE_DIR``)."""

LICENSE_NOTICE = (
    "Qwen-Scope SAEs are released under the Qwen license (license: other, license_name: qwen). "
    "Caution: do not use interpretability methods to interfere with model capabilities for non-scientific "
    "purposes or to produce harmful content."
)


@dataclass(frozen=True)
class Release:
    """One group of per-layer SAEs trained on one backbone."""

    name: str
    """SAELens release name, e.g. ``qwen-scope-3-8b-base-w64k-l50``."""
    repo_id: str
    """Hugging Face repo holding ``layer{n}.sae.pt`` files."""
    model_id: str
    """The backbone the SAEs were trained on (report Table 1)."""
    family: Family
    d_model: int
    d_sae: int
    k: int
    n_layers: int
    instruct: bool = False
    """True only for the Qwen3.5-27B groups, trained on a post-trained checkpoint."""
    revision: str | None = None
    """Hub revision to pin; None follows ``main``."""

    @property
    def sae_ids(self) -> tuple[str, ...]:
        """SAELens SAE ids, ``layer0`` … ``layer{L-1}``."""
        return tuple(f"layer{n}" for n in range(self.n_layers))

    @property
    def bytes_per_layer(self) -> int:
        """Size of one float32 ``layer{n}.sae.pt`` payload (docs/method.md §1.3)."""
        return 4 * (2 * self.d_sae * self.d_model + self.d_sae + self.d_model)

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if it exists in this release, else raise a clear error."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise layer_out_of_range(layer, self.n_layers, f"release {self.name!r}")
        return layer


def _group(model: str, model_id: str, family: Family, d_model: int, n_layers: int,
           widths: tuple[tuple[int, int], ...], instruct: bool = False) -> tuple[Release, ...]:
    """All (width, k) groups of one backbone, named by the two published naming patterns (docs/method.md §1.1
    rule 1)."""
    version, size = model.split("-", 1)  # "3.5", "9b-base"
    out = []
    for width_k, k in widths:
        name = f"qwen-scope-{version}-{size}-w{width_k}k-l{k}"
        repo = f"Qwen/SAE-Res-Qwen{version}-{model_id.split('-', 1)[1]}-W{width_k}K-L0_{k}"
        out.append(Release(name, repo, model_id, family, d_model, width_k * 1024, k, n_layers, instruct))
    return tuple(out)


_RELEASES: tuple[Release, ...] = (
    *_group("3-1.7b-base", "Qwen/Qwen3-1.7B-Base", "qwen3", 2048, 28, ((32, 50), (32, 100))),
    *_group("3-8b-base", "Qwen/Qwen3-8B-Base", "qwen3", 4096, 36, ((64, 50), (64, 100))),
    *_group("3-30b-a3b-base", "Qwen/Qwen3-30B-A3B-Base", "qwen3_moe", 2048, 48, ((32, 50), (128, 100))),
    *_group("3.5-2b-base", "Qwen/Qwen3.5-2B-Base", "qwen3_5", 2048, 24, ((32, 50), (32, 100))),
    *_group("3.5-9b-base", "Qwen/Qwen3.5-9B-Base", "qwen3_5", 4096, 32, ((64, 50), (64, 100))),
    *_group("3.5-27b", "Qwen/Qwen3.5-27B", "qwen3_5", 5120, 64, ((80, 50), (80, 100)), instruct=True),
    *_group("3.5-35b-a3b-base", "Qwen/Qwen3.5-35B-A3B-Base", "qwen3_5_moe", 2048, 40, ((32, 50), (128, 100))),
)
_BY_NAME = {r.name: r for r in _RELEASES}
_BY_REPO = {r.repo_id: r for r in _RELEASES}


def releases() -> tuple[Release, ...]:
    """All Qwen-Scope releases, in the report's order."""
    return _RELEASES


def release(name: str) -> Release:
    """Look up a release by SAELens name (or by its Hugging Face repo id).

    Raises:
        UnknownReleaseError: listing the closest valid names.
    """
    found = _BY_NAME.get(name) or _BY_REPO.get(name)
    if found is not None:
        return found
    close = difflib.get_close_matches(str(name), [*_BY_NAME, *_BY_REPO], n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else "run `qscope releases` to list them"
    raise UnknownReleaseError(f"unknown Qwen-Scope release {name!r}; {hint}")


def check_backbone(rel: Release, model_id: str | None) -> bool:
    """Warn (never refuse) when SAEs are used on a model other than the one they were trained on.

    Base-trained SAEs on post-trained checkpoints are endorsed by the model cards ("also reasonable"), so this
    is information, not an error (docs/method.md §1.1 rule 6). Returns True when the pairing matches.
    """
    if model_id is None or model_id == rel.model_id:
        return True
    warnings.warn(
        f"{rel.name} was trained on {rel.model_id}, not {model_id!r}; features may shift (a third party measured "
        "FVU 0.198 on base vs 0.205 on instruct for Qwen3.5-2B layer 12)",
        QScopeWarning,
        stacklevel=2,
    )
    return False
