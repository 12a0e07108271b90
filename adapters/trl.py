"""SASFT as a drop-in ``transformers.Trainer`` / TRL ``SFTTrainer`` (install ``qscope-plugin[train]``).

    >>> penalty = SASFTPenalty(model, features, saes, lam=1e-3)
    >>> rows = Dataset.from_list(encode_examples(tok, examples, features))
    >>> trainer = SASFTSFTTrainer(model=model, args=sft_config("out"), train_dataset=rows,
    ...                           data_collator=sasft_collator(tok), processing_class=tok, penalty=penalty)
    >>> trainer.train()                                   # logs loss and sae_reduce (L_reduce before lambda)

``compute_loss`` runs the parent's loss (one forward, no ``return_outputs``) while ``penalty.track`` reads the
penalised layers, then adds lambda * L_reduce. PEFT models work as they are: LoRA layers sit inside the same
decoder blocks the penalty reads.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from transformers import Trainer

from qscope_plugin.errors import QScopeError
from qscope_plugin.recipes.sasft import SASFTPenalty, collate

try:
    from trl import SFTConfig, SFTTrainer
except ImportError:  # pragma: no cover - exercised only without the extra
    raise QScopeError("the SASFT trainers need TRL; install the extra: pip install 'qscope-plugin[train]'") from None


class SASFTMixin:
    """Adds lambda * L_reduce to a trainer's loss and logs L_reduce as ``sae_reduce``; put it first in the bases."""

    def __init__(self, *args: Any, penalty: SASFTPenalty, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.penalty = penalty
        self._sae_reduce: list[float] = []

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        language = inputs.pop("language")
        with self.penalty.track(inputs["labels"], language) as reduce:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        value = reduce()
        self._sae_reduce.append(float(value.detach()))
        loss = loss + self.penalty.lam * value.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._sae_reduce:
            key = "eval_sae_reduce" if any(k.startswith("eval_") for k in logs) else "sae_reduce"
            logs[key] = sum(self._sae_reduce) / len(self._sae_reduce)
            self._sae_reduce.clear()
        super().log(logs, start_time)


class SASFTTrainer(SASFTMixin, Trainer):
    """``transformers.Trainer`` with SASFT's penalty."""


class SASFTSFTTrainer(SASFTMixin, SFTTrainer):
    """TRL ``SFTTrainer`` with SASFT's penalty; train on rows from ``encode_examples`` with ``sasft_collator``."""


def sasft_collator(tokenizer):
    """The data collator: right padding, labels -100 on prompt and padding, the ``language`` ids kept."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return partial(collate, pad_id=pad_id)


def sft_config(output_dir: str, **kwargs: Any) -> SFTConfig:
    """An ``SFTConfig`` that keeps the ``language`` column and the rows as ``encode_examples`` made them."""
    defaults = {"remove_unused_columns": False, "dataset_kwargs": {"skip_prepare_dataset": True},
                "report_to": "none"}
    return SFTConfig(output_dir=output_dir, **{**defaults, **kwargs})
