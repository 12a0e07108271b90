"""``qscope demo``: every recipe on the small demo model shipped in the package; this module only prints."""

from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> None:
    from qscope_plugin.demo.run import CONDITIONS, describe_features, run_demo

    summary = run_demo(args.out)
    print(f"qscope demo on {summary['release']} ({summary['seconds']} s); report in {args.out}/report.md")
    print("layer  SAE FVU  feature  held-out bal.acc  Han share: " + "  ".join(CONDITIONS))
    for r in summary["layers"]:
        shares = "  ".join(f"{r['han_share'][c]:>{len(c)}.2f}" for c in CONDITIONS)
        print(f"{r['layer']:5}  {r['fvu']:7.3f}  {r['feature']:7}  {r['balanced_accuracy']:16.2f}  {'':11}{shares}")
    clf, red = summary["classifier"], summary["redundancy"]
    print(f"OR-rule zh/en classifier: Chinese when any of {describe_features(clf['features'])} fires; held-out "
          f"precision {clf['precision']:.2f} recall {clf['recall']:.2f} F1 {clf['f1']:.2f}")
    print(f"redundancy (layer {red['layer']}): " + ", ".join(
        f"{name} |F| {row['footprint_size']} R̂ {row['feature_redundancy']:.3g}" for name, row in
        red["benchmarks"].items()) + "; drop candidates: " + (", ".join(
        f"{d['benchmark']} (in {d['covered_by']})" for d in red["summary"]["drop_candidates"]) or "none"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run every recipe on the small demo model shipped in the package")
    demo.add_argument("--out", default="qscope-demo-report", help="report folder (default qscope-demo-report)")
    demo.set_defaults(func=cmd_demo)
