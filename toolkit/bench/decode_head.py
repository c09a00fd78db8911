"""``toolkit bench head``: a decode step with the sampling head vs full logits.

Converts the source once, builds two ONNX models from the same export — plain
(``logits [B, S, V]`` out, argmax in the host) and with the ``sampling-head`` pass
(``keep_logits=false``: only ``next_token_ids/probs [B, k]`` leave the session) —
and greedy-decodes the same prompts with both, alternating prompt by prompt.
Reports token agreement and the median decode-step time of each.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bench import host_info


def run(model: str = "llama-stdlib", prompts: int = 16, prompt_len: int = 32, new_tokens: int = 64, k: int = 50,
        threads: int = 1, seed: int = 0) -> dict[str, Any]:
    import onnx

    from passes import run_pipeline
    from toolkit import export, sources
    from toolkit.errors import ToolkitError
    from toolkit.generate import greedy, model_context_length
    from toolkit.parity import make_session

    src = sources.resolve(model)
    rng = np.random.default_rng(seed)
    if src.tokenizer is not None and src.heldout_text:
        text_ids = np.array(src.tokenizer.encode(src.heldout_text).ids)
        starts = rng.integers(0, len(text_ids) - prompt_len, prompts)
        prompt_ids = [text_ids[s:s + prompt_len].tolist() for s in starts]
    else:
        prompt_ids = [rng.integers(0, src.vocab_size, prompt_len).tolist() for _ in range(prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        plain_path = Path(tmp) / "plain.onnx"
        plain = export.export(src, plain_path)
        head, _ = run_pipeline(onnx.load(str(plain_path)), ["sampling-head"],
                               {"sampling-head": {"k": k, "keep_logits": False}})
        head_path = Path(tmp) / "head.onnx"
        export.save_model(head, head_path)
        del plain
        sessions = {"logits": make_session(plain_path, threads=threads),
                    "head": make_session(head_path, threads=threads)}
        context = model_context_length(sessions["logits"])
        if context is not None and prompt_len + new_tokens - 1 > context:
            raise ToolkitError(
                f"{prompt_len}-token prompts and --new-tokens {new_tokens} need {prompt_len + new_tokens - 1} "
                f"positions; {model} was built for {context}",
                hint=f"pass --new-tokens {max(context - prompt_len + 1, 1)} or fewer")
        greedy(sessions["logits"], prompt_ids[0], 4)  # warm-up both
        greedy(sessions["head"], prompt_ids[0], 4)
        steps: dict[str, list[float]] = {"logits": [], "head": []}
        agree = total = 0
        for i, p in enumerate(prompt_ids):
            out = {}
            for name in ("logits", "head") if i % 2 == 0 else ("head", "logits"):  # first one alternates
                r = greedy(sessions[name], p, new_tokens)
                out[name] = r.token_ids
                steps[name] += r.step_ms
            agree += sum(a == b for a, b in zip(out["logits"], out["head"]))
            total += new_tokens
    med = {n: float(np.median(v)) for n, v in steps.items()}
    return {
        "benchmark": "decode_head",
        "host": host_info(),
        "model": src.spec, "vocab": src.vocab_size, "prompts": prompts, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "k": k, "threads": threads,
        "greedy_token_agreement": agree / total,
        "decode_step_ms_median": med,
        "decode_step_ms_p90": {n: float(np.percentile(v, 90)) for n, v in steps.items()},
        "speedup_head_vs_logits": med["logits"] / med["head"],
        "protocol": "same export, both models greedy-decode each prompt, order alternating per prompt; "
                    "step time = one session.run plus host-side token choice, batch 1",
    }
