"""Check numerical parity of an ONNX model against its PyTorch original.

Runs prefill (several batch sizes, left padding) and multi-step decode with each
side keeping its own cache, plus held-out perplexity for the trained reference
model; prints a table and exits 1 when a threshold fails. ``--html`` also writes
the report as one self-contained HTML page with plots (toolkit/report.py);
``--compare A.json B.json ... --html OUT.html`` runs no model: it plots saved reports
(e.g. bundles converted with different --kv-cache / --param-budget settings) side
by side.
"""

from __future__ import annotations

import argparse

from toolkit.commands._common import (
    add_html_args,
    add_model_args,
    add_parity_args,
    add_pass_option_arg,
    parity_settings,
    parse_pass_options,
    refuse_unused_pass_options,
    resolve_model,
    threshold_overrides,
)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="ORIGINAL", nargs="?",
                        help="the PyTorch source (same MODEL forms as export); not with --compare")
    parser.add_argument("onnx", metavar="OPTIMIZED.onnx", nargs="?",
                        help="the model to check (not with --bisect, which builds its own)")
    parser.add_argument("--bisect", action="store_true",
                        help="export ORIGINAL, apply the passes one at a time, and name the first pass (and the "
                        "nodes it added) after which parity fails")
    parser.add_argument("--passes", default=None, help="with --bisect: passes to apply (default pipeline)")
    add_pass_option_arg(parser)  # with --bisect
    add_model_args(parser)
    add_parity_args(parser)
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout)")
    parser.add_argument("--junit", metavar="PATH", help="write the report as JUnit XML")
    add_html_args(parser)
    parser.set_defaults(_late_positionals=("model", "onnx"))  # also after options (see cli.main)


def run(args: argparse.Namespace) -> int:
    from toolkit import parity
    from toolkit.errors import ToolkitError
    from toolkit.workspace import check_report_paths

    # before the run, not after it; never onto the model, a model file, a compared report or another report
    check_report_paths({"--json": args.json, "--junit": args.junit, "--html": args.html},
                       inputs=(args.onnx, *(args.compare or ()), args.model))
    if args.compare is not None:
        return _run_compare(args)
    if args.model is None:
        raise ToolkitError("parity needs ORIGINAL",
                           hint="e.g. toolkit parity llama-stdlib out/ref/model.onnx; or --compare A.json B.json "
                           "--html OUT.html to plot saved reports")
    if args.bisect:
        if args.junit:
            raise ToolkitError("--junit is not written by --bisect (a debugging run: one report per pass)",
                               hint="use --json / --html with --bisect, and --junit on the converted model")
        return _run_bisect(args)
    if args.onnx is None:
        raise ToolkitError("parity needs OPTIMIZED.onnx", hint="pass the model to check, or use --bisect")
    args.onnx = str(parity.model_file(args.onnx))  # the session below opens the file itself
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
    if getattr(args, "html", None):
        from toolkit.report import render_html

        write_atomic(args.html, render_html(report, title=f"parity: {report.optimized} vs {report.original}"))


def _run_compare(args: argparse.Namespace) -> int:
    """Plot saved parity reports side by side (no model runs)."""
    from toolkit.errors import ToolkitError
    from toolkit.parity import write_atomic
    from toolkit.report import compare_rows, load_report, render_html, setting_label

    if args.model is not None or args.onnx is not None or args.bisect:
        raise ToolkitError("--compare reads saved reports: it takes no ORIGINAL / OPTIMIZED.onnx / --bisect",
                           hint="toolkit parity --html OUT.html --compare a/parity.json b/parity.json")
    if not args.html:
        raise ToolkitError("--compare writes an HTML page: add --html OUT.html",
                           hint="toolkit parity --html OUT.html --compare a/parity.json b/parity.json")
    pairs: list[tuple[str, dict]] = []
    for path in args.compare:
        report = load_report(path)
        label = setting_label(report, path)
        taken = {lab for lab, _ in pairs}
        if label in taken:  # two reports of the same setting: say which file each is
            label = f"{label} ({path})"
        while label in taken:
            label += "'"
        pairs.append((label, report))
    write_atomic(args.html, render_html(pairs, title=f"parity: {len(pairs)} settings compared"))
    for row in compare_rows(pairs):
        ppl = "n/a" if row["ppl_rel_increase"] is None else f"{100 * row['ppl_rel_increase']:+.4f}%"
        greedy = "n/a" if row["greedy_agreement"] is None else f"{100 * row['greedy_agreement']:.2f}%"
        verdict = "n/a" if row["passed"] is None else "PASS" if row["passed"] else "FAIL"
        print(f"{row['label']:<32} {verdict:<5} perplexity {ppl:>10}  greedy agreement {greedy:>8}")
    print(f"wrote {args.html}")
    return 0


def _run_bisect(args: argparse.Namespace) -> int:
    import json

    from passes.pipeline import resolve_pass_names
    from toolkit.bisect import bisect
    from toolkit.parity import write_atomic

    names = None if args.passes is None else [p for p in args.passes.split(",") if p]
    options = parse_pass_options(args.pass_option)
    refuse_unused_pass_options(resolve_pass_names(names), options)
    step_reports: list[tuple[str, dict]] = []
    result = bisect(resolve_model(args), names, options or None, parity_settings(args),
                    profile=args.profile,
                    overrides=threshold_overrides(args),
                    on_report=lambda name, report: step_reports.append((f"+{name}", report.to_dict())))
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
    if args.html and step_reports:
        from toolkit.report import render_html

        write_atomic(args.html, render_html(step_reports, title=f"parity bisect: {args.model}"))
    return 1 if culprit else 0
