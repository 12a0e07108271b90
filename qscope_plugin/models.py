"""Load a backbone and its tokenizer for the CLI and the demo (plain transformers, offline-friendly).

``AutoModelForCausalLM`` maps published Qwen3.5 checkpoints (``*ForConditionalGeneration`` layout) to the
text-only ``*ForCausalLM``, which is what the SAEs read (docs/method.md §2.2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from qscope_plugin.catalogue import DEMO_RELEASE
from qscope_plugin.errors import QScopeError

if TYPE_CHECKING:  # torch loads with the model, not with the CLI's parser (which asks for the defaults below)
    import torch

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "assets" / "model"


class ModelLoadError(QScopeError, OSError):
    """A model or tokenizer that cannot be loaded."""


class DeviceError(QScopeError, ValueError):
    """A device string torch does not know, or a device this machine does not have."""


def check_device(device: str | None) -> torch.device | None:
    """``device`` as a ``torch.device``, refused before any loading when torch cannot use it here."""
    if not device:
        return None
    import torch

    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, TypeError) as e:  # unknown string; CUDA/MPS not built in or not present
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeviceError(f"device {device!r} cannot be used here ({why}); pass one this machine has, e.g. cpu, "
                          "cuda or cuda:1") from None
    return dev


def model_load_error(model: object, error: BaseException) -> ModelLoadError:
    """The one message for a model or tokenizer that transformers cannot load (offline and not cached, a typo,
    a folder without weights), whichever framework asked for it."""
    why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelLoadError(f"cannot load model {model!r} ({why}); pass a local folder saved with save_pretrained or "
                          "a hub id that is in the local cache (HF_HUB_OFFLINE=1 blocks downloads)")


def default_model() -> str:
    """The demo model shipped in the package: the CLI's default backbone."""
    return str(DEMO_MODEL_DIR)


def default_release() -> str:
    return DEMO_RELEASE


@contextlib.contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """transformers' "Loading weights" bar, silenced inside the block.

    ``from_pretrained`` draws it for every model, the demo's included (46 tensors in a few milliseconds), so it
    stood in front of every command's output. Other bars (downloads, the plugin's own on long work) are untouched.
    transformers versions without ``set_tqdm_hook`` keep the bar.
    """
    from transformers.utils import logging

    set_hook = getattr(logging, "set_tqdm_hook", None)
    if set_hook is None:
        yield
        return

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

    previous = set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)


def load_model(model: str, *, device: str | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` in eval mode; a clear error instead of a deep traceback when it cannot load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    if Path(model) == DEMO_MODEL_DIR and not DEMO_MODEL_DIR.is_dir():
        raise ModelLoadError(
            f"the demo model is not in this installation ({DEMO_MODEL_DIR}); build it with "
            "`python scripts/build_demo.py` or pass --model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        with quiet_weight_loading():
            hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype or "auto").eval()
    except (OSError, ValueError) as e:
        raise model_load_error(model, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (hf.to(device) if device else hf), tokenizer
