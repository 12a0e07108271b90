"""Where an SAE is encoded: beside its layer's activations, on the layer's device and in the model's dtype.

    >>> sae_here = placed(sae, hidden)                 # inside a layer hook: the copy for hidden's device / dtype
    >>> values, features = sae_here.encode_sparse(hidden)        # no activation leaves the device
    >>> saes = pin(saes, "cpu")                        # --sae-device cpu: encode in host memory instead

The rule, applied to the hidden state a layer hook receives (so it holds for one GPU, for a model spread over
several GPUs by ``device_map="auto"`` — each layer's SAE goes to that layer's GPU — and for CPU offload, where the
hidden states are on the execution device at the hook):

- CPU activations and a CPU SAE: the SAE is used as it is. A loaded SAE is the memory-mapped file (zero copy, no
  private memory); activations are cast to its float32 for the encode.
- otherwise the SAE is copied once to ``hidden.device`` in ``hidden.dtype`` (``QwenScopeSAE.to``: decoder stored
  feature-major) and the copy is kept with the SAE it came from, so every later batch, request and recipe in the
  process reuses it; it is freed with that SAE (the store's LRU) or by ``release``.
- ``pin(sae, device)`` (``--sae-device``, ``sae_device=``) overrides the device: the SAE is copied there (in the
  model's dtype, unless that device is the CPU, where the file is used as it is) and activations are moved to it,
  batch by batch: a GPU model with ``--sae-device cpu`` saves GPU memory at the cost of one host copy per batch.

Memory: a copy costs ``2 · d_sae · d_model`` values of the model's dtype per layer on that layer's device
(docs/placement.md has the table); ``recipes.harvest``'s ``layers_per_pass`` bounds how many are held at once.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Mapping

import torch

from qscope_plugin.sae import SAE_KEYS, QwenScopeSAE

SAEDevice = str | torch.device | None
"""An explicit device for the SAEs (``--sae-device``), or None: each layer's own device."""

_COPIES: weakref.WeakKeyDictionary[QwenScopeSAE, dict[tuple[torch.device, torch.dtype], QwenScopeSAE]] = (
    weakref.WeakKeyDictionary())
"""Per source SAE, its copies by (device, dtype): made once, dropped with the source."""
_HOMES: weakref.WeakKeyDictionary[QwenScopeSAE, torch.device] = weakref.WeakKeyDictionary()
"""Pinned SAEs and the device they encode on."""
_TWINS: weakref.WeakKeyDictionary[QwenScopeSAE, dict[torch.device, QwenScopeSAE]] = weakref.WeakKeyDictionary()
"""Per source SAE, its pinned twins by device."""
_LOCK = threading.Lock()  # the app serves requests from several threads: one copy per key, never two


def pin(saes: QwenScopeSAE | Mapping[int, QwenScopeSAE], device: SAEDevice):
    """SAEs that encode on ``device`` whatever device their layer is on (None: returned unchanged).

    The pinned SAE shares the tensors of the one given (no copy until first use) and is made once per SAE and
    device, so its placed copy is reused by every later call (the app pins on every request); a mapping gives a
    mapping.
    """
    if device is None:
        return saes
    if isinstance(saes, Mapping):
        return {n: pin(sae, device) for n, sae in saes.items()}
    device = torch.device(device)
    with _LOCK:
        twins = _TWINS.setdefault(saes, {})
        if device not in twins:
            twins[device] = QwenScopeSAE({key: getattr(saes, key) for key in SAE_KEYS}, saes.cfg)
            _HOMES[twins[device]] = device
        return twins[device]


def home(sae: QwenScopeSAE) -> torch.device | None:
    """The device ``sae`` was pinned to, or None (it follows its layer)."""
    return _HOMES.get(sae)


def target(sae: QwenScopeSAE, hidden: torch.Tensor, device: SAEDevice = None) -> tuple[torch.device, torch.dtype]:
    """The ``(device, dtype)`` ``sae`` encodes ``hidden`` in under the rule of the module docstring."""
    where = torch.device(device) if device is not None else home(sae) or hidden.device
    if where.type == "cpu" and sae.device.type == "cpu":
        return sae.device, sae.dtype
    return where, hidden.dtype


def placed(sae: QwenScopeSAE, hidden: torch.Tensor, device: SAEDevice = None) -> QwenScopeSAE:
    """``sae`` on the device and dtype ``target`` chooses: itself, or its kept copy (made on first use)."""
    where, dtype = target(sae, hidden, device)
    if sae.device == where and sae.dtype == dtype:
        return sae
    key = (where, dtype)
    with _LOCK:
        copies = _COPIES.setdefault(sae, {})
        if key not in copies:
            copies[key] = sae.to(where, dtype)
        return copies[key]


def resident(sae: QwenScopeSAE) -> list[QwenScopeSAE]:
    """The copies of ``sae`` currently held (one per device and dtype it was used on)."""
    with _LOCK:
        return list(_COPIES.get(sae, {}).values())


def release(saes: Iterable[QwenScopeSAE]) -> None:
    """Free the copies of ``saes`` (the next use copies again): what a multi-pass harvest does between passes."""
    with _LOCK:
        for sae in saes:
            _COPIES.pop(sae, None)
