"""Softmax(axis=a) -> Transpose(perm, perm[-1] == a) -> TopK(last): fused on Transpose(x)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from test_softmax_topk_pass import fuse, fused_nodes, run_original, run_rewritten


def _graph(softmax_axis: int, perm: list[int], op: str = "Softmax", extra_consumer: bool = False):
    k = helper.make_tensor("K", TensorProto.INT64, [1], [4])
    nodes = [helper.make_node(op, ["x"], ["p"], axis=softmax_axis, name="sm"),
             helper.make_node("Transpose", ["p"], ["pt"], perm=perm, name="tr"),
             helper.make_node("TopK", ["pt", "K"], ["values", "indices"], axis=-1, name="tk")]
    outputs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("indices", TensorProto.INT64, None)]
    if extra_consumer:
        nodes.append(helper.make_node("Identity", ["pt"], ["also"]))
        outputs.append(helper.make_tensor_value_info("also", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 30, 6])],
                              outputs, [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [1, -2])
def test_transposed_softmax_is_fused(op, axis):
    model = _graph(axis, [0, 2, 1], op)
    out, result = fuse(model)
    assert result.count == 1
    assert [n.op_type for n in out.graph.node] == ["Transpose", "FusedSoftmaxTopK"]
    x = np.random.default_rng(0).standard_normal((2, 30, 6)).astype(np.float32)
    want, got = run_original(model, {"x": x}), run_rewritten(out, {"x": x})
    np.testing.assert_array_equal(got["indices"], want["indices"])
    np.testing.assert_allclose(got["values"], want["values"], rtol=1e-5, atol=1e-6)


def test_transpose_that_does_not_move_the_softmax_axis_last_is_not_fused():
    out, result = fuse(_graph(1, [1, 0, 2]))
    assert result.count == 0 and not fused_nodes(out)
    assert any("moves axis 2 last" in line and "normalises axis 1" in line for line in result.explanations)


def test_transposed_probabilities_used_elsewhere_are_not_fused():
    out, result = fuse(_graph(1, [0, 2, 1], extra_consumer=True))
    assert result.count == 0 and not fused_nodes(out)
    assert any("Transpose output" in line for line in result.explanations)
    onnx.checker.check_model(out)
