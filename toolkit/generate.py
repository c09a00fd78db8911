"""Decoding with ONNX Runtime over the exported flat KV-cache I/O.

The loop (:func:`generate`) drives the session through **IOBinding**:

* each step's ``present.*`` outputs stay ONNX Runtime values (``OrtValue``, on the
  session's device: CUDA memory under the CUDA provider) and are bound as the next
  step's ``past_key_values.*`` inputs: the cache never makes a round trip through
  NumPy or the host. The exported models grow the cache with ``Concat``, so each
  step's present is a fresh tensor. A model converted with a fixed-capacity
  quantized cache (``toolkit convert --kv-cache S --kv-capacity N``) is driven like
  ONNX Runtime GroupQueryAttention's shared past/present: each ``present.*`` output
  is bound to its ``past_key_values.*`` input's buffer and the QuantKVAttention ops
  append the new tokens in place; ``present.lengths`` (quantized and residual token
  counts) is fed back as ``past_key_values.lengths``.
* only what the host needs is copied out per step: the sampling head's candidates
  (``next_token_ids/probs [B, k]``) or drawn token, else the last position's
  logits.

Token choice:

* a ``SampleTopKTopP`` head (``--sampling-head K --sample``) draws in the graph with
  the options fixed at conversion; the loop passes ``call_seed(seed, call index)``
  (``toolkit.ops.reference``: the base seed hashed, plus the call) as
  ``sampling_seed``, so a run is reproducible and runs with nearby seeds are unrelated;
* a ``FusedSoftmaxTopK`` head (``--sampling-head K``) returns the top-k candidates
  and their probabilities under the conversion temperature T0. Greedy takes the
  first; sampling re-weights them to the requested temperature T (``p^(T0/T)`` is
  proportional to ``softmax(x/T)`` on the same candidates, which stay the top k at
  any T), keeps ``top_k <= K`` of them, and applies the op's own rule (min-p, then
  top-p on the renormalised mass, then a draw with the counter-based uniform of
  ``toolkit.ops.reference``): the same token SampleTopKTopP would draw;
* a model without a head: the same rule on the last logits in NumPy.

Reported: prefill time, per-step times, tokens/s, the KV cache's bytes at the end
and the process's peak resident memory.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.ops import kv_quant
from toolkit.ops.reference import call_seed


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the host picks a token (greedy when ``do_sample`` is false)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: every candidate the head returns (the whole vocabulary without a head)
    top_p: float = 1.0
    min_p: float = 0.0

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ToolkitError(f"--temperature must be > 0, got {self.temperature}", hint="e.g. --temperature 0.8")
        if self.top_k < 0:
            raise ToolkitError(f"--top-k must be >= 0, got {self.top_k}", hint="0 keeps every candidate")
        if not 0 < self.top_p <= 1:
            raise ToolkitError(f"--top-p must be in (0, 1], got {self.top_p}", hint="e.g. --top-p 0.9")
        if not 0 <= self.min_p < 1:
            raise ToolkitError(f"--min-p must be in [0, 1), got {self.min_p}", hint="e.g. --min-p 0.05")


GREEDY = Sampling()


@dataclasses.dataclass(kw_only=True)
class _Timings:
    prefill_ms: float
    step_ms: list[float]
    kv_cache_bytes: int = 0
    peak_rss_mb: float = 0.0

    @property
    def median_step_ms(self) -> float:
        return float(np.median(self.step_ms)) if self.step_ms else float("nan")

    def _decoded_tokens(self) -> int:
        raise NotImplementedError

    @property
    def tokens_per_second(self) -> float:
        """Tokens made by decode steps over the decode steps' total time (the prefill's
        token and time excluded), for one prompt or a batch alike."""
        if not self.step_ms:
            return float("nan")
        return 1000.0 * self._decoded_tokens() / sum(self.step_ms)

    def stats(self) -> dict[str, Any]:
        """The timings as `toolkit generate --json` reports them (None where no decode step ran)."""
        decoded = bool(self.step_ms)  # one new token is the prefill alone: no decode step to time
        return {"prefill_ms": self.prefill_ms, "median_step_ms": self.median_step_ms if decoded else None,
                "tokens_per_second": self.tokens_per_second if decoded else None,
                "kv_cache_bytes": self.kv_cache_bytes, "peak_rss_mb": self.peak_rss_mb}


@dataclasses.dataclass(kw_only=True)
class GenerationResult(_Timings):
    token_ids: list[int]

    def _decoded_tokens(self) -> int:
        return len(self.step_ms)  # one token per step


def next_token(outs: dict[str, np.ndarray]) -> int:
    """The greedy token of a step's outputs (batch row 0): the head's choice or the logits argmax."""
    if "next_token" in outs:
        return int(outs["next_token"][0])
    if "next_token_ids" in outs:
        return int(outs["next_token_ids"][0, 0])
    return int(outs["logits"][0, -1].argmax())


class TokenChooser:
    """Picks each step's token from the outputs the head (or the logits) gives."""

    def __init__(self, head: dict[str, Any] | None, sampling: Sampling) -> None:
        sampling.validate()
        self.head = head or {}
        self.sampling = sampling
        if self.head.get("sample") and sampling != GREEDY:
            raise ToolkitError(
                "this model's sampling head draws in the graph with the options fixed at conversion "
                f"(k={self.head['k']}, temperature={self.head['temperature']}, top_p={self.head['top_p']}, "
                f"min_p={self.head['min_p']}); --do-sample/--temperature/--top-k/--top-p/--min-p cannot change them",
                hint="drop those flags (use --seed), or convert with `--sampling-head K` (no --sample) to choose "
                "them at generation time",
            )
        if self.head and not self.head.get("sample") and sampling.top_k > self.head["k"]:
            raise ToolkitError(
                f"--top-k {sampling.top_k} is more than the {self.head['k']} candidates the model's head returns",
                hint=f"use --top-k <= {self.head['k']}, or convert with a larger --sampling-head",
            )

    @property
    def wanted_outputs(self) -> tuple[str, ...]:
        if self.head.get("sample"):
            return ("next_token", "next_token_prob")
        if self.head:
            return ("next_token_ids", "next_token_probs")
        return ("logits",)

    def choose(self, outs: dict[str, np.ndarray], seed: int, row: int = 0) -> int:
        """The token of batch row ``row`` (a host draw uses ``uniform(seed, row)``, as
        the in-graph sampler does for its row ``row``)."""
        if "next_token" in outs:
            return int(outs["next_token"][row])
        if not self.sampling.do_sample:
            if "next_token_ids" in outs:
                return int(outs["next_token_ids"][row, 0])
            return int(outs["logits"][row, -1].argmax())
        from toolkit.ops.reference import sample_position, softmax_topk, uniform

        s = self.sampling
        if "next_token_ids" in outs:
            ids = outs["next_token_ids"][row]
            # probabilities under T0 -> weights under T (unnormalised: the rule only uses ratios)
            weights = outs["next_token_probs"][row].astype(np.float64) ** (self.head.get("temperature", 1.0)
                                                                           / s.temperature)
        else:
            logits = outs["logits"][row, -1:].astype(np.float32)
            k = s.top_k or logits.shape[-1]
            probs, idx, _ = softmax_topk(logits, k, s.temperature)
            ids, weights = idx[0], probs[0].astype(np.float64)
        if s.top_k:
            ids, weights = ids[: s.top_k], weights[: s.top_k]
        j = sample_position(weights, float(np.float32(s.top_p)), float(np.float32(s.min_p)), uniform(seed, row))
        return int(ids[j])


def _numpy_dtype(ort_type: str) -> Any:
    from toolkit.model_info import ORT_TYPE_TO_NUMPY

    return ORT_TYPE_TO_NUMPY[ort_type]


class BoundDecoder:
    """One decoder session driven through IOBinding; the cache stays in ORT values."""

    def __init__(self, session: Any, wanted: tuple[str, ...], cache_dims: dict[str, dict[int, int]] | None = None
                 ) -> None:
        self.session = session
        self.cache_dims = cache_dims or {}  # symbolic cache sizes the graph fixes (toolkit.parity.decoder_facts)
        self.inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        missing = [n for n in ("input_ids", "attention_mask") if n not in self.inputs] + \
            [n for n in (*wanted, *self.present_names) if n not in outputs]
        if missing:
            raise ToolkitError(
                f"the model lacks {', '.join(missing)} (inputs: {', '.join(self.inputs)}; outputs: "
                f"{', '.join(sorted(outputs))})",
                hint="generate drives decoders exported by `toolkit export`/`convert` (flat KV-cache I/O)",
            )
        self.wanted = wanted
        self.head = head_options(session) is not None
        self.device = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
        # A fixed-capacity quantized cache (kv-cache pass, --kv-capacity): each present
        # output is bound to its past input's buffer, so a step writes only the new tokens.
        self.in_place = kv_quant.MODEL_LENGTHS_INPUT in self.inputs
        self.calls = 0

    def capacity(self) -> int | None:
        """Tokens a fixed-capacity cache holds, or None (it grows).

        C quantized slots filled R tokens at a time (R - 1 residual slots, R = 0 for
        none) plus the residual: floor(C / R) * R + R - 1.
        """
        return fixed_capacity(self.inputs) if self.in_place else None

    def empty_past(self, batch: int) -> dict[str, Any]:
        import onnxruntime as ort

        from toolkit.parity import empty_cache_shape

        past = {}
        for name in self.past_names:
            meta = self.inputs[name]
            dims = empty_cache_shape(name, meta.shape, batch, self.cache_dims.get(name))
            past[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(dims, _numpy_dtype(meta.type)), self.device)
        return past

    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: dict[str, Any],
             seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One forward call; returns (the wanted outputs as arrays, the next past as ORT values)."""
        if self.head:
            check_input_ids(ids)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if "position_ids" in self.inputs:
            binding.bind_cpu_input("position_ids", pos)
        if "sampling_seed" in self.inputs:
            binding.bind_cpu_input("sampling_seed", np.array([seed], np.int64))
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.wanted:
            binding.bind_output(name, "cpu")
        for past_name, name in zip(self.past_names, self.present_names):
            if self.in_place and past_name != kv_quant.MODEL_LENGTHS_INPUT:
                binding.bind_ortvalue_output(name, past[past_name])  # the op appends in place
            else:
                binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        n = len(self.wanted)
        outs = {name: values[i].numpy() for i, name in enumerate(self.wanted)}
        new_past = dict(zip(self.past_names, values[n:]))
        if self.in_place:  # the same buffers again (the values above are views that do not own them)
            new_past.update({k: v for k, v in past.items() if k != kv_quant.MODEL_LENGTHS_INPUT})
        self.calls += 1
        return outs, new_past


def _bytes(value: Any) -> int:
    from toolkit.model_info import ORT_TYPE_TO_NUMPY

    return int(np.prod(value.shape())) * np.dtype(ORT_TYPE_TO_NUMPY[value.data_type()]).itemsize


def head_options(session: Any) -> dict[str, Any] | None:
    """The ``sampling-head`` options recorded in the model's metadata, or None."""
    meta = session.get_modelmeta().custom_metadata_map
    head = meta.get("toolkit.sampling_head")
    return json.loads(head) if head else None


def check_input_ids(input_ids: Any) -> None:
    """Refuse, before ONNX Runtime runs, an ``input_ids`` with no token for a model with a
    sampling head: the head reads each row's last position, and ORT stopped with
    "Non-zero status code returned while running Gather node 'sampling_head/Gather_last'
    ... indices element out of data bounds" (an audit: a server feeding an empty prompt
    to ``toolkit.load(DIR).run``). ``input_ids`` is an array or an ORT value."""
    shape = input_ids.shape() if callable(getattr(input_ids, "shape", None)) else np.shape(input_ids)
    if len(shape) == 2 and shape[1] == 0:
        raise ToolkitError(
            f"input_ids has shape {list(shape)}: no token to choose the next one after (the model's sampling "
            "head reads each row's last position)",
            hint="feed at least one token per row: the prompt at prefill (left-padded, attention_mask 0 on the "
            "padding), the last chosen token at each decode step")


def check_right_padding(attention_mask: Any) -> None:
    """Refuse, before ONNX Runtime runs, an ``attention_mask`` with padding before a kept
    position in some row, for a model whose GroupQueryAttention takes rows right-padded
    (onnxruntime-genai's builder): it reads such a row wrong without an error (an audit:
    a left-padded row's tokens changed). ``attention_mask`` is an array (an ORT value is
    not checked)."""
    if callable(getattr(attention_mask, "shape", None)):
        return
    mask = np.asarray(attention_mask)
    if mask.ndim != 2 or mask.shape[1] < 2:
        return
    kept = mask != 0
    bad = np.flatnonzero((~kept[:, :-1] & kept[:, 1:]).any(axis=1))
    if bad.size:
        raise ToolkitError(
            f"attention_mask row {int(bad[0])} has padding before a kept position; the model's "
            "GroupQueryAttention takes each row right-padded (padding after the tokens) and reads such a row wrong",
            hint="pad on the right, or convert the model with `toolkit convert --kv-cache ...`, whose attention "
            "takes left padding as Hugging Face models do")


def model_context_length(session: Any) -> int | None:
    """The positions the model was built for (``toolkit.context_length``, recorded at
    export from the source's config), or None when the model does not say."""
    value = session.get_modelmeta().custom_metadata_map.get("toolkit.context_length")
    try:
        return int(value) if value else None
    except ValueError:
        return None


def fixed_capacity(inputs: dict[str, Any]) -> int | None:
    """Tokens a fixed-capacity quantized cache holds (session inputs by name), or None.

    C quantized slots filled R tokens at a time (R - 1 residual slots, R = 0 for
    none) plus the residual: floor(C / R) * R + R - 1. None for a growing cache.
    """
    from toolkit.ops import kv_quant

    if kv_quant.MODEL_LENGTHS_INPUT not in inputs:
        return None
    dims = [inputs.get(f"past_key_values.0.{n}") for n in ("key_q", "key_res")]
    if any(d is None or not isinstance(d.shape[2], int) for d in dims):
        return None
    slots, res_slots = dims[0].shape[2], dims[1].shape[2]
    window = res_slots + 1 if res_slots else 1
    return slots // window * window + res_slots


def vocab_size(session: Any) -> int | None:
    """The vocabulary size V of a decoder session: the static last dimension of its
    ``logits`` output (every exported model has one; None when it is symbolic)."""
    for out in session.get_outputs():
        if out.name == "logits" and isinstance(out.shape[-1], int):
            return int(out.shape[-1])
    return None


@dataclasses.dataclass(kw_only=True)
class BatchResult(_Timings):
    """Tokens of each prompt of a batch, and the run's timings (a step decodes every row)."""

    token_ids: list[list[int]]

    def _decoded_tokens(self) -> int:
        return sum(len(t) - 1 for t in self.token_ids)  # a step makes one token per row still generating


def generate(session: Any, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = GREEDY,
             eos_id: int | list[int] | None = None, seed: int = 0,
             on_token: Callable[[int], None] | None = None, context_length: int | None = None,
             facts: Any = None) -> GenerationResult:
    """Decode up to ``max_new_tokens`` tokens after ``prompt_ids`` (batch 1).

    ``eos_id``: stop after this token (or any of these). ``seed`` is the base of the
    per-call seeds (call ``i`` uses ``call_seed(seed, i)``): the sampled head's input, or the
    host's draw. ``on_token`` is called with each token as soon as it is chosen
    (streaming). ``context_length``: positions the model was built for (default: the
    model's ``toolkit.context_length`` metadata); a longer run is refused up front
    (learned position tables fail past it with an ORT gather error after some tokens
    were printed, and RoPE models silently leave the positions they were trained on).
    ``facts``: :func:`toolkit.parity.decoder_facts` of the model, what the session does
    not tell (onnxruntime-genai's GroupQueryAttention models: the cache's head dim,
    right-padded rows, the positions their rotary caches hold).
    """
    stream = None if on_token is None else (lambda row, token: on_token(token))
    r = generate_batch(session, [prompt_ids], max_new_tokens, sampling, eos_id=eos_id, seed=seed,
                       on_token=stream, context_length=context_length, facts=facts)
    return GenerationResult(token_ids=r.token_ids[0], prefill_ms=r.prefill_ms, step_ms=r.step_ms,
                            kv_cache_bytes=r.kv_cache_bytes, peak_rss_mb=r.peak_rss_mb)


def generate_batch(session: Any, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = GREEDY,
                   eos_id: int | list[int] | None = None, seed: int = 0,
                   on_token: Callable[[int, int], None] | None = None,
                   context_length: int | None = None, facts: Any = None) -> BatchResult:
    """Decode up to ``max_new_tokens`` tokens after each prompt, all prompts in one batch.

    Prompts of different lengths are left-padded (masked, positions counted from each
    row's first token), so row ``b`` gets the tokens it would get alone up to float
    rounding of the batched kernels — for caches without a residual window (float,
    int8). With a residual window (int4 / KIVI), a row's padding takes window slots, so
    its flushes and KIVI key groups fall elsewhere than alone and its quantized values
    differ (an audit, a 7-token row beside a 70-token one, teacher-forced on random
    hf:llama: max logit difference vs alone 7.8e-3 for kivi4 R = 32, 3.3e-2 for kivi2;
    agreement with the float model moved by at most 0.8 points). A row stops at an
    ``eos_id`` token; the run ends when every row has stopped. Draws: row ``b`` of call
    ``i`` uses ``uniform(call_seed(seed, i), b)``, in the graph or on the host.
    ``on_token(row, token)`` is called as each token is chosen. ``context_length``: as
    in :func:`generate` (default: the model's own).
    """
    eos_ids = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    if not prompts:
        raise ToolkitError("no prompt given", hint="pass at least one prompt")
    for b, prompt_ids in enumerate(prompts):
        if not prompt_ids:
            which = "the prompt is empty" if len(prompts) == 1 else f"prompt {b + 1} of {len(prompts)} is empty"
            raise ToolkitError(which, hint="give at least one token (--prompt text or --prompt-ids 1,2,3)")
    if max_new_tokens < 1:
        raise ToolkitError(f"max_new_tokens must be at least 1, got {max_new_tokens}",
                           hint="pass --max-new-tokens N with N >= 1")
    vocab = vocab_size(session)

    def outside(t: int) -> bool:
        return t < 0 or (vocab is not None and t >= vocab)

    span = f"[0, {vocab if vocab is not None else 'V'})"
    bad = [t for prompt_ids in prompts for t in prompt_ids if outside(t)]
    if bad:
        raise ToolkitError(
            f"prompt token ids {bad[:8]} are outside the model's vocabulary {span}",
            hint="use ids the model's tokenizer produces (or --prompt with a tokenizer.json beside the model)")
    bad_eos = sorted(e for e in eos_ids if outside(e))
    if bad_eos:
        raise ToolkitError(f"eos id {', '.join(map(str, bad_eos))} is outside the model's vocabulary {span}",
                           hint="pass the tokenizer's end-of-sequence id, or leave --eos-id out")
    longest = max(len(p) for p in prompts)
    if context_length is None:
        context_length = model_context_length(session) or (facts.context_length if facts is not None else None)
    if facts is not None and facts.right_padded and len({len(p) for p in prompts}) > 1:
        raise ToolkitError(
            "the model's GroupQueryAttention takes each row of a batch as right-padded, and generate left-pads "
            f"prompts of different lengths ({sorted({len(p) for p in prompts})} tokens): the shorter rows would be "
            "read wrong", hint="run the prompts one at a time or at one length, or convert the model with "
            "`toolkit convert --kv-cache ...` (its attention takes the padding generate writes)")
    if context_length is not None and longest + max_new_tokens - 1 > context_length:
        raise ToolkitError(
            f"a {longest}-token prompt and {max_new_tokens} new tokens need "
            f"{longest + max_new_tokens - 1} positions; the model was built for {context_length}",
            hint=f"shorten the prompt or pass --max-new-tokens {context_length - longest + 1} or fewer"
            if longest <= context_length else f"shorten the prompt to at most {context_length} tokens")
    chooser = TokenChooser(head_options(session), sampling)
    dec = BoundDecoder(session, chooser.wanted_outputs, facts.cache_dims if facts is not None else None)
    capacity = dec.capacity()
    needed = longest + max_new_tokens - 1  # the last token is never fed back; padding takes cache slots too
    if capacity is not None and needed > capacity:
        raise ToolkitError(
            f"the model's fixed-capacity KV cache holds {capacity} tokens; a {longest}-token prompt "
            f"and {max_new_tokens} new tokens need {needed}",
            hint="shorten the prompt or --max-new-tokens, or reconvert with a larger --kv-capacity")
    batch = len(prompts)
    ids = np.zeros((batch, longest), dtype=np.int64)
    mask = np.zeros((batch, longest), dtype=np.int64)
    for b, prompt_ids in enumerate(prompts):  # left padding: every row's last token is the last column
        ids[b, longest - len(prompt_ids):] = prompt_ids
        mask[b, longest - len(prompt_ids):] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    past = dec.empty_past(batch)
    out_ids: list[list[int]] = [[] for _ in prompts]
    done = [False] * batch
    steps: list[float] = []
    prefill_ms = 0.0
    for step in range(max_new_tokens):
        start = time.perf_counter()
        seed_i = call_seed(seed, dec.calls)
        outs, past = dec.step(ids, mask, pos, past, seed_i)
        chosen = [chooser.choose(outs, seed_i, b) for b in range(batch)]
        elapsed = (time.perf_counter() - start) * 1e3
        if step == 0:
            prefill_ms = elapsed
        else:
            steps.append(elapsed)
        for b, nxt in enumerate(chosen):
            if done[b]:
                continue
            out_ids[b].append(nxt)
            if on_token is not None:
                on_token(b, nxt)
            done[b] = nxt in eos_ids
        if all(done):
            break
        ids = np.array([[t] for t in chosen], dtype=np.int64)  # a stopped row is fed on; its tokens are dropped
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
    return BatchResult(token_ids=out_ids, prefill_ms=prefill_ms, step_ms=steps,
                       kv_cache_bytes=sum(_bytes(v) for v in past.values()),
                       peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)


def greedy(session: Any, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
           seed: int = 0) -> GenerationResult:
    """:func:`generate` with greedy choice (a sampled head still draws, from ``seed``)."""
    return generate(session, prompt_ids, max_new_tokens, GREEDY, eos_id=eos_id, seed=seed)


def load_bundle(path: str | Path) -> tuple[Path, Any]:
    """(model.onnx path, tokenizer or None) of a convert output directory or an .onnx file."""
    from toolkit.parity import checked_model_file

    onnx_path = checked_model_file(path)
    tok_path = onnx_path.parent / "tokenizer.json"
    tokenizer = None
    if tok_path.is_file():
        import tokenizers

        tokenizer = tokenizers.Tokenizer.from_file(str(tok_path))
    return onnx_path, tokenizer
