"""qscope-plugin: Qwen-Scope sparse autoencoders, exact and fast, in SAELens, TransformerLens and nnsight.

    >>> import qscope_plugin as qs
    >>> sae = qs.load_sae("qwen-scope-3-1.7b-base-w32k-l50", layer=14)
    >>> values, features = sae.encode_sparse(resid_post_14)

Importing this package registers the Qwen-Scope loader with SAELens when SAELens is installed
(``qscope_plugin.adapters.sae_lens.register()``; idempotent).
"""

from __future__ import annotations

import importlib.abc
import sys
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec

from qscope_plugin.catalogue import LICENSE_NOTICE, Release, release, releases
from qscope_plugin.errors import (
    ChecksumMismatchError,
    ContextLengthError,
    FeatureOutOfRangeError,
    HubError,
    HubFileNotFoundError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubUnreachableError,
    IndexOutOfRangeError,
    IndexSpecError,
    IntegrityError,
    LayerOutOfRangeError,
    MalformedFileError,
    NotCachedError,
    QScopeError,
    QScopeWarning,
    SAEFileError,
    SAEInputError,
    UnknownReleaseError,
)

# The SAE and the store import torch (seconds); they load on first use so that `qscope --help`, `qscope releases`
# and the catalogue stay instant.
_LAZY = {"QScopeSAEConfig": "qscope_plugin.sae", "QwenScopeSAE": "qscope_plugin.sae", "load_sae": "qscope_plugin.store"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qscope_plugin' has no attribute {name!r}")


try:
    __version__ = version("qscope-plugin")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "LICENSE_NOTICE",
    "ChecksumMismatchError",
    "ContextLengthError",
    "FeatureOutOfRangeError",
    "HubError",
    "HubFileNotFoundError",
    "HubRepoNotFoundError",
    "HubRevisionNotFoundError",
    "HubUnreachableError",
    "IndexOutOfRangeError",
    "IndexSpecError",
    "IntegrityError",
    "LayerOutOfRangeError",
    "MalformedFileError",
    "NotCachedError",
    "QScopeError",
    "QScopeSAEConfig",
    "QScopeWarning",
    "QwenScopeSAE",
    "Release",
    "SAEFileError",
    "SAEInputError",
    "UnknownReleaseError",
    "load_sae",
    "release",
    "releases",
]


def _register_with_sae_lens() -> None:
    """Register the SAELens adapter now if SAELens is loaded, else the moment it is first imported.

    Importing SAELens costs ~6 s and ~1 GiB, so ``import qscope_plugin`` must not do it just to register.
    """
    if "sae_lens" in sys.modules:
        adapter = sys.modules.get("qscope_plugin.adapters.sae_lens")
        if adapter is not None and not hasattr(adapter, "register"):
            return  # the adapter itself is importing SAELens; it registers when it has finished loading
        from qscope_plugin.adapters.sae_lens import register

        register()
    elif find_spec("sae_lens") is not None and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("sae_lens", _register_with_sae_lens))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` right after the module ``name`` has finished executing, then steps aside."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_register(module) -> None:
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_register
        return spec


_register_with_sae_lens()
