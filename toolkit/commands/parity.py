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
    parser.add_argument("onnx", metavar="OPTIMIZED.onnx")
    add_model_args(parser)
    add_parity_args(parser)
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout)")
    parser.add_argument("--junit", metavar="PATH", help="write the report as JUnit XML")


def run(args: argparse.Namespace) -> int:
    from toolkit import parity

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
