"""portable: the standard-ONNX body of FusedSoftmaxTopK runs without the op library
and gives what the fused kernel gives (ORT with the library prefers the kernel)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from passes import run_pipeline
from toolkit import ops
from toolkit.errors import PassError
from toolkit.ops.reference import softmax_topk


def _fused_model(op="FusedSoftmaxTopK", outputs=("v", "i"), **attrs):
    node = helper.make_node(op, ["x"], list(outputs), domain="com.toolkit", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 50])],
                              [helper.make_tensor_value_info(o, TensorProto.INT64 if o == "i" else TensorProto.FLOAT,
                                                             [3, "k"]) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.toolkit", 1)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("normalize,log_probs,temperature", [(0, 0, 1.0), (0, 1, 0.7), (1, 0, 1.3), (1, 1, 1.0)])
def test_portable_body_matches_kernel_and_reference(normalize, log_probs, temperature):
    model = _fused_model(k=4, normalize=normalize, log_probs=log_probs, temperature=temperature)
    out, report = run_pipeline(model, ["portable", "cleanup"])
    assert report.counts["portable"] == 1
    assert [(f.domain, f.name) for f in out.functions] == [("com.toolkit", "FusedSoftmaxTopK")]
    onnx.checker.check_model(out)
    x = (2 * np.random.default_rng(0).standard_normal((3, 50))).astype(np.float32)
    without = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    kernel = ort.InferenceSession(out.SerializeToString(), ops.session_options(),
                                  providers=["CPUExecutionProvider"]).run(None, {"x": x})
    reference = ReferenceEvaluator(out).run(None, {"x": x})
    ref_v, ref_i, _ = softmax_topk(x, 4, temperature, normalize, bool(log_probs))
    for values, indices in (without, kernel, reference):
        np.testing.assert_array_equal(indices, ref_i)
        # fp32: ORT's Div then Softmax vs the kernel's fused (x - m) / T
        np.testing.assert_allclose(values, ref_v, rtol=2e-6, atol=1e-6)


def test_defaults_apply_when_attributes_are_omitted():
    out, _ = run_pipeline(_fused_model(k=3), ["portable"])
    x = np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32)
    values, indices = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    ref_v, ref_i, _ = softmax_topk(x, 3)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(values, ref_v, rtol=1e-6)


def test_ops_without_a_body_are_refused():
    with pytest.raises(PassError, match="no standard-ONNX body for SampleTopKTopP"):
        run_pipeline(_fused_model("SampleTopKTopP", k=3), ["portable"])
    with pytest.raises(PassError, match="log_normalizer"):
        run_pipeline(_fused_model(outputs=("v", "i", "n"), k=3), ["portable"])


def test_portable_mixtral_runs_without_the_library(exported):
    src, path = exported("hf:mixtral")
    model, report = run_pipeline(onnx.load(str(path)), ["fuse-softmax-topk", "portable", "cleanup"])
    assert report.counts["fuse-softmax-topk"] == src.num_layers and report.counts["portable"] == 1
    from toolkit.export import example_inputs, input_names

    feeds = dict(zip(input_names(src.num_layers), [a.numpy() for a in example_inputs(src, seed=3)]))
    blob = model.SerializeToString()
    plain = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, feeds)
    fused = ort.InferenceSession(blob, ops.session_options(), providers=["CPUExecutionProvider"]).run(None, feeds)
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b, c in zip(plain, fused, original):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b, c, rtol=0, atol=1e-5)
