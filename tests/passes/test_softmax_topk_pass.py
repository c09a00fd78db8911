"""Tests of the ``fuse-softmax-topk`` pass: structure, must-not-fuse cases, numerics.

Numerics: the *original* graph runs in ONNX Runtime with graph optimisations off;
the *rewritten* graph runs either in ONNX Runtime with the toolkit's custom-op
library (``toolkit.ops.session_options()``) when that library is built, or else in
``onnx.reference`` with a NumPy reference of ``com.toolkit.FusedSoftmaxTopK``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

import softmax_topk_graphs as graphs
from passes import run_pipeline

PASS = "fuse-softmax-topk"


# ----------------------------------------------------------------------------- helpers


def fused_softmax_topk_reference(x, k, temperature=1.0, normalize=0, log_probs=0):
    """NumPy semantics of com.toolkit.FusedSoftmaxTopK (last axis; float64 math).

    Ties resolve to the lower index (stable descending sort), like ONNX TopK.
    """
    z = x.astype(np.float64) / temperature
    indices = np.argsort(-z, axis=-1, kind="stable")[..., :k]
    if normalize:
        z = np.take_along_axis(z, indices, axis=-1)
    shifted = z - z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    out = shifted - log_norm if log_probs else np.exp(shifted - log_norm)
    if not normalize:
        out = np.take_along_axis(out, indices, axis=-1)
    return out.astype(x.dtype), indices.astype(np.int64)


class FusedSoftmaxTopK(OpRun):
    """onnx.reference kernel; the class name must be the op type."""

    op_domain = "com.toolkit"

    def _run(self, x, k=None, temperature=1.0, normalize=0, log_probs=0):
        return fused_softmax_topk_reference(x, k, temperature, normalize, log_probs)


def _custom_op_session_options():
    """Session options with the C++ op library, or None if it is not available."""
    try:
        import toolkit.ops as ops

        return ops.session_options()
    except Exception:  # not built yet / not importable: use the NumPy reference
        return None


def run_original(model: onnx.ModelProto, feeds: dict) -> dict:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def run_rewritten(model: onnx.ModelProto, feeds: dict) -> dict:
    so = _custom_op_session_options()
    if so is not None:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, feeds)))
    ref = ReferenceEvaluator(model, new_ops=[FusedSoftmaxTopK])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, ref.run(None, feeds)))


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "FusedSoftmaxTopK"]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fuse(model, **options):
    out, report = run_pipeline(model, [PASS, "cleanup"], {PASS: options}, explain=True)
    onnx.checker.check_model(out, full_check=True)
    return out, report[PASS]


# ----------------------------------------------------------------------------- structure

FUSABLE = {
    # name: (builder, expected op types after the pass, expected fused attributes)
    "softmax": (graphs.softmax_topk, ["FusedSoftmaxTopK"], dict(k=3, normalize=0, log_probs=0)),
    "softmax_axis_rank_minus_1": (
        lambda: graphs.softmax_topk(softmax_attrs={"axis": 2}, topk_attrs={"axis": 2}),
        ["FusedSoftmaxTopK"],
        dict(k=3, normalize=0),
    ),
    "softmax_opset11_axis_last": (
        lambda: graphs.softmax_topk(softmax_attrs={"axis": 2}, opset=11),
        ["FusedSoftmaxTopK"],
        dict(k=3, normalize=0),
    ),
    "log_softmax": (
        lambda: graphs.softmax_topk(softmax_op="LogSoftmax"),
        ["FusedSoftmaxTopK"],
        dict(k=3, normalize=0, log_probs=1),
    ),
    "div_temperature": (
        lambda: graphs.scaled_softmax_topk("Div", 0.7),
        ["FusedSoftmaxTopK"],
        dict(temperature=pytest.approx(0.7)),
    ),
    "mul_temperature": (
        lambda: graphs.scaled_softmax_topk("Mul", 2.0),
        ["FusedSoftmaxTopK"],
        dict(temperature=pytest.approx(0.5)),
    ),
    "mul_temperature_swapped": (
        lambda: graphs.scaled_softmax_topk("Mul", 4.0, swap=True),
        ["FusedSoftmaxTopK"],
        dict(temperature=pytest.approx(0.25)),
    ),
    "fp16_cast_softmax": (graphs.cast_softmax_topk, ["Cast", "FusedSoftmaxTopK"], dict(k=3)),
    "fp16_softmax_then_cast": (
        graphs.softmax_cast_topk,
        ["FusedSoftmaxTopK", "Cast"],
        dict(k=3, normalize=0),
    ),
    "fp16_softmax_then_cast_renormalized": (
        lambda: graphs.softmax_cast_topk(k=2, renormalize=True),
        ["FusedSoftmaxTopK", "Cast"],
        dict(k=2, normalize=1),
    ),
    "router": (graphs.router, ["FusedSoftmaxTopK"], dict(k=2, normalize=1)),
    "router_fp16_cast": (
        lambda: graphs.router(cast=True, dtype=TensorProto.FLOAT16),
        ["Cast", "FusedSoftmaxTopK"],
        dict(k=2, normalize=1),
    ),
    "renormalized_router": (
        graphs.renormalized_router,
        ["FusedSoftmaxTopK"],
        dict(k=2, normalize=1),
    ),
}


@pytest.mark.parametrize("case", sorted(FUSABLE))
def test_fuses(case):
    builder, expected_ops, expected_attrs = FUSABLE[case]
    out, result = fuse(builder())
    assert result.count == 1
    assert op_types(out) == expected_ops
    (node,) = fused_nodes(out)
    assert node.domain == "com.toolkit"
    for name, value in expected_attrs.items():
        assert attrs(node)[name] == value, name
    assert {(o.domain, o.version) for o in out.opset_import} >= {("com.toolkit", 1)}
    assert result.explanations == []


def test_fused_op_outputs_keep_names_and_types():
    out, _ = fuse(graphs.softmax_topk())
    (node,) = fused_nodes(out)
    assert list(node.output) == ["v", "i"]
    types = {o.name: o.type.tensor_type.elem_type for o in out.graph.output}
    assert types == {"v": TensorProto.FLOAT, "i": TensorProto.INT64}


def test_two_candidates_count_two():
    model = graphs.make_model(
        [
            graphs.softmax(axis=-1),
            graphs.topk(),
            graphs.softmax(inp="x", out="lp", name="lsm", op="LogSoftmax", axis=-1),
            graphs.topk(inp="lp", outs=("lv", "li"), name="tk2"),
        ],
        ["v", "i", "lv", "li"],
        initializers=[graphs.const_i64("K", [3])],
    )
    out, result = fuse(model)
    assert result.count == 2
    assert op_types(out) == ["FusedSoftmaxTopK", "FusedSoftmaxTopK"]
    assert result.details["rules"] == {"SoftmaxTopK": 1, "LogSoftmaxTopK": 1}


def test_div_with_other_consumer_fuses_without_folding():
    model = graphs.scaled_softmax_topk("Div", 0.7)
    model.graph.output.append(helper.make_empty_tensor_value_info("xs"))
    out, result = fuse(model)
    assert result.count == 1
    assert op_types(out) == ["Div", "FusedSoftmaxTopK"]
    assert attrs(fused_nodes(out)[0])["temperature"] == 1.0


def test_negative_div_is_not_folded():
    out, result = fuse(graphs.scaled_softmax_topk("Div", -2.0))
    assert op_types(out) == ["Div", "FusedSoftmaxTopK"]
    assert attrs(fused_nodes(out)[0])["temperature"] == 1.0


@pytest.mark.parametrize("scale_op,c", [("Mul", 1e-39), ("Div", 1e-39)])
def test_a_constant_that_folds_into_a_temperature_the_kernel_refuses_stays(scale_op, c):
    """Mul by 1e-39 folded into temperature 1e39 (inf in float32) and Div by 1e-39 into a
    subnormal temperature: models the kernel refuses at session creation. The scale now
    stays a node; the rest still fuses (temperature 1), and the model runs as the original does."""
    model = graphs.scaled_softmax_topk(scale_op, c)
    out, result = fuse(model)
    assert result.count == 1 and op_types(out) == [scale_op, "FusedSoftmaxTopK"]
    assert attrs(fused_nodes(out)[0])["temperature"] == 1.0
    x = np.random.default_rng(0).standard_normal((2, 3, 10)).astype(np.float32)
    want, got = run_original(model, {"x": x}), run_rewritten(out, {"x": x})
    np.testing.assert_allclose(got["v"], want["v"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale_op,c", [("Mul", 3e38), ("Div", 1e-38)])
def test_a_scale_that_takes_the_logits_out_of_float32_range_is_not_folded(scale_op, c):
    """x * 3e38 overflows in the original graph: a NaN softmax row, indices 0..k-1.
    Folded into the temperature, the fused op's (x - max) / T stayed finite and picked
    the largest logits with finite probabilities (found by a fuzzing audit). A scale
    beyond 2^64 either way (also one that flushes logits together) stays a node."""
    model = graphs.scaled_softmax_topk(scale_op, c)
    out, result = fuse(model)
    assert result.count == 1 and op_types(out) == [scale_op, "FusedSoftmaxTopK"]
    rng = np.random.default_rng(2)
    x = (rng.uniform(4, 8, (2, 3, 10)) * rng.choice([-1, 1], (2, 3, 10))).astype(np.float32)
    want, got = run_original(model, {"x": x}), run_rewritten(out, {"x": x})
    assert np.isnan(want["v"]).all()
    np.testing.assert_array_equal(got["i"], want["i"])
    np.testing.assert_array_equal(got["v"], want["v"])
    out, _ = fuse(graphs.scaled_softmax_topk("Mul", 2.0 ** 60))  # within the bound: folds
    assert op_types(out) == ["FusedSoftmaxTopK"] and attrs(fused_nodes(out)[0])["temperature"] == 2.0 ** -60


def test_a_scale_of_higher_rank_than_the_logits_is_not_folded():
    """x [10] / c [1, 1, 1] broadcasts to [1, 1, 10]: folding c dropped the two axes (the
    fused output was [3] instead of [1, 1, 3])."""
    model = graphs.scaled_softmax_topk("Div", np.full((1, 1, 1), 0.5), shape=(10,))
    out, _ = fuse(model)
    assert op_types(out) == ["Div", "FusedSoftmaxTopK"]
    x = np.random.default_rng(1).standard_normal(10).astype(np.float32)
    want, got = run_original(model, {"x": x}), run_rewritten(out, {"x": x})
    assert got["v"].shape == want["v"].shape == (1, 1, 3)
    np.testing.assert_allclose(got["v"], want["v"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["i"], want["i"])
    # a constant of the logits' rank or lower still folds (it cannot add axes)
    out, _ = fuse(graphs.scaled_softmax_topk("Div", np.full((1, 1, 1), 0.5)))
    assert op_types(out) == ["FusedSoftmaxTopK"] and attrs(fused_nodes(out)[0])["temperature"] == 0.5


def test_fold_temperature_option_off():
    out, _ = fuse(graphs.scaled_softmax_topk("Div", 0.7), fold_temperature=False)
    assert op_types(out) == ["Div", "FusedSoftmaxTopK"]


def test_router_form_option_off():
    model = graphs.router()
    out, result = fuse(model, enable_router_form=False)
    assert result.count == 0
    assert op_types(out) == op_types(model)


def test_max_k_option():
    model = graphs.softmax_topk(k=5)
    out, result = fuse(model, max_k=4)
    assert result.count == 0 and op_types(out) == op_types(model)
    assert any("K=5 > max_k=4" in line for line in result.explanations)


# ----------------------------------------------------------------------------- must not fuse


def _k_as_graph_input():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 10])
    k = helper.make_tensor_value_info("K", TensorProto.INT64, [1])
    return graphs.make_model([graphs.softmax(axis=-1), graphs.topk()], ["v", "i"], inputs=[x, k])


def _softmax_output_used_elsewhere():
    nodes = [
        graphs.softmax(axis=-1),
        graphs.topk(),
        helper.make_node("ReduceMax", ["p"], ["m"], name="peak", keepdims=0),
    ]
    return graphs.make_model(nodes, ["v", "i", "m"], initializers=[graphs.const_i64("K", [3])])


def _softmax_output_is_graph_output():
    nodes = [graphs.softmax(axis=-1), graphs.topk()]
    return graphs.make_model(nodes, ["v", "i", "p"], initializers=[graphs.const_i64("K", [3])])


def _unknown_rank_axis_2():
    # Reshape to a runtime shape of unknown length: the Softmax input's rank is unknown.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 10])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, ["n"])
    return graphs.make_model(
        [
            helper.make_node("Reshape", ["x", "shape"], ["xr"], name="reshape"),
            graphs.softmax(inp="xr", axis=2),
            graphs.topk(axis=2),
            # Graph outputs need a known rank to pass onnx.checker: flatten them.
            helper.make_node("Reshape", ["v", "flat"], ["v_flat"], name="flatten_v"),
            helper.make_node("Reshape", ["i", "flat"], ["i_flat"], name="flatten_i"),
        ],
        ["v_flat", "i_flat"],
        inputs=[x, shape],
        initializers=[graphs.const_i64("K", [3]), graphs.const_i64("flat", [-1])],
    )


def _router_values_used_elsewhere():
    model = graphs.router()
    model.graph.output.append(helper.make_empty_tensor_value_info("tv"))
    return model


MUST_NOT_FUSE = {
    # name: (builder, text the explanation must contain)
    "softmax_other_axis": (
        lambda: graphs.softmax_topk(softmax_attrs={"axis": 1}),
        "node sm (Softmax) reduces axis=1, not the last axis of a rank-3 input",
    ),
    "topk_largest_0": (lambda: graphs.softmax_topk(topk_attrs={"largest": 0}), "largest=0"),
    "topk_sorted_0": (lambda: graphs.softmax_topk(topk_attrs={"sorted": 0}), "sorted=0"),
    "topk_k_not_constant": (_k_as_graph_input, "is not a constant"),
    "softmax_output_used_elsewhere": (
        _softmax_output_used_elsewhere,
        "Softmax output 'p' is also used by node peak (ReduceMax)",
    ),
    "softmax_output_is_graph_output": (
        _softmax_output_is_graph_output,
        "Softmax output 'p' is a graph output",
    ),
    "topk_other_axis": (
        lambda: graphs.softmax_topk(topk_attrs={"axis": 1}),
        "node tk (TopK): reduces axis=1, not the last axis of a rank-3 input",
    ),
    "axis_not_provably_last": (_unknown_rank_axis_2, "input rank is unknown"),
    "router_values_used_elsewhere": (_router_values_used_elsewhere, "TopK values 'tv'"),
    "router_narrowing_cast": (
        lambda: graphs.router(cast=True, dtype=TensorProto.DOUBLE),
        "only an exact cast to float32",
    ),
}


@pytest.mark.parametrize("case", sorted(MUST_NOT_FUSE))
def test_must_not_fuse(case):
    builder, reason = MUST_NOT_FUSE[case]
    model = builder()
    out, result = fuse(model)
    assert result.count == 0
    assert op_types(out) == op_types(model)
    assert not fused_nodes(out)
    assert any(reason in line for line in result.explanations), result.explanations
    assert all(line.startswith("node ") for line in result.explanations)


def test_explanations_off_by_default():
    _, report = run_pipeline(graphs.softmax_topk(softmax_attrs={"axis": 1}), [PASS])
    assert report[PASS].explanations == []


# ----------------------------------------------------------------------------- numerics


def _random_input(model: onnx.ModelProto, seed: int = 0) -> dict:
    (inp,) = model.graph.input
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    # Well-separated values: index agreement must not hinge on float rounding.
    rng = np.random.default_rng(seed)
    flat = rng.permutation(int(np.prod(dims))).astype(np.float64) / 7.0 - 3.0
    return {inp.name: flat.reshape(dims).astype(dtype)}


@pytest.mark.parametrize("case", sorted(FUSABLE))
def test_numerics_match_onnxruntime(case):
    builder = FUSABLE[case][0]
    model = builder()
    out, result = fuse(model)
    assert result.count == 1
    feeds = _random_input(model)
    # fp16 logits: both graphs round probabilities to fp16 somewhere (ORT on CPU may
    # run fp16 Softmax in float32), so compare at fp16 resolution.
    fp16_input = any(x.dtype == np.float16 for x in feeds.values())
    expected = run_original(model, feeds)
    actual = run_rewritten(out, feeds)
    assert set(actual) == set(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            tol = 2e-3 if fp16_input else 1e-5
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)


def test_reference_ties_pick_lower_index_like_onnxruntime():
    model = graphs.softmax_topk(k=4, shape=(1, 6))
    feeds = {"x": np.array([[1.0, 3.0, 3.0, 0.5, 3.0, 1.0]], np.float32)}
    expected = run_original(model, feeds)
    out, _ = fuse(model)
    actual = run_rewritten(out, feeds)
    np.testing.assert_array_equal(actual["i"], expected["i"])
    np.testing.assert_array_equal(actual["i"], [[1, 2, 4, 0]])


def test_explain_says_what_a_graph_without_any_pair_holds():
    """--explain on a model with no TopK (a plain decoder: its Softmax feeds attention)
    printed nothing at all; now one line says what the graph holds and what to do."""
    model = graphs.make_model([graphs.softmax(), helper.make_node("Relu", ["p"], ["y"], name="act")], ["y"])
    _, result = fuse(model)
    assert result.count == 0
    assert result.explanations == [("graph: 0 TopK and 1 Softmax/LogSoftmax nodes, no pair of them to fuse (a "
                                    "decoder's Softmax feeds its attention); --sampling-head K appends a fused "
                                    "top-k to the logits")]
    _, result = fuse(graphs.softmax_topk(topk_attrs={"largest": 0}))  # a near miss keeps its own reason
    assert len(result.explanations) == 1 and "graph:" not in result.explanations[0]
