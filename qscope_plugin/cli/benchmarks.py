"""``qscope footprints / redundancy``: benchmark footprints and their redundancy (report §4)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qscope_plugin.cli._options import (
    MAX_INDEX,
    MAX_ITEMS,
    MAX_POSITIONS,
    MAX_SEED,
    UsageError,
    add_batch_options,
    add_model_options,
    count,
    emit,
    finite,
    load_backbone,
    load_saes,
)


def cmd_footprints(args: argparse.Namespace) -> None:
    from qscope_plugin.distributed import torchrun_group

    if (args.data is None) == (args.lm_eval_task is None):
        raise UsageError("pass a data file or --lm-eval-task TASK (one of them)")
    with torchrun_group(args.device) as (rank, device):
        args.device = device  # under torchrun: this rank's GPU
        fp = _data_footprints(args) if args.lm_eval_task is None else _task_footprints(args)
    if rank == 0:
        for layer, lf in fp.layers.items():
            print(f"{fp.name} layer {layer}: {len(lf)} samples, |F(D)| = {len(lf.features())}, "
                  f"{len(lf.indices) / len(lf):.1f} active features per sample")
        print(f"footprints written to {args.out}")


def _data_footprints(args: argparse.Namespace):
    from qscope_plugin.recipes.data import load_table
    from qscope_plugin.recipes.footprints import harvest_footprints

    task_only = [option for option, value in (("--num-fewshot", args.num_fewshot), ("--include-path",
                 args.include_path), ("--apply-chat-template", args.apply_chat_template or None)) if value is not None]
    if task_only:
        raise UsageError(f"{', '.join(task_only)} only apply with --lm-eval-task")
    data = load_table(args.data, config=args.config, split=args.split, revision=args.revision, limit=args.limit)
    if args.column is None and args.template is None:
        raise UsageError(f"pass --column (one of {data.column_names}) or --template, e.g. 'Q: {{question}}\\nA:'")
    template = args.template.replace("\\n", "\n").replace("\\t", "\t") if args.template else None
    saes = load_saes(args.release, args.layers, args.sae_device)  # a bad --layers fails before the model loads
    model, tok = load_backbone(args)
    return harvest_footprints(model, tok, data, saes, column=args.column,
                              template=template, name=args.name or Path(args.data).stem.split(".")[0],
                              batch_size=args.batch_size, max_length=args.max_length, chunk_size=args.chunk_size,
                              out=args.out)


def _task_footprints(args: argparse.Namespace):
    """An lm-eval task's documents on the contexts lm-eval scores them on (qscope_plugin.adapters.lm_eval)."""
    from qscope_plugin.adapters.lm_eval import harvest_task_footprints, load_task, task_manager

    data_only = [option for option, value in (("--column", args.column), ("--template", args.template),
                 ("--config", args.config), ("--split", args.split), ("--revision", args.revision),
                 ("--name", args.name)) if value is not None]
    if data_only:
        raise UsageError(f"{', '.join(data_only)} describe a data file; an lm-eval task brings its own data, "
                         "prompt and name")
    manager = task_manager(args.include_path)
    load_task(args.lm_eval_task, manager)  # an unknown task fails before the model loads
    saes = load_saes(args.release, args.layers, args.sae_device)
    model, tok = load_backbone(args)
    return harvest_task_footprints(model, tok, args.lm_eval_task, saes,
                                   num_fewshot=args.num_fewshot, fewshot_seed=args.fewshot_seed, limit=args.limit,
                                   apply_chat_template=args.apply_chat_template, manager=manager,
                                   batch_size=args.batch_size, max_length=args.max_length,
                                   chunk_size=args.chunk_size, out=args.out)


def _named(spec: str, option: str, form: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise UsageError(f"bad {option} {spec!r}: expected {form}")
    return name, value


def _named_csv(spec: str) -> tuple[str, str]:
    return _named(spec, "--correctness", "BENCHMARK=path.csv")


def _lm_eval_panel(args: argparse.Namespace, suite: dict) -> tuple[dict, object]:
    """Correctness and scores of the suite's benchmarks from lm-eval output folders, one per model."""
    from qscope_plugin.adapters.lm_eval import LmEvalError, read_lm_eval_outputs
    from qscope_plugin.recipes.footprints import Footprints

    if args.correctness or args.scores:
        raise UsageError("--lm-eval-outputs replaces --correctness and --scores; pass one or the other")
    metrics = dict(_named(spec, "--lm-eval-metric", "TASK=METRIC") for spec in args.lm_eval_metric or [])
    panel = read_lm_eval_outputs(args.lm_eval_outputs, metrics=metrics)
    if not set(panel.tasks) & set(suite):
        raise LmEvalError(f"the lm-eval outputs hold tasks {sorted(panel.tasks)} and the footprints benchmarks "
                          f"{sorted(suite)}: none in common; harvest with `qscope footprints --lm-eval-task`")
    panel.check_footprints({fp.name: fp for fp in map(Footprints.load, args.footprints)})
    shared = [task for task in panel.tasks if task in suite]
    correctness = panel.correctness_arrays()
    return {task: correctness[task] for task in shared}, panel.scores[shared]


def cmd_redundancy(args: argparse.Namespace) -> None:
    from qscope_plugin.recipes.redundancy import load_suite, read_correctness, read_table, redundancy_report
    from qscope_plugin.recipes.reports import write_report

    layer, suite = load_suite(args.footprints, args.layer)
    if args.lm_eval_outputs:
        correctness, scores = _lm_eval_panel(args, suite)
    else:
        if args.lm_eval_metric:
            raise UsageError("--lm-eval-metric applies with --lm-eval-outputs")
        correctness = read_correctness(dict(map(_named_csv, args.correctness or [])))
        scores = read_table(args.scores) if args.scores else None
    report = redundancy_report(suite, correctness=correctness, scores=scores,
                               reference=args.reference, n_draws=args.n_draws, seed=args.seed, variant=args.kendall,
                               drop_threshold=args.drop_threshold, distinct_threshold=args.distinct_threshold)
    write_report(report, args.out)

    def render() -> None:
        print(f"layer {layer}: {'benchmark':20} {'N':>7} {'|F(D)|':>7} {'R_hat':>9} {'n(90%)':>7} {'R':>6}")
        for name, row in report.benchmarks.items():
            perf = row.performance_redundancy
            print(f"{'':9}{name:20} {row.n_samples:7} {row.footprint_size:7} {row.feature_redundancy:9.4g} "
                  f"{row.samples_for_90pct_coverage:7} {'' if perf is None else f'{perf:6.3f}'}")
        for d in report.summary.drop_candidates:
            print(f"drop candidate: {d.benchmark} ({d.overlap:.0%} of its footprint is in {d.covered_by})")
        for d in report.summary.distinct:
            print(f"distinct, keep: {d.benchmark} (at most {d.max_overlap:.0%} covered by any other)")
        print(f"report in {args.out}/report.md")

    emit(args, report.to_json(), render)


def add_parser(sub: argparse._SubParsersAction) -> None:
    footprints = sub.add_parser("footprints", help="active SAE features at each sample's last prompt token "
                                "(report §4); resumable, runs under torchrun")
    footprints.add_argument("data", nargs="?", default=None,
                            help="local json/jsonl/csv/parquet file or a cached hub dataset id (or --lm-eval-task)")
    footprints.add_argument("--config", default=None, help="dataset configuration (hub datasets)")
    footprints.add_argument("--split", default=None, help="dataset split, e.g. test (needed if it has several)")
    footprints.add_argument("--revision", default=None, help="dataset revision to pin")
    footprints.add_argument("--column", default=None, help="column holding the prompt text")
    footprints.add_argument("--template", default=None, help="prompt built from columns, e.g. 'Q: {question}\\nA:'")
    footprints.add_argument("--name", default=None, help="benchmark name in reports (default: the file name)")
    footprints.add_argument("--limit", type=count(1, MAX_ITEMS), default=None, help="only the first N samples")
    add_batch_options(footprints, default=16)
    footprints.add_argument("--max-length", type=count(1, MAX_POSITIONS), default=2048,
                            help="keep the last N tokens of longer prompts")
    footprints.add_argument("--chunk-size", type=count(1, MAX_ITEMS), default=1024,
                            help="samples per checkpoint (default 1024)")
    footprints.add_argument("--out", required=True, help="footprint file (.safetensors); resumes if interrupted")
    task = footprints.add_argument_group("lm-eval task (install qscope-plugin[eval])")
    task.add_argument("--lm-eval-task", default=None, metavar="TASK",
                      help="harvest an lm-evaluation-harness task's documents on the contexts lm-eval builds")
    task.add_argument("--num-fewshot", type=count(0, 1000), default=None,
                      help="few-shot examples (default: the task's own)")
    task.add_argument("--fewshot-seed", type=count(0, MAX_SEED), default=1234,
                      help="few-shot sampler seed (lm-eval's default 1234)")
    task.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    task.add_argument("--apply-chat-template", action="store_true", help="wrap contexts in the model's chat template")
    add_model_options(footprints)
    footprints.set_defaults(func=cmd_footprints)

    redundancy = sub.add_parser("redundancy", help="coverage, R_hat, R, overlaps and correlations of benchmarks "
                                "from their footprints (report §4)")
    redundancy.add_argument("footprints", nargs="+", help="footprint files written by `qscope footprints`")
    redundancy.add_argument("--layer", type=count(0, MAX_INDEX), default=None,
                            help="layer to compare (needed if files hold several)")
    redundancy.add_argument("--correctness", action="append", metavar="NAME=CSV",
                            help="per-sample scores of a benchmark: models as rows, samples as columns (repeatable)")
    redundancy.add_argument("--scores", default=None, help="CSV of accuracies: models as rows, benchmarks as columns "
                            "(default: means of --correctness)")
    redundancy.add_argument("--lm-eval-outputs", "--lm-eval-results", nargs="+", metavar="DIR", default=None,
                            help="lm_eval --output_path folders, one per model (with --log_samples): per-sample "
                            "correctness and scores instead of --correctness / --scores")
    redundancy.add_argument("--lm-eval-metric", action="append", metavar="TASK=METRIC",
                            help="per-sample metric of a task, e.g. gsm8k=exact_match,strict-match (default acc, "
                            "else exact_match)")
    redundancy.add_argument("--reference", default="MMLU", help="benchmark to control for in partial correlations")
    redundancy.add_argument("--n-draws", type=count(1, MAX_ITEMS), default=200,
                            help="Monte-Carlo subsets per n for tau_n")
    redundancy.add_argument("--seed", type=count(0, MAX_SEED), default=0)
    redundancy.add_argument("--kendall", choices=["a", "b"], default="b", help="Kendall tau variant (default b)")
    redundancy.add_argument("--drop-threshold", type=finite, default=0.6)
    redundancy.add_argument("--distinct-threshold", type=finite, default=0.2)
    redundancy.add_argument("--out", required=True, help="report folder")
    redundancy.add_argument("--json", action="store_true", help="print the report JSON instead of a table")
    redundancy.set_defaults(func=cmd_redundancy)
