"""Arguments shared by several commands."""

from __future__ import annotations

import argparse


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None,
                        help="size preset of a built-in model (tiny, small, base; default tiny)")
    parser.add_argument("--config", action="append", metavar="KEY=VALUE",
                        help="config override (repeatable), e.g. --config num_hidden_layers=4")
    parser.add_argument("--seed", type=int, default=None, help="seed of random-weight models (default 0)")


def resolve_model(args: argparse.Namespace, metadata: dict[str, str] | None = None):
    """Resolve the MODEL argument; unspecified preset/seed/config fall back to what the ONNX recorded."""
    import json

    from toolkit import sources
    from toolkit.errors import ModelNotFoundError

    metadata = metadata or {}
    if args.preset is not None and not sources.is_builtin_family(args.model):
        raise ModelNotFoundError(
            f"--preset {args.preset} applies to the built-in families ({', '.join(sources.builtin_families())}), "
            f"not to {args.model!r}",
            hint="drop --preset: a Hugging Face architecture is sized with --config (e.g. --config "
                 "num_hidden_layers=4), and a trained or local checkpoint has its own size")
    preset = args.preset or metadata.get("toolkit.preset") or "tiny"
    seed = args.seed if args.seed is not None else int(metadata.get("toolkit.seed", "0") or 0)
    overrides = (sources.parse_config_overrides(args.config) if args.config
                 else json.loads(metadata.get("toolkit.config_overrides", "{}") or "{}"))
    return sources.resolve(args.model, preset=preset, overrides=overrides, seed=seed)


def add_parity_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parity")
    g.add_argument("--batch-sizes", default="1,3", help="comma-separated prefill batch sizes (default 1,3)")
    g.add_argument("--prompt-len", type=int, default=12, help="prompt length before left padding (default 12)")
    g.add_argument("--decode-steps", type=int, default=6, help="decode steps with cache (default 6)")
    g.add_argument("--ppl-tokens", type=int, default=2048,
                   help="held-out tokens for perplexity, when the model ships held-out text (0 = off)")
    g.add_argument("--ppl-window", type=int, default=256, help="perplexity window in tokens (default 256)")
    g.add_argument("--ppl-mode", choices=("auto", "prefill", "decode"), default="auto",
                   help="score each window in one prefill, or token by token through the cache (auto: decode "
                   "for a quantized KV cache, whose prefill is full precision)")
    g.add_argument("--greedy", type=int, default=None, metavar="PROMPTS",
                   help="teacher-forced greedy agreement over PROMPTS held-out prompts x --greedy-tokens "
                   "(default: 32 for a quantized KV cache, else off)")
    g.add_argument("--greedy-tokens", type=int, default=128, help="new tokens per greedy prompt (default 128)")
    g.add_argument("--profile", default=None,
                   help="threshold profile (fp32, fp16, kv-int8, kv-int4, kv-2bit); default from the model's "
                   "metadata, else fp16 when most weight matrices are float16, else fp32")
    g.add_argument("--threshold", action="append", metavar="NAME=VALUE",
                   help="override one threshold, e.g. --threshold logits_max_abs=1e-2")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def add_html_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("HTML report")
    g.add_argument("--html", metavar="PATH",
                   help="write the report as one self-contained HTML page with plots (error histograms, "
                   "per-layer divergence, perplexity / greedy agreement)")
    g.add_argument("--compare", nargs="+", metavar="REPORT.json", default=None,
                   help="with --html, run no model: plot saved parity JSON reports (or bundle directories) "
                   "side by side, perplexity increase and greedy agreement against each one's setting (from "
                   "the model's metadata, else the file name); put it last on the command line")


def check_threads(threads: int | None) -> None:
    """A ``--threads`` count ORT can use: None (its default) or >= 1."""
    from toolkit.errors import ToolkitError

    if threads is not None and threads < 1:
        raise ToolkitError(f"--threads must be >= 1, got {threads}",
                           hint="pass a positive count, or leave it out for ORT's default")


def parity_settings(args: argparse.Namespace):
    from toolkit.errors import ToolkitError
    from toolkit.parity import ParitySettings

    try:
        batches = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError as exc:
        raise ToolkitError(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of integers",
                           hint="write e.g. --batch-sizes 1,4") from exc
    # Lengths and counts that cannot run (they ended in ORT or NumPy tracebacks).
    if not batches or min(batches) < 1:
        raise ToolkitError(f"--batch-sizes {args.batch_sizes!r} must list batch sizes >= 1",
                           hint="write e.g. --batch-sizes 1,4")
    for flag, value, least in (("--prompt-len", args.prompt_len, 1), ("--decode-steps", args.decode_steps, 0),
                               ("--ppl-tokens", args.ppl_tokens, 0),
                               ("--greedy-tokens", getattr(args, "greedy_tokens", 1), 1)):
        if value < least:
            raise ToolkitError(f"{flag} must be >= {least}, got {value}", hint=f"pass {flag} {max(least, 1)} or more")
    check_threads(args.threads)
    mode = getattr(args, "ppl_mode", "auto")
    return ParitySettings(batch_sizes=batches, prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                          perplexity_tokens=args.ppl_tokens, threads=args.threads,
                          perplexity_window=getattr(args, "ppl_window", 256),
                          perplexity_decode=None if mode == "auto" else mode == "decode",
                          greedy_prompts=getattr(args, "greedy", None),
                          greedy_tokens=getattr(args, "greedy_tokens", 128))


def threshold_overrides(args: argparse.Namespace) -> dict[str, float]:
    from toolkit.errors import ToolkitError

    out = {}
    for item in args.threshold or []:
        key, _, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError as exc:
            raise ToolkitError(f"--threshold {item!r} is not NAME=NUMBER",
                               hint="write e.g. --threshold top1_min=0.99") from exc
    return out


def add_pass_option_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pass-option", action="append", metavar="PASS.OPTION=VALUE", default=[],
                        help="set a pass option, e.g. --pass-option sampling-head.temperature=0.8")


# The convert flag that runs each opt-in pass (for hints).
PASS_FLAGS = {"float16": "--float16", "portable": "--portable", "sampling-head": "--sampling-head K",
              "kv-cache": "--kv-cache SCHEME", "low-rank": "--rank-ratio R", "low-rank-kv": "--kv-rank-ratio R"}


def refuse_unused_pass_options(running: list[str], options: dict[str, dict[str, str]]) -> None:
    """A ``--pass-option`` of a pass that does not run was silently ignored: refused by name."""
    from toolkit.errors import PassError

    for name, opts in options.items():
        if name not in running:
            raise PassError(f"--pass-option {name}.{next(iter(opts), '')}=...: the pass {name!r} does not run here "
                            f"(passes: {', '.join(running) or 'none'})",
                            hint=f"add {PASS_FLAGS.get(name, '--passes ...,' + name)} to run it, or drop the option")


def parse_pass_options(items: list[str]) -> dict[str, dict[str, str]]:
    """``["kv-cache.scheme=int8", ...]`` -> ``{"kv-cache": {"scheme": "int8"}}``."""
    from toolkit.errors import PassError

    options: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot:
            raise PassError(f"--pass-option {item!r} is not PASS.OPTION=VALUE",
                            hint="write e.g. --pass-option sampling-head.k=40")
        options.setdefault(name, {})[option] = value
    return options
