"""Export + graph passes + parity in one command, written atomically to a directory.

Writes a bundle: DIR/model.onnx (+ external data for large models),
DIR/manifest.json (I/O, KV layout, op library hash and ORT API version, passes,
parity verdict), DIR/libtoolkit_ops.so when the model uses our ops, DIR/passes.json
(what each pass rewrote), DIR/parity.json and DIR/parity.html (the same report with
plots, toolkit/report.py). Load it with toolkit.load(DIR). Nothing is published when any step fails
(or parity fails, unless --keep-failed), so DIR is never half-written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from toolkit.commands._common import (
    add_model_args,
    add_parity_args,
    add_pass_option_arg,
    parity_settings,
    parse_pass_options,
    refuse_unused_pass_options,
    threshold_overrides,
)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="built-in name, hf:<arch>, a model directory, or an ONNX file (a decoder exported "
                        "elsewhere: the passes run on it, and parity compares it with --reference)")
    parser.add_argument("--reference", metavar="MODEL", default=None,
                        help="with an ONNX file as MODEL: the PyTorch model it was exported from (built-in name, "
                        "hf:<arch> or a model directory; --preset/--config/--seed apply to it), which parity "
                        "compares the converted model with")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--passes", default=None,
                        help="comma-separated passes to run (default: the default pipeline; 'none' for none); "
                        "see `toolkit list-passes`")
    parser.add_argument("--sampling-head", type=int, metavar="K", default=None,
                        help="append FusedSoftmaxTopK to the logits: next_token_probs/next_token_ids [B, K] outputs "
                        "(with --sample: SampleTopKTopP, a seeded draw from the top K -> next_token [B])")
    parser.add_argument("--sample", action="store_true",
                        help="with --sampling-head: draw the token (temperature/top-p/min-p via --pass-option)")
    parser.add_argument("--kv-cache", metavar="SCHEME", default=None,
                        choices=("int8", "int8-asym", "int4", "kivi4", "kivi2"),
                        help="quantized KV cache attention (QuantKVAttention): int8 (symmetric per token), "
                        "int8-asym, int4 (per token, groups of --kv-group channels), kivi4 / kivi2 (KIVI: keys per "
                        "channel, values per token, --kv-residual full-precision tokens); changes the cache I/O")
    parser.add_argument("--kv-group", type=int, default=None, metavar="G",
                        help="int4 / KIVI group size, 8, 16, 32, 64 or 128 (default 32): channels per group of "
                        "int4 keys and values (at most the head dim) and of KIVI values (min(G, head dim)), tokens "
                        "per KIVI key group; int8 has one scale per token and no groups")
    parser.add_argument("--kv-residual", type=int, default=None, metavar="R",
                        help="full-precision residual window: the R most recent tokens stay unquantized and "
                        "are quantized when the window fills (default: 128 for int4 / kivi4 / kivi2, none for "
                        "int8; 0 turns it off for int8 / int4, KIVI needs it)")
    parser.add_argument("--kv-quantize-query", action="store_true",
                        help="with --kv-cache: round each attention query row to int8 (one scale per row), so the "
                        "CPU kernel scores int8 keys with integer dot products; changes the numerics (check with "
                        "the conversion's parity report); not with --portable")
    parser.add_argument("--kv-capacity", type=int, default=0, metavar="TOKENS",
                        help="fixed-capacity quantized cache of TOKENS quantized slots (plus R-1 residual "
                        "slots): the cache tensors keep their shape, the lengths travel as "
                        "past_key_values.lengths, and a host that binds each present output to its past "
                        "input's buffer (as `toolkit generate` does) appends in place; 0 (default): the "
                        "cache grows every step")
    low_rank = parser.add_mutually_exclusive_group()
    low_rank.add_argument("--rank-ratio", type=float, metavar="R", default=None,
                          help="run the low-rank pass: factor constant-weight MatMuls by truncated SVD, rank "
                          "R * min(K, N) per layer (more options via --pass-option low-rank.OPTION=VALUE)")
    low_rank.add_argument("--energy", type=float, metavar="E", default=None,
                          help="run the low-rank pass keeping a share E of each layer's spectral energy")
    low_rank.add_argument("--param-budget", type=float, metavar="B", default=None,
                          help="run the low-rank pass keeping a global share B of the eligible weights")
    parser.add_argument("--activation-aware", action="store_true",
                        help="with --rank-ratio/--energy/--param-budget: activation-aware SVD (ASVD) from a "
                        "calibration run of the original model")
    parser.add_argument("--whiten", action="store_true",
                        help="with --rank-ratio/--energy/--param-budget: whitened SVD (factors with the smallest "
                        "output error on the calibration activations; SVD-LLM style)")
    parser.add_argument("--int8-factors", action="store_true",
                        help="with --rank-ratio/--energy/--param-budget: store the low-rank factors as int8 with a "
                        "float32 scale per column (4x smaller factors)")
    parser.add_argument("--kv-rank-ratio", type=float, metavar="R", default=None,
                        help="run the low-rank-kv pass: cache a rank R * kv_heads * head_dim latent of the keys and "
                        "values per layer instead of the full tensors (lossy; changes the cache I/O; more options "
                        "via --pass-option low-rank-kv.OPTION=VALUE)")
    parser.add_argument("--kv-latent-bits", type=int, choices=(8, 32), default=None,
                        help="with --kv-rank-ratio: 8 stores the latent cache as int8 codes with a float32 scale per "
                        "token and head group (4x smaller again); 32 (default) keeps it float32")
    parser.add_argument("--float16", action="store_true",
                        help="after the other passes, run the float32 computation in float16 (ONNX Runtime's "
                        "converter; our float32-only ops and the model's inputs and outputs stay float32; parity "
                        "with the fp16 profile unless a quantized cache's applies)")
    parser.add_argument("--portable", action="store_true",
                        help="attach standard-ONNX bodies to our ops: the model also runs without the op library "
                        "(ORT with the library still uses the fused kernels)")
    add_pass_option_arg(parser)
    parser.add_argument("--explain", action="store_true", help="say why each pass did not match where it did not")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset of the export (default 21); an ONNX file as MODEL keeps its own")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--keep-failed", action="store_true",
                        help="publish the output even when parity fails; the exit status is then 0 and the "
                        "verdict is in parity.json and manifest.json (parity.passed), so CI should read it or run "
                        "`toolkit parity`")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check (not recommended)")
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--junit", metavar="PATH", help="also write the parity report as JUnit XML")
    add_model_args(parser)
    add_parity_args(parser)


def run(args: argparse.Namespace) -> int:
    import json
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from toolkit.errors import ParityFailure
    from toolkit.workspace import Interrupts, check_destination, check_report_paths, publish

    out = Path(args.output)
    onnx_input = _onnx_input(args)
    check_destination(out, directory=True, overwrite=args.overwrite, keep=(args.model,))
    check_report_paths({"--junit": args.junit}, inputs=(args.model,))
    names, pass_options = _pass_selection(args)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))

    # SIGINT and SIGTERM unwind (KeyboardInterrupt) and remove the staging dir; nothing
    # is published after an interrupt, whatever caught it (workspace.Interrupts).
    try:
        with Interrupts() as guard:
            columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console, transient=False) as progress:
                from toolkit.export import save_model

                src, exported = _source_and_model(args, onnx_input, staging, progress)
                t = progress.add_task("graph passes", total=None)
                from passes import calibration, run_pipeline

                # a calibration run's temporary copy of a model past 2 GiB goes beside the
                # output (removed with the staging directory), not to $TMPDIR
                with calibration.scratch_directory(staging):
                    optimized, pipeline_report = run_pipeline(exported, names, pass_options,
                                                              explain=args.explain, consume=True)
                del exported  # its weights were shared with the passes (consume), not copied
                # what follows reads the graph only (parity and the session read the file)
                save_model(optimized, staging / "model.onnx", keep_weights=False)
                if src is not None and src.tokenizer is not None:
                    src.tokenizer.save(str(staging / "tokenizer.json"))
                for f in staging.glob("exported.onnx*"):
                    f.unlink()
                report_dict = pipeline_report.to_dict()
                (staging / "passes.json").write_text(json.dumps(report_dict, indent=2))
                counts = ", ".join(f"{r['name']}={r['count']}" for r in report_dict["passes"]) or "none"
                progress.update(t, total=1, completed=1, description=f"graph passes ({counts})")

                report = None
                if not args.no_parity:
                    from toolkit import parity

                    t = progress.add_task("parity (prefill + decode)", total=1)
                    report = parity.check(
                        src, staging / "model.onnx", parity_settings(args), profile=args.profile,
                        overrides=threshold_overrides(args),
                        progress=lambda done, total: progress.update(t, completed=done, total=total))
                    report.optimized = str(out / "model.onnx")  # where it will be, not the staging path
                    (staging / "parity.json").write_text(report.to_json())
                    from toolkit.report import render_html

                    parity.write_atomic(staging / "parity.html",
                                        render_html(report, title=f"parity: {out.name} vs {src.spec}"))
            if args.explain:
                for r in report_dict["passes"]:
                    for line in r.get("explanations", []):
                        console.print(f"[dim]{r['name']}: {line}[/]")
            if report is not None:
                report.render(console)
                if args.junit:
                    parity.write_atomic(args.junit, report.to_junit())
                if not report.passed and not args.keep_failed:
                    raise ParityFailure(
                        f"parity failed for {args.model}; nothing was written to {str(out)!r}",
                        hint="see the table above; rerun with --keep-failed to inspect the model, or --passes to "
                        "narrow down which pass breaks it")
            from toolkit import bundle

            bundle.write(staging, optimized, report_dict, None if report is None else report.passed)
            guard.check()
            publish(staging, out, overwrite=args.overwrite)
            console.print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
            return 0
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


DEFAULT_OPSET = 21


def _source_and_model(args: argparse.Namespace, onnx_input: Path | None, staging: Path,
                      progress: Any) -> tuple[Any, Any]:
    """(the PyTorch source, or None without a --reference; the ONNX model the passes run
    on): the ONNX file given, or the source exported into ``staging``."""
    from toolkit.commands._common import resolve_model
    from toolkit.export import export

    model = None
    if onnx_input is not None:
        t = progress.add_task(f"read {onnx_input}", total=None)
        model = _read_onnx(onnx_input)
        progress.update(t, total=1, completed=1)
    src = None
    if onnx_input is None or args.reference is not None:
        t = progress.add_task(f"load {args.reference or args.model}", total=None)
        src = (resolve_model(args) if onnx_input is None else
               resolve_model(argparse.Namespace(**{**vars(args), "model": args.reference}),
                             {p.key: p.value for p in model.metadata_props}))
        progress.update(t, total=1, completed=1, description=f"loaded {src.spec} ({src.family})")
    if onnx_input is None:
        t = progress.add_task("export (torch.onnx dynamo)", total=None)
        model = export(src, staging / "exported.onnx", opset=args.opset or DEFAULT_OPSET)
        progress.update(t, total=1, completed=1)
    return src, model


def _onnx_input(args: argparse.Namespace) -> Path | None:
    """The ONNX file MODEL names (None for a PyTorch source), with its flags checked
    before anything runs."""
    from pathlib import Path

    from toolkit.errors import ToolkitError

    path = Path(args.model)
    if path.is_dir() and (path / "model.onnx").is_file() and not (path / "config.json").is_file():
        path = path / "model.onnx"  # a directory of ONNX files (onnxruntime-genai's builder output, a bundle)
    if path.suffix.lower() != ".onnx":
        if args.reference is not None:
            raise ToolkitError(f"--reference is for an ONNX file as MODEL; {args.model!r} is a PyTorch source, "
                               "which parity compares with itself",
                               hint=f"drop --reference, or pass the ONNX file: toolkit convert model.onnx "
                               f"--reference {args.model} -o DIR")
        return None
    if args.opset is not None:
        raise ToolkitError(f"--opset applies to an export; {args.model!r} is already ONNX and keeps its opset",
                           hint="drop --opset (or convert from the PyTorch source with --opset)")
    if args.reference is None and not args.no_parity:
        raise ToolkitError(f"parity needs the PyTorch model that {args.model!r} was exported from",
                           hint="pass --reference MODEL (a built-in name, hf:<arch> or a Hugging Face model "
                           "directory), or --no-parity to convert without the check (not recommended)")
    return path


def _read_onnx(path: Path) -> Any:
    """The ONNX input with its weights, after toolkit.parity's checks of the file (named
    errors for a missing, corrupt or invalid model, or external data outside its directory)."""
    from onnx.external_data_helper import load_external_data_for_model

    from toolkit.parity import load_onnx

    model = load_onnx(path)  # (parsed once; the external weights, if any, read next)
    load_external_data_for_model(model, str(path.parent))
    return model


def _flag_option(options: dict[str, dict[str, str]], name: str, key: str, value: str, flag: str) -> None:
    """Set the pass option a flag gives; a --pass-option of the same key with another value
    conflicts (the flag used to overwrite it silently)."""
    from toolkit.errors import PassError

    user = options.setdefault(name, {})
    if key in user and not _same_option_value(user[key], value):
        raise PassError(f"--pass-option {name}.{key}={user[key]} conflicts with {flag}, which sets {key} to {value}",
                        hint="give it once: the flag or the pass option")
    user[key] = value


def _same_option_value(a: str, b: str) -> bool:
    if a.strip().lower() == b.strip().lower():
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def _pass_selection(args: argparse.Namespace) -> tuple[list[str] | None, dict[str, dict[str, str]]]:
    """Pass names and options from the flags; validated before the (slow) export."""
    from passes import get_pass
    from passes.pipeline import DEFAULT_PASSES, resolve_pass_names
    from toolkit.errors import PassError

    names = None if args.passes is None else [p for p in args.passes.split(",") if p and p != "none"]
    options = parse_pass_options(args.pass_option)
    if args.sampling_head is not None:
        names = list(DEFAULT_PASSES) if names is None else names
        names.append("sampling-head")
        _flag_option(options, "sampling-head", "k", str(args.sampling_head), "--sampling-head")
        if args.sample:
            _flag_option(options, "sampling-head", "sample", "true", "--sample")
    if args.sample and args.sampling_head is None:
        raise PassError("--sample needs --sampling-head K (it draws from the head's top K)",
                        hint="e.g. toolkit convert MODEL -o DIR --sampling-head 50 --sample")
    if not getattr(args, "kv_cache", None):
        for flag, value in (("--kv-group", getattr(args, "kv_group", None)),
                            ("--kv-residual", getattr(args, "kv_residual", None))):
            if value is not None:
                raise PassError(f"{flag} needs --kv-cache (it is an option of the quantized cache)",
                                hint=f"e.g. toolkit convert MODEL -o DIR --kv-cache kivi4 {flag} {value}")
    if getattr(args, "kv_capacity", 0) and not getattr(args, "kv_cache", None):
        raise PassError("--kv-capacity needs --kv-cache (it sizes the quantized cache)",
                        hint="e.g. toolkit convert MODEL -o DIR --kv-cache int8 --kv-capacity 4096")
    if getattr(args, "kv_quantize_query", False) and not getattr(args, "kv_cache", None):
        raise PassError("--kv-quantize-query needs --kv-cache (it is an option of the quantized cache attention)",
                        hint="e.g. toolkit convert MODEL -o DIR --kv-cache int8 --kv-quantize-query")
    if getattr(args, "kv_quantize_query", False) and args.portable:
        raise PassError("--kv-quantize-query cannot be combined with --portable: the portable attention "
                        "function keeps the float query",
                        hint="drop --kv-quantize-query for a portable model")
    if getattr(args, "kv_capacity", 0) and args.portable:
        raise PassError("--kv-capacity cannot be combined with --portable: the fixed-capacity cache is "
                        "appended in place, which standard ONNX ops cannot do",
                        hint="drop --kv-capacity (growing cache) for a portable model")
    if getattr(args, "kv_cache", None):
        names = list(DEFAULT_PASSES) if names is None else names
        names.append("kv-cache")
        # The flags' values, and whether the user gave each flag: a --pass-option kv-cache.X
        # wins over a flag's default (it was overwritten) and conflicts with a given flag.
        flags = {"scheme": (args.kv_cache, True), "group": (str(args.kv_group or 0), args.kv_group is not None),
                 "residual": (str(-1 if args.kv_residual is None else args.kv_residual), args.kv_residual is not None),
                 "capacity": (str(args.kv_capacity), bool(args.kv_capacity)),
                 "quantize_query": (str(bool(getattr(args, "kv_quantize_query", False))),
                                    bool(getattr(args, "kv_quantize_query", False)))}
        for key, (value, given) in flags.items():
            if given:
                _flag_option(options, "kv-cache", key, value,
                             "--kv-cache" if key == "scheme" else f"--kv-{key.replace('_', '-')}")
            else:
                options.setdefault("kv-cache", {}).setdefault(key, value)
    for flag, option in (("rank_ratio", "rank_ratio"), ("energy", "energy"), ("param_budget", "param_budget")):
        if getattr(args, flag, None) is not None:
            names = list(DEFAULT_PASSES) if names is None else names
            names.append("low-rank")
            _flag_option(options, "low-rank", option, str(getattr(args, flag)), f"--{flag.replace('_', '-')}")
    if getattr(args, "activation_aware", False):
        if "low-rank" not in options:
            raise PassError("--activation-aware needs --rank-ratio, --energy or --param-budget",
                            hint="e.g. toolkit convert MODEL -o DIR --rank-ratio 0.5 --activation-aware")
        _flag_option(options, "low-rank", "activation_aware", "true", "--activation-aware")
    if getattr(args, "whiten", False):
        if "low-rank" not in options:
            raise PassError("--whiten needs --rank-ratio, --energy or --param-budget",
                            hint="e.g. toolkit convert MODEL -o DIR --param-budget 0.6 --whiten")
        if getattr(args, "activation_aware", False):  # (the pass's own message names its option names)
            raise PassError("--whiten and --activation-aware are two ways to weight the SVD by the activations; "
                            "choose one",
                            hint="drop one: --whiten (whitened SVD, the smallest output error on the calibration "
                            "activations) or --activation-aware (ASVD)")
        _flag_option(options, "low-rank", "whiten", "true", "--whiten")
    if getattr(args, "int8_factors", False):
        if "low-rank" not in options:
            raise PassError("--int8-factors needs --rank-ratio, --energy or --param-budget",
                            hint="e.g. toolkit convert MODEL -o DIR --rank-ratio 0.5 --int8-factors")
        _flag_option(options, "low-rank", "int8_weights", "true", "--int8-factors")
    if getattr(args, "kv_rank_ratio", None) is not None:
        names = list(DEFAULT_PASSES) if names is None else names
        names.append("low-rank-kv")
        _flag_option(options, "low-rank-kv", "rank_ratio", str(args.kv_rank_ratio), "--kv-rank-ratio")
    if getattr(args, "kv_latent_bits", None) is not None:
        if "low-rank-kv" not in options:
            raise PassError("--kv-latent-bits needs --kv-rank-ratio (it sets how the latent cache is stored)",
                            hint="e.g. toolkit convert MODEL -o DIR --kv-rank-ratio 0.5 --kv-latent-bits 8")
        _flag_option(options, "low-rank-kv", "latent_bits", str(args.kv_latent_bits), "--kv-latent-bits")
    if getattr(args, "float16", False):
        names = list(DEFAULT_PASSES) if names is None else names
        names.append("float16")
    if args.portable:
        from passes.function_builder import ONNX_OPSET

        if (args.opset or DEFAULT_OPSET) < ONNX_OPSET:  # (the pass says so too, but only after the slow export)
            raise PassError(f"--portable writes its function bodies in ONNX opset {ONNX_OPSET}; --opset "
                            f"{args.opset} is older, and a model-local function cannot use a newer opset than "
                            "its model",
                            hint=f"use --opset {ONNX_OPSET} or newer with --portable (the default is {ONNX_OPSET})")
        names = list(DEFAULT_PASSES) if names is None else names
        names.append("portable")
    running = resolve_pass_names(names)
    for name, opts in options.items():
        get_pass(name).make_options(opts)
    refuse_unused_pass_options(running, options)
    return names, options
