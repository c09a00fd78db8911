"""Generate with ONNX Runtime from a converted model directory.

Greedy, or sampled when the model has a sampling head converted with
sample=true (seeded: --seed); reports the prefill time and the median decode-step time.
"""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR_OR_ONNX", help="a `toolkit convert` output directory or a .onnx file")
    parser.add_argument("--prompt", default="def ", help="prompt text (needs tokenizer.json beside the model)")
    parser.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="base seed of a sampling head (sample=true)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from toolkit.errors import ToolkitError
    from toolkit.generate import greedy, load_bundle
    from toolkit.parity import make_session

    onnx_path, tokenizer = load_bundle(args.model)
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    elif tokenizer is not None:
        prompt = tokenizer.encode(args.prompt).ids
    else:
        raise ToolkitError(f"no tokenizer.json beside {str(onnx_path)!r}",
                           hint="pass --prompt-ids 1,2,3 or convert a model that ships a tokenizer")
    from pathlib import Path

    from toolkit import bundle

    if (Path(args.model) / bundle.MANIFEST).is_file():  # a convert bundle: its own checked library
        session = bundle.load(args.model, threads=args.threads)
    else:
        session = make_session(onnx_path, threads=args.threads)
    result = greedy(session, prompt, args.max_new_tokens, seed=args.seed)
    text = tokenizer.decode(result.token_ids) if tokenizer is not None else None
    if args.json:
        print(json.dumps({"prompt_ids": prompt, "token_ids": result.token_ids, "text": text,
                          "prefill_ms": result.prefill_ms, "median_step_ms": result.median_step_ms,
                          "tokens_per_second": result.tokens_per_second}, indent=2))
    else:
        print((args.prompt if not args.prompt_ids else "") + (text if text is not None else str(result.token_ids)))
        print(f"\n[{len(result.token_ids)} tokens, prefill {result.prefill_ms:.1f} ms, "
              f"decode {result.median_step_ms:.2f} ms/step median, {result.tokens_per_second:.0f} tokens/s]")
    return 0
