"""Benchmark the custom operators against ONNX Runtime's own ops (JSON output).

`toolkit bench topk`: FusedSoftmaxTopK vs ORT Softmax->TopK, TopK and a
single-read floor, interleaved in one process. `toolkit bench head`: greedy decode
with the sampling head vs full logits on the same prompts. `toolkit bench lowrank`:
LowRankMatMul vs ORT dense MatMul and MatMul->MatMul, weights rotated out of cache.
`toolkit bench minilm`: the low-rank pass's sentence-embedding fidelity on the
pretrained all-MiniLM-L6-v2 encoder.
`toolkit bench attention`: QuantKVAttention vs ORT GroupQueryAttention (fp32 and its
quantized caches) and the unfused exported subgraph, one decode step; with
--model/--converted, decode tokens/s of a converted model vs the original.
"""

from __future__ import annotations

import argparse


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    """KxN[,KxN...] layer shapes."""
    try:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) != 2 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected comma-separated KxN shapes, e.g. 4096x4096,4096x11008; "
                                         f"got {text!r}")
    return shapes


def _names(valid, allow_empty: bool = False):
    """An argparse type: a comma-separated list whose items are all in ``valid`` (a
    tuple, or a function returning one, called only when the option is given)."""

    def parse(text: str) -> tuple[str, ...]:
        nonlocal valid
        valid = valid() if callable(valid) else valid
        items = tuple(v for v in text.split(",") if v)
        bad = [v for v in items if v not in valid]
        if bad or not (items or allow_empty):
            what = f"unknown {', '.join(map(repr, bad))}" if bad else "empty list"
            raise argparse.ArgumentTypeError(f"{what}: use a comma-separated list of {', '.join(valid)}")
        return items

    return parse


# Cache schemes `toolkit bench attention` times: the kv-cache presets, each also with
# the int8 query (-q8 suffix). A function: kv_quant imports numpy, which `--help` must
# not wait for.
def _attention_schemes() -> tuple[str, ...]:
    from toolkit.ops.kv_quant import PRESETS

    return tuple(PRESETS) + tuple(f"{p}-q8" for p in PRESETS)


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    sub.required = True
    p = sub.add_parser("topk", help="fused softmax-top-k vs ONNX Runtime Softmax->TopK")
    p.add_argument("--vocab", type=_ints, default=(32000, 128256, 151936))
    p.add_argument("--batch", type=_ints, default=(1, 8, 64))
    p.add_argument("--k", type=_ints, default=(1, 50))
    p.add_argument("--threads", type=_ints, default=(1, 2))
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--cold", action="store_true", help="touch 64 MiB before each timed run (cold cache)")
    p.add_argument("--data", choices=("normal", "peaked", "ascending", "large"), default="normal",
                   help="logits: normal N(0, 2^2) (default); peaked (Zipf-like, as an LM's); ascending (each row "
                        "sorted: the running max rises in every block, the kernel's worst case); large (normal x 1e7, "
                        "the exact scalar path)")
    p.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")
    lr = sub.add_parser("lowrank", help="LowRankMatMul vs ONNX Runtime dense MatMul and MatMul->MatMul")
    lr.add_argument("--shapes", type=_shapes,
                    default=((4096, 4096), (4096, 11008)), help="KxN of the dense layer, e.g. 4096x4096,4096x11008")
    lr.add_argument("--ranks", type=_ints, default=(512, 1024, 2048))
    lr.add_argument("--rows", type=_ints, default=(1, 8, 128), help="M, rows of x")
    lr.add_argument("--threads", type=_ints, default=(1, 2))
    lr.add_argument("--warmup", type=int, default=30)
    lr.add_argument("--runs", type=int, default=300)
    lr.add_argument("--warmup-big", type=int, default=5, help="warm-ups at M >= 128 (each call is 10-500 ms)")
    lr.add_argument("--runs-big", type=int, default=30, help="timed runs at M >= 128")
    lr.add_argument("--int8", action="store_true",
                    help="also int8 factors: ours vs ORT's DequantizeLinear->MatMul (MatMulNBits), same run")
    lr.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")
    fid = sub.add_parser("lowrank-fidelity", help="perplexity vs parameter reduction of the low-rank pass "
                         "(plain vs activation-aware SVD)")
    fid.add_argument("--model", default="llama-stdlib")
    fid.add_argument("--budgets", type=lambda t: tuple(float(v) for v in t.split(",")),
                     default=(0.9, 0.8, 0.7, 0.6, 0.5, 0.4), help="global shares of the eligible weights kept")
    fid.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")
    mini = sub.add_parser("minilm", help="sentence-embedding cosine and retrieval vs parameter reduction of the "
                          "low-rank pass on the pretrained all-MiniLM-L6-v2 encoder (plain vs activation-aware SVD)")
    mini.add_argument("--budgets", type=lambda t: tuple(float(v) for v in t.split(",")),
                      default=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5), help="global shares of the eligible weights kept")
    mini.add_argument("--threads", type=int, default=1, help="PyTorch and ONNX Runtime intra-op threads")
    mini.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")
    at = sub.add_parser("attention", help="QuantKVAttention vs ONNX Runtime GroupQueryAttention (fp32/int8/int4) "
                        "and the unfused subgraph, one decode step; or, with --model/--converted, decode tokens/s")
    at.add_argument("--context", type=_ints, default=(1024, 4096, 16384), help="past lengths L")
    at.add_argument("--batch", type=_ints, default=(1, 8))
    at.add_argument("--threads", type=_ints, default=(1, 2))
    at.add_argument("--schemes", type=_names(_attention_schemes), default=("int8", "int8-q8", "int4", "int4-q8", "kivi4", "kivi2"),
                    help="cache schemes (kv-cache presets; a -q8 suffix rounds the query to int8, e.g. int8-q8)")
    at.add_argument("--growing", type=_names(_attention_schemes, allow_empty=True), default=("int8",),
                    help="schemes also timed with the growing cache, a new present every call ('' for none)")
    at.add_argument("--gqa-quant", type=_names(("per_channel", "per_tensor"), allow_empty=True),
                    default=("per_channel", "per_tensor"), help="ORT GQA quantized-cache modes ('' for none)")
    at.add_argument("--warmup", type=int, default=30)
    at.add_argument("--runs", type=int, default=300)
    at.add_argument("--point-seconds", type=float, default=30.0,
                    help="timed-run budget of a point with B*L > 4096 (runs = budget / round time, >= 20)")
    at.add_argument("--max-point-seconds", type=float, default=90.0,
                    help="cap on any point's timed runs (a loaded machine makes rounds slower)")
    at.add_argument("--model", metavar="PATH", help="end-to-end mode: the unconverted model.onnx")
    at.add_argument("--converted", metavar="PATH", help="end-to-end mode: the same model with the quantized cache")
    at.add_argument("--steps", type=int, default=64, help="end-to-end mode: timed decode steps")
    at.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")
    h = sub.add_parser("head", help="decode step with the sampling head vs full logits (greedy, same prompts)")
    h.add_argument("--model", default="llama-stdlib")
    h.add_argument("--prompts", type=int, default=16)
    h.add_argument("--new-tokens", type=int, default=64)
    h.add_argument("--k", type=int, default=50)
    h.add_argument("--threads", type=int, default=1)
    h.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")


def _check(args: argparse.Namespace) -> None:
    """Refuse values the benchmarks cannot run, before any work: they used to end in
    ORT / NumPy tracebacks (exit 1), sometimes after points had run."""
    from toolkit.errors import ToolkitError

    def at_least(flag: str, values, low: float) -> None:
        values = values if isinstance(values, tuple) else (values,)
        bad = [v for v in values if not v >= low]
        if bad:
            raise ToolkitError(f"bench {args.bench}: {flag} must be >= {low}, got {', '.join(map(str, bad))}",
                               hint=f"pass {flag} with values of at least {low}")

    for flag in ("warmup", "warmup_big"):
        if hasattr(args, flag):
            at_least("--" + flag.replace("_", "-"), getattr(args, flag), 0)
    for flag in ("runs", "runs_big", "threads", "batch", "rows", "ranks", "context", "vocab", "k", "steps",
                 "prompts", "new_tokens"):
        if hasattr(args, flag) and getattr(args, flag) is not None:
            at_least("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    if args.bench == "topk" and max(args.k) > min(args.vocab):
        raise ToolkitError(f"bench topk: --k {max(args.k)} exceeds --vocab {min(args.vocab)} (every k runs at every "
                           "vocabulary size)", hint=f"use k <= {min(args.vocab)}, or larger vocabularies")
    if args.bench == "lowrank":
        for K, N in args.shapes:
            at_least("--shapes", (K, N), 1)
            big = [r for r in args.ranks if r >= min(K, N)]
            if big:
                raise ToolkitError(f"bench lowrank: rank {big[0]} is not low for a {K}x{N} layer (min(K, N) = "
                                   f"{min(K, N)})", hint=f"use --ranks below {min(K, N)}")
    for flag in ("budgets",):
        bad = [b for b in getattr(args, flag, ()) if not 0 < b <= 1]
        if bad:
            raise ToolkitError(f"bench {args.bench}: --budgets must be in (0, 1], got {', '.join(map(str, bad))}",
                               hint="shares of the eligible weights kept, e.g. --budgets 0.9,0.7,0.5")
    if args.bench == "attention":
        for flag in ("point_seconds", "max_point_seconds"):
            if not getattr(args, flag) > 0:
                raise ToolkitError(f"bench attention: --{flag.replace('_', '-')} must be > 0",
                                   hint="a time budget in seconds, e.g. 30")
    if args.json and args.json != "-":
        from toolkit.workspace import check_report_paths

        check_report_paths({"--json": args.json}, inputs=(getattr(args, "model", None), getattr(args, "converted", None)))


def run(args: argparse.Namespace) -> int:
    import json

    from toolkit.bench import topk
    from toolkit.parity import write_atomic

    _check(args)

    def show(i, n, row):
        print(f"[{i}/{n}] V={row['vocab']} B={row['batch']} k={row['k']} t={row['threads']}: "
              f"fused {row['fused']['median_us']:.1f} us, ORT softmax+topk {row['ort_softmax_topk']['median_us']:.1f} "
              f"us ({row['speedup_vs_ort_softmax_topk']:.2f}x), ORT topk {row['ort_topk']['median_us']:.1f} us, "
              f"floor {row['floor_us']:.1f} us ({row['fused_over_floor']:.2f}x floor)", flush=True)

    if args.bench == "lowrank":
        from toolkit.bench import lowrank

        def show_lowrank(i, n, row):
            print(f"[{i}/{n}] {row['K']}x{row['N']} r={row['r']} M={row['M']} t={row['threads']}: ours "
                  f"{row['ours']['median_us']:.0f} us, ORT dense {row['ort_dense']['median_us']:.0f} us "
                  f"({row['speedup_vs_ort_dense']:.2f}x), ORT MatMul->MatMul "
                  f"{row['ort_two_matmul']['median_us']:.0f} us ({row['speedup_vs_ort_two_matmul']:.2f}x)"
                  + (f"; int8: ours {row['ours_int8']['median_us']:.0f} us, ORT DQ->MatMul "
                     f"{row['ort_int8_two_matmul']['median_us']:.0f} us "
                     f"({row['int8_speedup_vs_ort_int8_two_matmul']:.2f}x), vs dense "
                     f"{row['int8_speedup_vs_ort_dense']:.2f}x" if "ours_int8" in row else ""), flush=True)

        result = lowrank.run(args.shapes, args.ranks, args.rows, args.threads, args.warmup, args.runs,
                             args.warmup_big, args.runs_big, int8=args.int8,
                             progress=None if args.json == "-" else show_lowrank)
    elif args.bench == "lowrank-fidelity":
        from toolkit.bench import lowrank_fidelity

        result = lowrank_fidelity.run(args.model, args.budgets,
                                      progress=None if args.json == "-" else lambda line: print(line, flush=True))
    elif args.bench == "minilm":
        from toolkit.bench import lowrank_minilm

        result = lowrank_minilm.run(args.budgets, threads=args.threads,
                                    progress=None if args.json == "-" else lambda line: print(line, flush=True))
    elif args.bench == "attention":
        from toolkit.bench import attention

        say = None if args.json == "-" else lambda line: print(line, flush=True)
        if args.model or args.converted:
            if not (args.model and args.converted):
                from toolkit.errors import ToolkitError

                raise ToolkitError("bench attention: --model and --converted go together",
                                   hint="pass the unconverted model.onnx as --model and the converted one as "
                                   "--converted")
            result = attention.run_end_to_end(args.model, args.converted, context=args.context[0],
                                              steps=args.steps, threads=args.threads[0], progress=say)
            if say:
                say(f"decode at context {result['context']}: {result['tokens_per_s']['original']:.1f} tokens/s "
                    f"(original) vs {result['tokens_per_s']['converted']:.1f} (converted): "
                    f"{result['speedup']:.2f}x")
        else:
            result = attention.run(args.context, args.batch, args.threads, args.schemes, args.warmup, args.runs,
                                   gqa_quant=args.gqa_quant, point_seconds=args.point_seconds,
                                   max_point_seconds=args.max_point_seconds, progress=say, growing=args.growing)
    elif args.bench == "head":
        from toolkit.bench import decode_head

        result = decode_head.run(args.model, args.prompts, new_tokens=args.new_tokens, k=args.k,
                                 threads=args.threads)
        if args.json != "-":
            print(f"greedy agreement {100 * result['greedy_token_agreement']:.2f}%, decode step "
                  f"{result['decode_step_ms_median']['logits']:.3f} ms (logits) vs "
                  f"{result['decode_step_ms_median']['head']:.3f} ms (head): "
                  f"{result['speedup_head_vs_logits']:.3f}x")
    else:
        result = topk.run(args.vocab, args.batch, args.k, args.threads, args.warmup, args.runs, args.cold,
                          data=args.data, progress=None if args.json == "-" else show)
    text = json.dumps(result, indent=2)
    if args.json == "-":
        print(text)
    elif args.json:
        write_atomic(args.json, text)
    return 0
