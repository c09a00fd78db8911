"""sampling-head: structure of the added head and its numbers vs NumPy softmax + top-k."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import run_pipeline
from toolkit.errors import PassError

B, S, H, V = 2, 5, 8, 64


def _lm_graph(vocab: int = V) -> onnx.ModelProto:
    """x [B, S, H] @ W [H, V] -> logits [B, S, V], like an LM head."""
    w = np.random.default_rng(0).standard_normal((H, vocab)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"])], "lm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_head_structure():
    out, report = run_pipeline(_lm_graph(), ["sampling-head"], {"sampling-head": {"k": 7}})
    assert report.counts == {"sampling-head": 1}
    assert [o.name for o in out.graph.output] == ["logits", "next_token_probs", "next_token_ids"]
    fused = [n for n in out.graph.node if n.op_type == "FusedSoftmaxTopK"]
    assert len(fused) == 1 and fused[0].domain == "com.toolkit"
    assert {o.domain: o.version for o in out.opset_import}["com.toolkit"] == 1
    onnx.checker.check_model(out, full_check=True)
    # idempotent: a second run adds nothing
    again, report = run_pipeline(out, ["sampling-head"])
    assert report.counts == {"sampling-head": 0}


def test_head_without_logits_output():
    out, _ = run_pipeline(_lm_graph(), ["sampling-head"], {"sampling-head": {"k": 3, "keep_logits": "false"}})
    assert [o.name for o in out.graph.output] == ["next_token_probs", "next_token_ids"]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_numbers_match_numpy(temperature):
    import onnxruntime as ort

    from toolkit import ops

    k = 9
    out, _ = run_pipeline(_lm_graph(), ["sampling-head"],
                          {"sampling-head": {"k": k, "temperature": str(temperature)}})
    so = ops.session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((B, S, H)).astype(np.float32)
    logits, probs, ids = sess.run(None, {"x": x})
    last = logits[:, -1].astype(np.float64) / temperature
    p = np.exp(last - last.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected_ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, expected_ids)
    # fp32 softmax of 64 logits: well within 1e-6 relative
    np.testing.assert_allclose(probs, np.take_along_axis(p, expected_ids, -1), rtol=1e-6, atol=1e-7)


def test_head_bad_options_are_actionable():
    with pytest.raises(PassError, match="exceeds the vocabulary size 64"):
        run_pipeline(_lm_graph(), ["sampling-head"], {"sampling-head": {"k": 65}})
    with pytest.raises(PassError, match="no output 'scores'"):
        run_pipeline(_lm_graph(), ["sampling-head"], {"sampling-head": {"logits_output": "scores"}})
    with pytest.raises(PassError, match="temperature must be > 0"):
        run_pipeline(_lm_graph(), ["sampling-head"], {"sampling-head": {"temperature": "0"}})


def test_sampled_head_structure_and_draws_match_reference():
    import onnxruntime as ort

    from toolkit import ops
    from toolkit.ops.reference import sample_topk_top_p

    opts = {"k": 20, "sample": "true", "temperature": "0.9", "top_p": "0.85", "min_p": "0.01"}
    out, report = run_pipeline(_lm_graph(), ["sampling-head"], {"sampling-head": opts})
    assert report.counts == {"sampling-head": 1}
    assert [i.name for i in out.graph.input] == ["x", "sampling_seed"]
    assert [o.name for o in out.graph.output] == ["logits", "next_token", "next_token_prob"]
    assert [n.op_type for n in out.graph.node if n.domain == "com.toolkit"] == ["SampleTopKTopP"]
    onnx.checker.check_model(out, full_check=True)
    sess = ort.InferenceSession(out.SerializeToString(), ops.session_options(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(4).standard_normal((B, S, H)).astype(np.float32)
    for seed in range(5):
        logits, token, prob = sess.run(None, {"x": x, "sampling_seed": np.array([seed], np.int64)})
        ref_token, ref_prob = sample_topk_top_p(logits[:, -1], 20, 0.9, 0.85, 0.01, seed=seed)
        np.testing.assert_array_equal(token, ref_token)
        np.testing.assert_allclose(prob, ref_prob, rtol=1e-6)


def test_sampled_head_bad_top_p():
    with pytest.raises(PassError, match="top_p must be in"):
        run_pipeline(_lm_graph(), ["sampling-head"], {"sampling-head": {"sample": "true", "top_p": "1.5"}})
