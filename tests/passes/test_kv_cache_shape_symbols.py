"""kv-cache's symbolic shape evaluator (``_shape_symbols``) against ONNX Runtime: random chains of Shape (any start / end), Slice (any start / end, clamped,
INT64 extremes), Gather (negative and scalar indices), Unsqueeze and Concat, on a
[2, 3, 5, 7] tensor whose dims are all distinct. Wherever the evaluator answers, every
symbol (a dim of the input, or a constant) must be the value onnx computes; it may
decline (None), never guess. The pass relies on it to prove that torch's Reshape ->
Transpose -> Reshape swaps the keys' last two axes, and that a Shape reader reads only
some axes. (ONNX Runtime is the reference, not onnx's ReferenceEvaluator: for Shape with
end=-5 on a 4-D input the latter returns three dims, while the spec clamps end + rank = -1
to 0 and ONNX Runtime returns none.)"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from passes.kv_cache import _shape_symbols

X = np.zeros((2, 3, 5, 7), np.float32)
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
bound = st.one_of(st.integers(-6, 6), st.integers(-6, 6), st.integers(-6, 6), st.sampled_from([I64_MIN, I64_MAX]))


@st.composite
def shape_programs(draw):
    """(nodes, initializers): a Shape of x, then 0-3 steps, each a Slice, Gather (+Unsqueeze) or Concat."""
    nodes, inits, count = [], [], [0]

    def name(prefix):
        count[0] += 1
        return f"{prefix}{count[0]}"

    def const(values, scalar=False):
        n = name("c")
        inits.append(helper.make_tensor(n, TensorProto.INT64, [] if scalar else [len(values)], values))
        return n

    attrs = {}
    if draw(st.booleans()):
        attrs["start"] = draw(st.integers(-6, 6))
    if draw(st.booleans()):
        attrs["end"] = draw(st.integers(-6, 6))
    cur = name("s")
    nodes.append(helper.make_node("Shape", ["x"], [cur], **attrs))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["slice", "gather", "concat"]))
        out = name("v")
        if kind == "slice":
            ins = [cur, const([draw(bound)]), const([draw(bound)])]
            if draw(st.booleans()):
                ins.append(const([draw(st.sampled_from([0, -1]))]))
            nodes.append(helper.make_node("Slice", ins, [out]))
        elif kind == "gather":
            scalar = draw(st.booleans())
            index = [draw(st.integers(-5, 4)) for _ in range(1 if scalar else draw(st.integers(1, 3)))]
            gathered = name("g") if scalar else out
            nodes.append(helper.make_node("Gather", [cur, const(index, scalar=scalar)], [gathered]))
            if scalar:
                nodes.append(helper.make_node("Unsqueeze", [gathered, const([0])], [out]))
        else:
            other = const([draw(st.integers(-1, 9))])
            parts = [cur, other] if draw(st.booleans()) else [other, cur]
            nodes.append(helper.make_node("Concat", parts, [out], axis=0))
        cur = out
    return nodes, inits, cur


@settings(max_examples=1000, deadline=None)
@given(shape_programs())
def test_symbols_are_what_onnx_computes_or_nothing(program):
    nodes, inits, out = program
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X.shape))],
                              [helper.make_tensor_value_info(out, TensorProto.INT64, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    try:
        quiet = ort.SessionOptions()
        quiet.log_severity_level = 4  # an invalid program is expected: no error log
        session = ort.InferenceSession(model.SerializeToString(), quiet, providers=["CPUExecutionProvider"])
        expected = session.run(None, {"x": X})[0].reshape(-1).tolist()
    except (Fail, InvalidArgument, RuntimeException):  # an invalid program (a Gather index out of range)
        expected = None
    irm = ir.from_proto(model)
    x = irm.graph.inputs[0]
    symbols = _shape_symbols(irm.graph.outputs[0])
    if symbols is None:
        return
    assert expected is not None, (symbols, nodes)
    got = [X.shape[s[1]] if isinstance(s, tuple) else s for s in symbols]
    assert all(s[0] is x for s in symbols if isinstance(s, tuple))
    assert got == expected, (nodes, symbols)
