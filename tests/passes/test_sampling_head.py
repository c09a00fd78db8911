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
    # the kernels' rule: > 0, finite, with a finite float32 inverse (inf and 1e-39 passed
    # this check and gave a bundle no session could load)
    for bad in ("0", "inf", "1e-39", "-1"):
        with pytest.raises(PassError, match="temperature must be > 0 and finite with a finite inverse"):
            run_pipeline(_lm_graph(), ["sampling-head"], {"sampling-head": {"temperature": bad}})


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
    # one seed per row (a server batching requests): row r draws with its own seed
    seeds = np.arange(100, 100 + B, dtype=np.int64) * 7919
    logits, token, _ = sess.run(None, {"x": x, "sampling_seed": seeds})
    ref_token, _ = sample_topk_top_p(logits[:, -1], 20, 0.9, 0.85, 0.01, seed=seeds)
    np.testing.assert_array_equal(token, ref_token)


def test_sampled_head_bad_top_p():
    with pytest.raises(PassError, match="top_p must be in"):
        run_pipeline(_lm_graph(), ["sampling-head"], {"sampling-head": {"sample": "true", "top_p": "1.5"}})


def _softcapped_lm_graph(extra_output: str | None = None) -> onnx.ModelProto:
    """x @ W + b, then a tanh softcap (/ 30, tanh, * 30) -> logits [B, S, V]; optionally
    one intermediate value is a graph output too."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["biased"]),
             helper.make_node("Div", ["biased", "cap"], ["scaled"]), helper.make_node("Tanh", ["scaled"], ["t"]),
             helper.make_node("Mul", ["t", "cap"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, ["batch", "seq", V]))
    graph = helper.make_graph(
        nodes, "lm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H])], outputs,
        [numpy_helper.from_array(rng.standard_normal((H, V)).astype(np.float32) * 8, "W"),
         numpy_helper.from_array(rng.standard_normal(V).astype(np.float32), "b"),
         numpy_helper.from_array(np.array(30.0, np.float32), "cap")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_without_logits_the_last_position_is_taken_before_the_lm_head():
    """keep_logits=false: the Gather of the last position moves above the LM head's
    position-wise ops (MatMul by a weight, bias, softcap), so a prefill projects one
    hidden state; the head's outputs are those of the full-logits graph (NumPy). It
    stops at a value the graph also outputs."""
    import onnxruntime as ort

    from toolkit import ops

    k = 6
    x = np.random.default_rng(3).standard_normal((B, S, H)).astype(np.float32)
    g = np.random.default_rng(2)
    w, b = g.standard_normal((H, V)).astype(np.float32) * 8, g.standard_normal(V).astype(np.float32)
    logits = np.tanh((x[:, -1].astype(np.float64) @ w + b) / 30) * 30
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected_ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    for extra, moved, gathered in ((None, 5, "x"), ("biased", 3, "biased")):
        out, report = run_pipeline(_softcapped_lm_graph(extra), ["sampling-head", "cleanup"],
                                   {"sampling-head": {"k": k, "keep_logits": "false"}})
        assert report.results[0].details["ops_after_last_position"] == moved
        onnx.checker.check_model(out, full_check=True)
        gather = [n for n in out.graph.node if n.op_type == "Gather"]
        assert len(gather) == 1 and gather[0].input[0] == gathered
        assert sum(n.op_type == "MatMul" for n in out.graph.node) == 1  # the old [B, S, V] chain is gone
        sess = ort.InferenceSession(out.SerializeToString(), ops.session_options(1),
                                    providers=["CPUExecutionProvider"])
        results = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
        np.testing.assert_array_equal(results["next_token_ids"], expected_ids)
        # fp32 products of 8 terms and a tanh against float64: 1e-5 relative
        np.testing.assert_allclose(results["next_token_probs"], np.take_along_axis(p, expected_ids, -1),
                                   rtol=1e-5, atol=1e-7)


def test_without_logits_an_exported_decoder_gives_the_full_logits_head(exported):
    """On exported decoders (RMSNorm + LM head, GPT-2's Reshape + MatMul), the hoisted
    head returns what the full-logits head returns, at prefill (left-padded batch) and
    at a decode step through the cache."""
    import onnxruntime as ort

    from toolkit import ops
    from toolkit.generate import BoundDecoder

    for family in ("llama", "gpt2"):
        _, path = exported(family)
        hoisted, report = run_pipeline(onnx.load(str(path)), ["sampling-head", "cleanup"],
                                       {"sampling-head": {"k": 8, "keep_logits": "false"}})
        assert report.results[0].details["ops_after_last_position"] >= 1, family
        full, _ = run_pipeline(onnx.load(str(path)), ["sampling-head"], {"sampling-head": {"k": 8}})
        runs = []
        for model in (hoisted, full):
            sess = ort.InferenceSession(model.SerializeToString(), ops.session_options(1),
                                        providers=["CPUExecutionProvider"])
            dec = BoundDecoder(sess, ("next_token_ids", "next_token_probs"))
            ids = np.array([[0, 0, 5, 17, 42], [3, 9, 8, 8, 1]], np.int64)
            mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)
            pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
            first, past = dec.step(ids, mask, pos, dec.empty_past(2), 0)
            mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
            second, _ = dec.step(first["next_token_ids"][:, :1].copy(), mask, pos[:, -1:] + 1, past, 1)
            runs.append((first, second))
        for a, b in zip(*runs):
            np.testing.assert_array_equal(a["next_token_ids"], b["next_token_ids"])
            # the LM head's fp32 GEMM over one row or over all S rows: 1e-5 relative
            np.testing.assert_allclose(a["next_token_probs"], b["next_token_probs"], rtol=1e-5, atol=1e-7)
