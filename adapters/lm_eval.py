"""lm-evaluation-harness in the recipes (install ``qscope-plugin[eval]``): its tasks' prompts as footprints, its
logged per-sample results as the redundancy report's correctness, and a steered model it can evaluate.

    >>> prompts = task_prompts("arc_easy", num_fewshot=5)                # the contexts lm-eval builds, by doc_id
    >>> fp = harvest_task_footprints(model, tok, "arc_easy", saes, num_fewshot=5, out="arc_easy.safetensors")
    >>> panel = read_lm_eval_outputs(["runs/base", "runs/steered"])    # `lm_eval --log_samples --output_path`
    >>> report = redundancy_report(suite, correctness=panel.correctness_arrays(), scores=panel.scores)
    >>> lm = SteeredHFLM(pretrained=model, tokenizer=tok, spec=spec, saes=saes)    # or --model qscope-steered
    >>> lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

Prompts are taken from lm-eval's own request construction (``Task.build_all_requests``), with the few-shot count
and seed set as ``simple_evaluate`` sets them, so a footprint is harvested on exactly the context the model is
scored on (``arguments[0]`` of the logged samples). lm-eval's own SAELens steering indexes
``SAE.from_pretrained(...)[0]``, which SAELens 6 no longer returns; ``qscope-steered`` steers through
``recipes.steering.steer`` on the decoder layers instead.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from qscope_plugin.errors import QScopeError, malformed_file
from qscope_plugin.indices import MAX_SPEC_CHARS, parse_ranges
from qscope_plugin.recipes.footprints import Footprints, harvest_footprints
from qscope_plugin.recipes.steering import SteeringSpec, Term, steer
from qscope_plugin.sae import QwenScopeSAE

try:
    import lm_eval
    from lm_eval.api.registry import register_model
    from lm_eval.defaults import DEFAULT_OTHER_SEED
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError:  # pragma: no cover - exercised only without the extra
    raise QScopeError("the lm-eval integration needs lm-evaluation-harness; install the extra: "
                      "pip install 'qscope-plugin[eval]'") from None

PREFERRED_METRICS = ("acc", "exact_match")
"""The per-sample metric taken when none is named: the first of these a task logged, else its first metric."""


class LmEvalError(QScopeError, ValueError):
    """An lm-eval task, option or output folder that cannot be used."""


# ------------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class TaskPrompts:
    """The context lm-eval scores each document of one task on, in ``doc_id`` order, and how it was built."""

    task: str
    version: str | None
    num_fewshot: int
    fewshot_seed: int | None
    chat_template: bool
    fewshot_as_multiturn: bool
    doc_ids: list[int]
    prompts: list[str]
    doc_hashes: list[str]
    """lm-eval's ``doc_hash`` of each document (what ``--log_samples`` writes), to align results with prompts."""

    def provenance(self) -> dict:
        """What a footprint file records of these prompts (the documents as one digest of their hashes)."""
        return {"lm_eval_task": self.task, "lm_eval_version": lm_eval.__version__, "task_version": self.version,
                "num_fewshot": self.num_fewshot, "fewshot_seed": self.fewshot_seed,
                "chat_template": self.chat_template, "fewshot_as_multiturn": self.fewshot_as_multiturn,
                "documents": documents_digest(self.doc_hashes),
                "prompts": documents_digest([_hash(prompt) for prompt in self.prompts])}


def documents_digest(doc_hashes: Sequence[str]) -> str:
    """One digest of a task's documents (or prompts) in ``doc_id`` order from lm-eval's per-sample hashes."""
    return hashlib.sha256("".join(doc_hashes).encode()).hexdigest()[:16]


def task_manager(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
                 include_defaults: bool = True) -> TaskManager:
    """lm-eval's task index (builtin tasks, plus local task YAMLs under ``include_path``).

    Building the builtin index scans a few hundred folders (seconds); a local YAML that ``include:``-s a builtin
    one by path works with ``include_defaults=False`` too, and indexes at once.
    """
    paths = [str(p) for p in ([include_path] if isinstance(include_path, str | os.PathLike) else include_path or [])]
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def load_task(name: str, manager: TaskManager | None = None):
    """One lm-eval task object by name; an unknown name or a group is a ``LmEvalError`` naming what to pass.

    Groups and tags (``mmlu``, ``bbh``) are refused from lm-eval's task index, before any data loads: loading
    one would download every subtask's dataset first (and fail offline with the hub's ``ConnectionError``).
    """
    manager = manager or task_manager()
    if name not in manager.all_tasks:
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "pass --include-path for a local task YAML"
        raise LmEvalError(f"lm-eval knows no task {name!r} ({hint})")
    if name in manager.all_groups or name in manager.all_tags:
        members = _members(manager, name)
        shown = f" ({', '.join(members[:8])}{', ...' if len(members) > 8 else ''})" if members else ""
        raise LmEvalError(f"{name!r} is an lm-eval group of tasks{shown}, not one task; harvest each task on its "
                          "own (`lm_eval --tasks list` names them)")
    tasks = manager.load([name])["tasks"]
    if len(tasks) != 1:
        raise LmEvalError(f"{name!r} is a group of {len(tasks)} lm-eval tasks ({', '.join(sorted(tasks)[:8])}"
                          f"{', ...' if len(tasks) > 8 else ''}); harvest each task on its own")
    return next(iter(tasks.values()))


def _members(manager: TaskManager, name: str) -> list[str]:
    """The tasks (or subgroups) a group or tag lists, read from lm-eval's index, not from its data."""
    members = []
    for entry_name, entry in manager.task_index.items():
        tags = getattr(entry, "tags", None) or (entry.get("tags") if isinstance(entry, dict) else None) or ()
        if name in tags:
            members.append(entry_name)
    entry = manager.task_index.get(name)
    config = getattr(entry, "cfg", None) or (entry if isinstance(entry, dict) else {})
    listed = config.get("task") if isinstance(config, dict) else None
    if isinstance(listed, list):
        members += [t if isinstance(t, str) else str(t.get("task", t)) for t in listed]
    return sorted(set(members))


def _chat_template(tokenizer) -> partial:
    """HFLM's own ``apply_chat_template`` bound to ``tokenizer`` (what lm-eval calls with ``--apply_chat_template``)."""
    return partial(HFLM.apply_chat_template, SimpleNamespace(tokenizer=tokenizer, chat_template_args={}))


def task_prompts(task: str, *, num_fewshot: int | None = None, fewshot_seed: int | None = DEFAULT_OTHER_SEED,
                 limit: int | None = None, apply_chat_template: bool = False, fewshot_as_multiturn: bool | None = None,
                 tokenizer=None, system_instruction: str | None = None, manager: TaskManager | None = None,
                 include_path: str | os.PathLike | None = None) -> TaskPrompts:
    """The context of every document of ``task`` exactly as ``lm_eval.simple_evaluate`` builds it.

    Args:
        num_fewshot: few-shot examples per context (default: the task's own, else 0), as ``--num_fewshot``.
        fewshot_seed: the few-shot sampler's seed, as ``--fewshot_random_seed`` (lm-eval's default 1234).
        limit: only the first ``limit`` documents, as ``--limit``.
        apply_chat_template: wrap the contexts in ``tokenizer``'s chat template, as ``--apply_chat_template``.
        fewshot_as_multiturn: few-shot examples as chat turns (default: with a chat template, as lm-eval).
    """
    if apply_chat_template and tokenizer is None:
        raise LmEvalError("apply_chat_template needs the tokenizer whose chat template to apply")
    obj = load_task(task, manager or task_manager(include_path))
    if num_fewshot is not None and obj.get_config("num_fewshot") != 0:  # lm-eval never overrides a task's 0
        obj.set_config(key="num_fewshot", value=num_fewshot)
    elif obj.get_config("num_fewshot") is None:
        obj.set_config(key="num_fewshot", value=0)
    obj.set_fewshot_seed(seed=fewshot_seed)
    multiturn = apply_chat_template if fewshot_as_multiturn is None else fewshot_as_multiturn
    obj.build_all_requests(limit=limit, system_instruction=system_instruction,
                           apply_chat_template=apply_chat_template, fewshot_as_multiturn=multiturn,
                           chat_template=_chat_template(tokenizer) if apply_chat_template else None)
    contexts: dict[int, set[str]] = {}
    for instance in obj.instances:
        contexts.setdefault(instance.doc_id, set()).add(instance.arguments[0])
    varying = [doc_id for doc_id, found in contexts.items() if len(found) > 1]
    if varying:
        raise LmEvalError(f"task {task!r} scores document {varying[0]} on {len(contexts[varying[0]])} different "
                          "contexts (a partial-evaluation task such as winogrande); a footprint needs one prompt "
                          "per document")
    docs = dict(obj.doc_iterator(limit=limit))
    doc_ids = sorted(contexts)
    return TaskPrompts(task, str(obj.VERSION) if obj.VERSION is not None else None, obj.get_config("num_fewshot"),
                       fewshot_seed, apply_chat_template, multiturn, doc_ids,
                       [next(iter(contexts[i])) for i in doc_ids], [_doc_hash(docs[i]) for i in doc_ids])


def _doc_hash(doc: Any) -> str:
    """lm-eval's ``doc_hash`` of one document (``evaluator.evaluate``'s formula)."""
    from lm_eval.utils import handle_non_serializable

    return _hash(json.dumps(doc, indent=2, default=handle_non_serializable, ensure_ascii=False))


def _hash(text: str) -> str:
    """lm-eval's ``hash_string`` (its ``prompt_hash`` of a context)."""
    from lm_eval.utils import hash_string

    return hash_string(text)


def harvest_task_footprints(model: object, tokenizer, task: str, saes: Mapping[int, QwenScopeSAE], *,
                            num_fewshot: int | None = None, fewshot_seed: int | None = DEFAULT_OTHER_SEED,
                            limit: int | None = None, apply_chat_template: bool = False,
                            manager: TaskManager | None = None, include_path: str | os.PathLike | None = None,
                            **options: Any) -> Footprints:
    """F(x_i) (R3) of every document of an lm-eval task, on its lm-eval context; ``options`` go to
    ``harvest_footprints`` (``out`` for a resumable, torchrun-sharded harvest, ``batch_size``, ...)."""
    prompts = task_prompts(task, num_fewshot=num_fewshot, fewshot_seed=fewshot_seed, limit=limit,
                           apply_chat_template=apply_chat_template, tokenizer=tokenizer, manager=manager,
                           include_path=include_path)
    return harvest_footprints(model, tokenizer, prompts.prompts, saes, name=task, provenance=prompts.provenance(),
                              **options)


# ------------------------------------------------------------------------------------------ outputs


@dataclass(frozen=True)
class TaskResults:
    """One task's logged results over a panel of models."""

    metric: str
    """``metric,filter`` as lm-eval keys it (``acc,none``, ``exact_match,strict-match``)."""
    doc_ids: list[int]
    correctness: pd.DataFrame
    """Per-sample metric, models × ``doc_id``."""
    documents: str
    """``documents_digest`` of the documents (the same for every model, else reading fails)."""
    version: str | None
    prompts: dict[str, str] = field(default_factory=dict)
    """model -> digest of the contexts it was scored on (models may differ, e.g. in chat template)."""


@dataclass(frozen=True)
class LmEvalPanel:
    """lm-eval outputs of several models, as the redundancy report takes them."""

    models: list[str]
    tasks: dict[str, TaskResults]
    scores: pd.DataFrame
    """lm-eval's aggregate of each task's metric (its results file), models × tasks."""
    sources: dict[str, str] = field(default_factory=dict)
    """model -> the results file read."""

    def correctness_arrays(self) -> dict[str, np.ndarray]:
        """``{task: (models, samples)}`` for ``redundancy_report(correctness=...)``."""
        return {name: t.correctness.to_numpy(dtype=float) for name, t in self.tasks.items()}

    def check_footprints(self, footprints: Mapping[str, Footprints]) -> None:
        """Refuse footprints harvested on other documents than the ones scored (by count and document digest)."""
        for name, fp in footprints.items():
            if name not in self.tasks:
                continue
            scored = self.tasks[name]
            if fp.n_samples != len(scored.doc_ids):
                raise LmEvalError(f"{name}: the footprints hold {fp.n_samples} samples but lm-eval scored "
                                  f"{len(scored.doc_ids)} documents; harvest and evaluate the same documents "
                                  "(same --limit)")
            digest = fp.provenance.get("documents")
            if digest is not None and digest != scored.documents:
                raise LmEvalError(f"{name}: the footprints were harvested on other documents than lm-eval scored "
                                  "(document hashes differ); harvest and evaluate the same task data")
            prompts = fp.provenance.get("prompts")
            if prompts is not None and prompts not in scored.prompts.values():
                raise LmEvalError(f"{name}: the footprints were harvested on other contexts than any model was "
                                  "scored on (few-shot count or seed, or chat template differ); harvest with the "
                                  "settings of the evaluation")


def _latest_run(folder: Path) -> tuple[Path, str]:
    """The newest ``results_<date>.json`` under ``folder`` (lm-eval puts it in a per-model subfolder)."""
    found = sorted(folder.rglob("results_*.json"), key=lambda p: p.name)
    if not found:
        raise LmEvalError(f"no lm-eval results_*.json under {str(folder)!r}; run lm_eval with --output_path "
                          f"{folder} --log_samples")
    owners = {p.parent for p in found}
    if len(owners) > 1:
        raise LmEvalError(f"{str(folder)!r} holds lm-eval results of {len(owners)} models "
                          f"({', '.join(sorted(p.name for p in owners))}); pass one folder per model")
    return found[-1], found[-1].stem.removeprefix("results_")


SAMPLE_FIELDS = {"doc_id": int, "filter": str, "metrics": list, "doc_hash": str, "prompt_hash": str}
"""What every line of an lm-eval ``samples_*.jsonl`` (``--log_samples``) holds, besides each metric's value."""


def _read_results(path: Path) -> dict:
    """A ``results_*.json``, or ``MalformedFileError`` naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise malformed_file(path, f"is not JSON ({e})",
                             "the results_<date>.json lm_eval --output_path writes") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) \
            or not isinstance(data.get("versions", {}), dict):
        raise malformed_file(path, "has no 'results' object (not an lm-eval results file)",
                             "the results_<date>.json lm_eval --output_path writes")
    return data


def _read_samples(path: Path) -> list[dict]:
    """The lines of a ``samples_*.jsonl``, each checked for the fields the panel reads, or ``MalformedFileError``
    naming the file, the line and what is wrong with it."""
    expected = "the samples_<task>_<date>.jsonl that lm_eval --log_samples writes"
    samples = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    sample = json.loads(line)
                except json.JSONDecodeError as e:
                    raise malformed_file(path, f"line {number} is not JSON ({e})", expected) from None
                wrong = [k for k, kind in SAMPLE_FIELDS.items() if not isinstance(sample, dict)
                         or not isinstance(sample.get(k), kind) or isinstance(sample.get(k), bool)]
                if wrong:
                    raise malformed_file(path, f"line {number} lacks {', '.join(wrong)} (or holds the wrong type)",
                                         expected)
                samples.append(sample)
    except UnicodeDecodeError as e:
        raise malformed_file(path, f"is not UTF-8 text ({e.reason} at byte {e.start})", expected) from None
    if not samples:
        raise malformed_file(path, "holds no samples", expected)
    return samples


def _logged(samples: list[dict]) -> list[str]:
    """The ``metric,filter`` keys of the per-sample metrics in a samples file, in logged order."""
    return list(dict.fromkeys(f"{m},{s['filter']}" for s in samples for m in s["metrics"]))


def _metric(task: str, samples: list[dict], wanted: str | None) -> str:
    """``metric,filter``: the one asked for, else the preferred one logged, with the first filter."""
    logged = _logged(samples)
    if wanted is None:
        names = {key.split(",")[0]: key for key in reversed(logged)}
        return next((names[m] for m in PREFERRED_METRICS if m in names), logged[0])
    key = wanted if "," in wanted else next((k for k in logged if k.split(",")[0] == wanted), wanted)
    if key not in logged:
        raise LmEvalError(f"{task}: lm-eval logged no per-sample metric {wanted!r}; it logged {', '.join(logged)}")
    return key


def read_lm_eval_outputs(folders: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike], *,
                         tasks: Sequence[str] | None = None,
                         metrics: Mapping[str, str] | None = None) -> LmEvalPanel:
    """Per-sample correctness and aggregate scores of a panel of models from lm-eval's output folders.

    Args:
        folders: one folder per model, as ``lm_eval --output_path DIR --log_samples`` writes it (``DIR`` or
            ``DIR/<model>``); a mapping names the models, else each is named by its folder.
        tasks: the tasks to read (default: every task all models logged samples of).
        metrics: ``{task: metric}`` (``acc``, ``exact_match,strict-match``, ...); default ``acc``, else
            ``exact_match``, else the task's first logged metric.
    """
    named = dict(folders) if isinstance(folders, Mapping) else {Path(f).name: f for f in folders}
    if len(named) < len(folders):
        raise LmEvalError("two output folders have the same name; pass {model: folder} to name them")
    runs: dict[str, dict[str, Path]] = {}
    results: dict[str, dict] = {}
    sources = {}
    for model, folder in named.items():
        path, date = _latest_run(Path(folder))
        results[model], sources[model] = _read_results(path), str(path)
        runs[model] = {p.name.removeprefix("samples_").removesuffix(f"_{date}.jsonl"): p
                       for p in path.parent.glob(f"samples_*_{date}.jsonl")}
    common = set.intersection(*(set(r) for r in runs.values())) if runs else set()
    wanted = list(tasks) if tasks is not None else sorted(common)
    if not wanted:
        raise LmEvalError("the output folders share no task with logged samples; run lm_eval with --log_samples")
    out: dict[str, TaskResults] = {}
    for task in wanted:
        missing = [model for model in named if task not in runs[model]]
        if missing:
            raise LmEvalError(f"no samples_{task}_*.jsonl for {', '.join(missing)} (in their newest run); run "
                              f"lm_eval on {task} with --log_samples for every model")
        out[task] = _task_results(task, {m: _read_samples(runs[m][task]) for m in named}, results,
                                  (metrics or {}).get(task))
    scores = pd.DataFrame({task: [_aggregate(results[m], task, t.metric) for m in named] for task, t in out.items()},
                          index=list(named))
    return LmEvalPanel(list(named), out, scores, sources)


def _task_results(task: str, samples: dict[str, list[dict]], results: dict[str, dict],
                  wanted: str | None) -> TaskResults:
    first = next(iter(samples))
    metric = _metric(task, samples[first], wanted)
    name, filter_key = metric.split(",", 1)
    versions = {m: str(results[m].get("versions", {}).get(task)) for m in samples}
    if len(set(versions.values())) > 1:
        raise LmEvalError(f"{task}: the models were evaluated on different task versions "
                          f"({', '.join(f'{m}: {v}' for m, v in versions.items())}); rerun them on one version")
    rows, hashes, prompts = {}, {}, {}
    for model, logged in samples.items():
        kept = sorted((s for s in logged if s["filter"] == filter_key), key=lambda s: s["doc_id"])
        if not kept or name not in kept[0]:
            raise LmEvalError(f"{task}: {model}'s samples have no metric {metric!r}; they logged "
                              f"{', '.join(_logged(logged)) or 'nothing'}")
        values = [s.get(name) for s in kept]
        if not all(isinstance(v, int | float) for v in values):  # bools count: lm-eval logs some scores so
            raise LmEvalError(f"{task}: {model}'s samples hold a {name!r} that is not a number; expected "
                              "lm-eval's per-sample scores (0/1 or a float)")
        rows[model] = pd.Series([float(v) for v in values], index=[s["doc_id"] for s in kept])
        hashes[model] = documents_digest([s["doc_hash"] for s in kept])
        prompts[model] = documents_digest([s["prompt_hash"] for s in kept])
    sizes = {m: len(r) for m, r in rows.items()}
    if len(set(sizes.values())) > 1:
        raise LmEvalError(f"{task}: the models were scored on different numbers of documents "
                          f"({', '.join(f'{m}: {n}' for m, n in sizes.items())}); evaluate all with the same --limit")
    if len(set(hashes.values())) > 1:
        differ = [m for m in hashes if hashes[m] != hashes[first]]
        raise LmEvalError(f"{task}: {', '.join(differ)} scored other documents than {first} (document hashes "
                          "differ); evaluate every model on the same task data")
    frame = pd.DataFrame(rows).T
    return TaskResults(metric, [int(i) for i in frame.columns], frame, hashes[first], versions[first], prompts)


def _aggregate(results: dict, task: str, metric: str) -> float:
    found = results["results"].get(task)
    value = found.get(metric) if isinstance(found, dict) else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise LmEvalError(f"{task}: the results file has no numeric aggregate {metric!r}")
    return float(value)


# --------------------------------------------------------------------------------------- steered model


STEER_TERM = re.compile(r"\s*(\d+):(\d+):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")
MAX_ALPHA_CHARS = 32
"""Longest ALPHA text read: any useful strength is short; a longer one is refused before ``float()`` reads it."""


def parse_steer(spec: str) -> tuple[Term, ...]:
    """``"L:F:ALPHA"`` terms, ``;`` or ``|`` between several (lm-eval splits model_args at commas).

    Every number is read as bounded text, so an enormous one is refused, never materialised: the spec by
    ``indices.MAX_SPEC_CHARS``, LAYER and FEATURE by the one bounded parser (``indices.parse_ranges``, at most
    ``MAX_DIGITS`` digits), ALPHA by ``MAX_ALPHA_CHARS`` and then as a finite float.
    """
    if len(spec) > MAX_SPEC_CHARS:
        raise LmEvalError(f"steer spec is {len(spec)} characters long, more than the {MAX_SPEC_CHARS} read; pass a "
                          "few LAYER:FEATURE:ALPHA terms joined by ';'")
    terms = []
    for part in re.split(r"[;|]", spec):
        found = STEER_TERM.fullmatch(part)
        if found is None:
            raise LmEvalError(f"bad steer term {part[:80]!r} in {spec[:80]!r}: expected LAYER:FEATURE:ALPHA, e.g. "
                              "3:417:-8, several joined by ';'")
        ((layer, _),) = parse_ranges(found[1], what="layer", option="steer layer")
        ((feature, _),) = parse_ranges(found[2], what="feature", option="steer feature")
        alpha = float(found[3]) if len(found[3]) <= MAX_ALPHA_CHARS else math.nan
        if not math.isfinite(alpha):
            raise LmEvalError(f"steer strength {found[3][:40]!r} in {part.strip()[:80]!r} is not a finite number of "
                              f"at most {MAX_ALPHA_CHARS} characters; pass e.g. -8 or 1.5e1")
        terms.append(Term(layer, feature, alpha))
    return tuple(terms)


@register_model("qscope-steered")
class SteeredHFLM(HFLM):
    """``HFLM`` whose every loglikelihood and generation forward runs under ``steer(model, spec, saes)``.

    From Python pass ``spec`` and ``saes``; from ``--model_args`` pass ``release`` (a release name or SAE folder)
    and ``steer=L:F:ALPHA[;L:F:ALPHA]`` with optional ``direction_norm`` and ``positions``. An empty ``steer``
    gives the unsteered model.
    """

    def __init__(self, *args: Any, spec: SteeringSpec | None = None, saes: Mapping[int, QwenScopeSAE] | None = None,
                 release: str | None = None, steer: str | None = None, direction_norm: str = "raw",
                 positions: str = "all", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if spec is None and steer:
            spec = SteeringSpec(parse_steer(str(steer)), direction_norm=direction_norm, positions=positions)
        if spec is not None and saes is None:
            if release is None:
                raise LmEvalError("qscope-steered needs the SAEs of the steered layers: pass release=NAME_OR_FOLDER")
            from qscope_plugin.store import load_sae

            saes = {layer: load_sae(release, layer) for layer in spec.layers}
        self.spec, self.saes = spec, dict(saes or {})

    @contextmanager
    def _steered(self) -> Iterator[None]:
        if self.spec is None:
            yield
            return
        with steer(self.model, self.spec, self.saes):
            yield

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self._steered():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        with self._steered():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
