"""Generate with ONNX Runtime from a converted model directory.

Greedy by default; --do-sample with --temperature/--top-k/--top-p/--min-p samples
from the sampling head's candidates (or the logits); a head converted with --sample
draws in the graph (seeded: --seed). The cache stays in ONNX Runtime values between
steps (IOBinding). Streams the text, then reports prefill time, decode tokens/s,
KV-cache bytes and peak memory.
"""

from __future__ import annotations

import argparse
import warnings

from toolkit.errors import ParityFailedWarning


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR_OR_ONNX", help="a `toolkit convert` output directory or a .onnx file")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt text, '-' to read it from stdin (needs tokenizer.json beside the model; "
                        "default 'def '); repeat it to generate for several prompts in one batch")
    parser.add_argument("--prompt-ids", action="append", default=None,
                        help="comma-separated token ids instead of --prompt; repeat it for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="base seed of the draws (call i feeds toolkit.ops.reference.call_seed(seed, i))")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="candidates kept (0: all the head returns)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--eos-id", type=int, default=None,
                        help="stop after this token (default: the end-of-sequence ids the source's config names, "
                        "recorded at export; -1: never stop early)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (no streaming)")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from toolkit.commands._common import check_threads
    from toolkit.errors import ToolkitError
    from toolkit.generate import Sampling, TokenChooser, generate_batch, head_options, load_bundle
    from toolkit.parity import decoder_facts, load_onnx, make_session

    if args.prompt is not None and args.prompt_ids is not None:
        raise ToolkitError("--prompt and --prompt-ids both given", hint="pass one of them")
    check_threads(args.threads)
    texts = ["def "] if args.prompt is None else args.prompt
    if texts.count("-") > 1:
        raise ToolkitError("--prompt - given more than once", hint="stdin holds one prompt: pass '-' once")
    texts = [sys.stdin.read() if t == "-" else t for t in texts]
    onnx_path, tokenizer = load_bundle(args.model)
    if args.prompt_ids is not None:
        prompts = [_parse_ids(text) for text in args.prompt_ids]
    elif tokenizer is not None:
        prompts = [tokenizer.encode(t).ids for t in texts]
    else:
        raise ToolkitError(f"no tokenizer.json beside {str(onnx_path)!r}",
                           hint="pass --prompt-ids 1,2,3 or convert a model that ships a tokenizer")
    from pathlib import Path

    from toolkit import bundle

    model = None  # the checked graph (without weights), loaded once: the session and decoder_facts read it
    if (Path(args.model) / bundle.MANIFEST).is_file():  # a convert bundle: its own checked library
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ParityFailedWarning)
            session = bundle.load(args.model, threads=args.threads)
        for w in caught:  # a failed parity: one plain line on stderr; others as they were
            if issubclass(w.category, ParityFailedWarning):
                print(f"warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    else:
        model = load_onnx(onnx_path)
        session = make_session(onnx_path, model, threads=args.threads)
    sampling = Sampling(args.do_sample, args.temperature, args.top_k, args.top_p, args.min_p)
    if not args.do_sample and sampling != Sampling(False):
        raise ToolkitError("--temperature/--top-k/--top-p/--min-p only apply with --do-sample",
                           hint="add --do-sample, or drop them for greedy decoding")
    TokenChooser(head_options(session), sampling)  # refuse bad options before anything is printed
    meta = session.get_modelmeta().custom_metadata_map  # the model's metadata_props, as loaded
    recorded_eos = json.loads(meta.get("toolkit.eos_token_ids") or "[]")
    eos = (recorded_eos or None) if args.eos_id is None else None if args.eos_id == -1 else args.eos_id
    streamed: list[int] = []
    shown = ""

    def stream(row: int, token: int) -> None:  # one prompt: print each token as it comes
        nonlocal shown
        if not streamed:  # the prompt, once the model has produced something (an error stays on its own line)
            print(texts[0] if args.prompt_ids is None else "", end="", flush=True)
        streamed.append(token)
        text = tokenizer.decode(streamed) if tokenizer is not None else " ".join(map(str, streamed))
        if text.startswith(shown):  # else a merge rewrote the tail: wait until the text extends again
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    single = len(prompts) == 1
    try:
        result = generate_batch(session, prompts, args.max_new_tokens, sampling, eos_id=eos, seed=args.seed,
                                on_token=stream if single and not args.json else None,
                                facts=decoder_facts(model if model is not None else load_onnx(onnx_path)))
    except KeyboardInterrupt as exc:
        if streamed:  # end the streamed line, so the interrupt message starts its own
            print(flush=True)
        exc.partial_output = bool(streamed)  # (main says so instead of "no output was written")
        raise
    rows = [{"prompt_ids": prompt, "token_ids": tokens,
             "text": tokenizer.decode(tokens) if tokenizer is not None else None}
            for prompt, tokens in zip(prompts, result.token_ids)]
    stats = {"batch": len(rows), **result.stats()}
    if args.json:
        # one prompt also gets its row's fields at the top level, so a reader can use either
        print(json.dumps({**(rows[0] if single else {}), "rows": rows, **stats}, indent=2))
        return 0
    if not single:  # several prompts: each completion printed when the run ends
        for b, row in enumerate(rows):
            shown_text = (texts[b] + row["text"]) if args.prompt_ids is None and row["text"] is not None \
                else " ".join(map(str, row["token_ids"]))
            print(f"--- prompt {b + 1} of {len(rows)} ({len(row['token_ids'])} tokens)")
            print(shown_text)
    decode = (f"decode {result.median_step_ms:.2f} ms/step median, {result.tokens_per_second:.0f} tokens/s"
              + ("" if single else f" over {len(rows)} rows") if result.step_ms else "no decode step")
    size = f"{len(rows[0]['token_ids'])} tokens" if single else f"batch {len(rows)}"
    lead = "\n" if single else ""  # ends the streamed line
    print(f"{lead}[{size}, prefill {result.prefill_ms:.1f} ms, {decode}, "
          f"KV cache {result.kv_cache_bytes / 1024:.1f} KiB, peak RSS {result.peak_rss_mb:.0f} MiB]")
    return 0


def _parse_ids(text: str) -> list[int]:
    from toolkit.errors import ToolkitError

    try:
        return [int(t) for t in text.split(",")] if text.strip() else []  # "1,,2" is not [1, 2]
    except ValueError:
        raise ToolkitError(f"--prompt-ids {text!r} is not a comma-separated list of integers",
                           hint="e.g. --prompt-ids 1,2,3") from None
