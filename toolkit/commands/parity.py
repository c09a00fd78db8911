"""Check numerical parity of an ONNX model against its PyTorch original.

Runs prefill (several batch sizes, left padding) and multi-step decode with each
side keeping its own cache, plus held-out perplexity for the trained reference
model; prints a table and exits 1 when a threshold fails.
"""

from __future__ import annotations

import argparse

from toolkit.commands._common import add_model_args, add_parity_args, parity_settings, resolve_model, \
    threshold_overrides


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="ORIGINAL", help="the PyTorch source (same MODEL forms as export)")
    parser.add_argument("onnx", metavar="OPTIMIZED.onnx", nargs="?",
                        help="the model to check (not with --bisect, which builds its own)")
    parser.add_argument("--bisect", action="store_true",
                        help="export ORIGINAL, apply the passes one at a time, and name the first pass (and the "
                        "nodes it added) after which parity fails")
    parser.add_argument("--passes", default=None, help="with --bisect: passes to apply (default pipeline)")
    add_model_args(parser)
    add_parity_args(parser)
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout)")
    parser.add_argument("--junit", metavar="PATH", help="write the report as JUnit XML")


def run(args: argparse.Namespace) -> int:
    from toolkit import parity
    from toolkit.errors import ToolkitError

    if args.bisect:
        return _run_bisect(args)
    if args.onnx is None:
        raise ToolkitError("parity needs OPTIMIZED.onnx", hint="pass the model to check, or use --bisect")
    model = parity.load_onnx(args.onnx)
    src = resolve_model(args, parity.metadata(model))
    report = parity.check(src, args.onnx, parity_settings(args), profile=args.profile,
                          overrides=threshold_overrides(args))
    emit_report(report, args)
    return 0 if report.passed else 1


def emit_report(report, args: argparse.Namespace) -> None:
    from toolkit.parity import write_atomic

    if args.json == "-":
        print(report.to_json())
    else:
        report.render()
        if args.json:
            write_atomic(args.json, report.to_json())
    if args.junit:
        write_atomic(args.junit, report.to_junit())


def _run_bisect(args: argparse.Namespace) -> int:
    import json

    from toolkit.bisect import bisect
    from toolkit.parity import write_atomic

    names = None if args.passes is None else [p for p in args.passes.split(",") if p]
    result = bisect(resolve_model(args), names, None, parity_settings(args), profile=args.profile,
                    overrides=threshold_overrides(args))
    for step in result["steps"]:
        status = "ok" if step["parity_passed"] else "FAIL"
        print(f"{step['pass']:<20} {step['rewrites']:>3} rewrites  parity {status}")
        for line in step["failures"][:5]:
            print(f"    {line}")
    culprit = result["first_failing_pass"]
    if culprit:
        print(f"first failing pass: {culprit}; nodes it added: {', '.join(result['nodes_added'][:10]) or 'none'}")
    else:
        print("parity holds after every pass")
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2))
    return 1 if culprit else 0
