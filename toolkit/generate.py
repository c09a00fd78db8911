"""Greedy decoding with ONNX Runtime over the exported flat KV-cache I/O.

Uses the model's sampling head when it has one: ``next_token`` (a seeded draw,
SampleTopKTopP) or ``next_token_ids[:, 0]`` (greedy, FusedSoftmaxTopK) — the decode
step then never reads ``[B, S, V]`` logits back — else the argmax of ``logits``.
Each step feeds the ``present.*`` outputs back as ``past_key_values.*``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    prefill_ms: float
    step_ms: list[float]

    @property
    def median_step_ms(self) -> float:
        return float(np.median(self.step_ms)) if self.step_ms else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return 1000.0 / self.median_step_ms if self.step_ms else float("nan")


def next_token(outs: dict[str, np.ndarray]) -> int:
    """The token a decode step chose, from the head's output or the logits."""
    if "next_token" in outs:
        return int(outs["next_token"][0])
    if "next_token_ids" in outs:
        return int(outs["next_token_ids"][0, 0])
    return int(outs["logits"][0, -1].argmax())


def greedy(session: Any, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
           seed: int = 0) -> GenerationResult:
    """Decode ``max_new_tokens`` tokens after ``prompt_ids`` (batch 1).

    Greedy unless the model's head samples; then ``seed`` is the base of the
    per-step seeds, so a run is reproducible.
    """
    from toolkit.parity import OnnxDecoder

    dec = OnnxDecoder(session)
    dec.seed_base = seed
    ids = np.array([prompt_ids], dtype=np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(ids.shape[1], dtype=np.int64)[None]
    past = dec.empty_past(1)
    out_ids: list[int] = []
    steps: list[float] = []
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        start = time.perf_counter()
        _, past, outs = dec.step(ids, mask, pos, past)
        nxt = next_token(outs)
        elapsed = (time.perf_counter() - start) * 1e3
        if step == 0:
            prefill_ms = (time.perf_counter() - t0) * 1e3
        else:
            steps.append(elapsed)
        out_ids.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        ids = np.array([[nxt]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
    return GenerationResult(token_ids=out_ids, prefill_ms=prefill_ms, step_ms=steps)


def load_bundle(path: str | Path) -> tuple[Path, Any]:
    """(model.onnx path, tokenizer or None) of a convert output directory or an .onnx file."""
    path = Path(path)
    onnx_path = path / "model.onnx" if path.is_dir() else path
    tok_path = onnx_path.parent / "tokenizer.json"
    tokenizer = None
    if tok_path.is_file():
        import tokenizers

        tokenizer = tokenizers.Tokenizer.from_file(str(tok_path))
    return onnx_path, tokenizer
