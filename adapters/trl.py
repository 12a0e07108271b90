"""TRL pieces of the training recipes (install ``qscope-plugin[train]``): SASFT as a drop-in ``transformers.Trainer`` /
TRL ``SFTTrainer``, and repetition-steered rollouts for ``GRPOTrainer`` (report §8).

    >>> penalty = SASFTPenalty(model, features, saes, lam=1e-3)
    >>> rows = Dataset.from_list(encode_examples(tok, examples, features))
    >>> trainer = SASFTSFTTrainer(model=model, args=sft_config("out"), train_dataset=rows,
    ...                           data_collator=sasft_collator(tok), processing_class=tok, penalty=penalty)
    >>> trainer.train()                                   # logs loss and sae_reduce (L_reduce before lambda)
    >>> trainer.save_model("out")                         # also writes out/sasft.json: penalty and precision

Precision is chosen per device, not inherited: TRL's configs default to ``bf16=True``, which on a CPU-only machine
makes ``SFTConfig(...)`` raise ("Your setup doesn't support bf16/gpu") and with ``use_cpu=True`` trains under
bf16 autocast without saying so. ``sft_config`` / ``dapo_config`` use bf16 autocast where the accelerator the
Trainer will use supports it and fp32 elsewhere (CPU included); ``bf16=`` / ``fp16=`` passed by the caller win.

``compute_loss`` runs the parent's loss (one forward, no ``return_outputs``) while ``penalty.track`` reads the
penalised layers, then adds lambda * L_reduce. PEFT models work as they are: LoRA layers sit inside the same
decoder blocks the penalty reads.

    >>> trainer = GRPOTrainer(model=model, args=dapo_config("out"), train_dataset=prompts, processing_class=tok,
    ...                       reward_funcs=[task_reward, repetition_reward_func()],
    ...                       rollout_func=repetition_rollout_func(repetition_spec(found, alpha=8.0), saes))

Each group of G completions then holds G−1 normal samples and one steered by (R33), flagged ``steered`` in the
reward functions' keyword arguments; the reward must penalise repetition or the steered negative teaches nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available

from qscope_plugin.errors import QScopeError
from qscope_plugin.recipes.repetition import RepetitionError, repetition_reward, rollout_groups
from qscope_plugin.recipes.sasft import SASFTPenalty, collate
from qscope_plugin.recipes.steering import SteeringSpec
from qscope_plugin.sae import QwenScopeSAE

try:
    from trl import GRPOConfig, SFTConfig, SFTTrainer
except ImportError:  # pragma: no cover - exercised only without the extra
    raise QScopeError("the TRL pieces need TRL; install the extra: pip install 'qscope-plugin[train]'") from None


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
        loss = loss + self.penalty.lam * value.to(loss.device) / self._micro_batches(model, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _micro_batches(self, model, num_items_in_batch) -> int:
        """The micro-batches that share one optimizer step, where the loss itself must average over them.

        L_reduce is a per-micro-batch mean. When the cross-entropy is normalised by ``num_items_in_batch`` (the step's
        token count), ``Trainer`` skips its own division by the accumulation steps, so the penalty is divided here,
        as TRL does for the MoE aux loss; otherwise gradient accumulation would multiply lambda by the step count.
        """
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None
                      ) or self.compute_loss_func is not None
        return getattr(self, "current_gradient_accumulation_steps", 1) if scaled and model.training else 1

    def run_config(self) -> dict[str, Any]:
        """What this run penalised and in which precision: saved beside the model as ``sasft.json``."""
        p = self.penalty
        weights = next(self.model.parameters()).dtype
        return {"target": p.features.target, "layers": list(p.layers),
                "features": {str(n): p.features.features[n] for n in p.layers},
                "lam": p.lam, "variant": p.variant, "normalize": p.normalize, "device": str(self.args.device),
                "autocast": autocast(self.args), "weights_dtype": str(weights).removeprefix("torch.")}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            path = Path(output_dir or self.args.output_dir) / "sasft.json"
            path.write_text(json.dumps(self.run_config(), indent=1), encoding="utf-8")

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


def autocast(args: TrainingArguments) -> str | None:
    """The mixed precision ``args`` trains under (``"bf16"``, ``"fp16"``), or ``None``: the weights' own dtype."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else None


def _device_precision(kwargs: Mapping[str, Any]) -> dict[str, bool]:
    """bf16 autocast where the accelerator the Trainer will use supports it, fp32 otherwise (CPU, ``use_cpu=True``,
    a GPU without bf16); nothing when the caller set ``bf16`` or ``fp16``, which then stands as asked.

    TRL 1.16 turns ``bf16`` on by default: on a machine without bf16 ``SFTConfig(...)`` raises, and on CPU with
    ``use_cpu=True`` it trains under bf16 autocast, shifting the losses by ~1e-3 relative. The check is the one
    ``TrainingArguments`` itself applies, so a config made here validates unless the caller asks for bf16 or fp16.
    """
    if "bf16" in kwargs or "fp16" in kwargs:
        return {}
    return {"bf16": not kwargs.get("use_cpu", False) and is_torch_bf16_gpu_available(), "fp16": False}


def sft_config(output_dir: str, **kwargs: Any) -> SFTConfig:
    """An ``SFTConfig`` that keeps the ``language`` column and the rows as ``encode_examples`` made them, with the
    precision chosen per device (``_device_precision``: bf16 on an accelerator that has it, else fp32)."""
    defaults = {"remove_unused_columns": False, "dataset_kwargs": {"skip_prepare_dataset": True},
                "report_to": "none", **_device_precision(kwargs)}
    return SFTConfig(output_dir=output_dir, **{**defaults, **kwargs})


def repetition_rollout_func(spec: SteeringSpec, saes: Mapping[int, QwenScopeSAE], *,
                            max_new_tokens: int | None = None) -> Callable[[list, Any], dict[str, list]]:
    """A ``GRPOTrainer`` ``rollout_func``: per group, G−1 normal samples and one steered by ``spec`` (R33).

    TRL (1.16) hands the rollout the process's prompts with each already repeated G times (``num_generations``,
    consecutive); each run of G becomes one group (``rollout_groups``). Returns ``prompt_ids``, ``completion_ids``,
    ``logprobs`` (unsteered, logits / ``temperature``, as TRL scores) and ``steered``, which TRL forwards to the
    reward functions. Without vLLM, TRL recomputes the old log-probs it trains on with the unsteered model as well.
    """

    def rollout(prompts: list, trainer: Any) -> dict[str, list]:
        tokenizer = trainer.processing_class
        group_size = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        if len(prompts) % group_size or any(len({repr(p) for p in prompts[i : i + group_size]}) != 1
                                            for i in range(0, len(prompts), group_size)):
            raise RepetitionError(f"rollout_func expects each prompt repeated num_generations={group_size} times in "
                                  f"a row (TRL's RepeatSampler); got {len(prompts)} prompts that are not")
        firsts = prompts[::group_size]
        if isinstance(firsts[0], list):  # conversational: render as the trainer would, generation prompt added
            firsts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in firsts]
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in firsts]
        groups = rollout_groups(trainer.accelerator.unwrap_model(trainer.model), encoded, spec, saes,
                                group_size=group_size, max_new_tokens=max_new_tokens or trainer.max_completion_length,
                                temperature=trainer.temperature, top_p=trainer.top_p,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "steered": []}
        for group in groups:
            out["prompt_ids"] += [group.prompt_ids] * group_size
            out["completion_ids"] += group.completion_ids
            out["logprobs"] += group.logprobs
            out["steered"] += group.steered
        return out

    return rollout


def repetition_reward_func(endless_penalty: float = 1.0, **params: int) -> Callable[..., list[float]]:
    """``repetition_reward`` shaped as a TRL reward function (reads ``completion_ids``); add a task reward beside it."""

    def repetition(completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        return repetition_reward(completion_ids, endless_penalty=endless_penalty, **params)

    return repetition


def dapo_config(output_dir: str, **kwargs: Any) -> GRPOConfig:
    """A ``GRPOConfig`` for DAPO as the report runs it: ``loss_type="dapo"``, clip-higher (ε_low 0.2, ε_high 0.28),
    no KL term, and truncated completions kept in the loss (endless loops are truncated: masking them would drop
    exactly the negatives). TRL does no dynamic sampling, as the report wants. Precision as ``sft_config``: bf16 on
    an accelerator that has it, else fp32 (TRL saves it with the run's ``training_args.bin``)."""
    defaults = {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.0,
                "mask_truncated_completions": False, "report_to": "none", **_device_precision(kwargs)}
    return GRPOConfig(output_dir=output_dir, **{**defaults, **kwargs})
