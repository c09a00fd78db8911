"""Benchmark the custom operators against ONNX Runtime's own ops (JSON output).

`toolkit bench topk`: FusedSoftmaxTopK vs ORT Softmax->TopK, TopK and a
single-read floor, interleaved in one process. `toolkit bench head`: greedy decode
with the sampling head vs full logits on the same prompts.
"""

from __future__ import annotations

import argparse


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


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
    p.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")
    h = sub.add_parser("head", help="decode step with the sampling head vs full logits (greedy, same prompts)")
    h.add_argument("--model", default="llama-stdlib")
    h.add_argument("--prompts", type=int, default=16)
    h.add_argument("--new-tokens", type=int, default=64)
    h.add_argument("--k", type=int, default=50)
    h.add_argument("--threads", type=int, default=1)
    h.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")


def run(args: argparse.Namespace) -> int:
    import json

    from toolkit.bench import topk
    from toolkit.parity import write_atomic

    def show(i, n, row):
        print(f"[{i}/{n}] V={row['vocab']} B={row['batch']} k={row['k']} t={row['threads']}: "
              f"fused {row['fused']['median_us']:.1f} us, ORT softmax+topk {row['ort_softmax_topk']['median_us']:.1f} "
              f"us ({row['speedup_vs_ort_softmax_topk']:.2f}x), ORT topk {row['ort_topk']['median_us']:.1f} us, "
              f"floor {row['floor_us']:.1f} us ({row['fused_over_floor']:.2f}x floor)", flush=True)

    if args.bench == "head":
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
                          progress=None if args.json == "-" else show)
    text = json.dumps(result, indent=2)
    if args.json == "-":
        print(text)
    elif args.json:
        write_atomic(args.json, text)
    return 0
