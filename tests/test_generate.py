"""Greedy generation: the sampling head gives the same tokens as logits argmax and as PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from passes import run_pipeline
from toolkit.generate import greedy
from toolkit.parity import make_session


def _torch_greedy(src, prompt, n):
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            mask = torch.ones_like(ids)
            pos = torch.arange(ids.shape[1])[None]
            logits, _ = src.forward(ids, mask, pos, src.empty_past(1))
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_sampling_head_greedy_equals_logits_argmax_and_pytorch(exported, tmp_path):
    src, path = exported("llama")
    head_model, report = run_pipeline(onnx.load(str(path)), ["sampling-head"],
                                      {"sampling-head": {"k": 4, "keep_logits": "false"}})
    assert report.counts["sampling-head"] == 1
    head_path = tmp_path / "head.onnx"
    onnx.save(head_model, str(head_path))
    prompt = list(np.random.default_rng(0).integers(0, src.vocab_size, 6))
    plain = greedy(make_session(path), prompt, 12)
    head = greedy(make_session(head_path), prompt, 12)
    assert head.token_ids == plain.token_ids
    # the reference recomputes the whole prefix each step (no cache): an independent path
    assert plain.token_ids == _torch_greedy(src, prompt, 12)
    assert len(head.step_ms) == 11 and all(t > 0 for t in head.step_ms)
