"""Tiny ONNX graphs (Python builders) around Softmax/TopK for the pass tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18


def const_i64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def const_f32(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def make_model(
    nodes: list[onnx.NodeProto],
    outputs: list[str],
    *,
    initializers: list[onnx.TensorProto] = (),
    inputs: list[onnx.ValueInfoProto] | None = None,
    shape=(2, 3, 10),
    dtype: int = TensorProto.FLOAT,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """A model with input ``x`` of ``shape``/``dtype`` and untyped outputs."""
    graph_inputs = inputs or [helper.make_tensor_value_info("x", dtype, list(shape))]
    graph = helper.make_graph(
        nodes,
        "softmax_topk",
        graph_inputs,
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model)


def softmax(inp="x", out="p", name="sm", op="Softmax", **attrs) -> onnx.NodeProto:
    return helper.make_node(op, [inp], [out], name=name, **attrs)


def topk(inp="p", k="K", outs=("v", "i"), name="tk", **attrs) -> onnx.NodeProto:
    return helper.make_node("TopK", [inp, k], list(outs), name=name, **attrs)


def softmax_topk(k=3, softmax_op="Softmax", softmax_attrs=None, topk_attrs=None, **kw):
    """x -> Softmax -> TopK(k) -> (v, i)."""
    nodes = [softmax(op=softmax_op, **(softmax_attrs or {"axis": -1})), topk(**(topk_attrs or {}))]
    return make_model(nodes, ["v", "i"], initializers=[const_i64("K", [k])], **kw)


def scaled_softmax_topk(scale_op="Div", c=0.7, k=3, swap=False, **kw):
    """x -> Div|Mul(c) -> Softmax -> TopK."""
    operands = ["c", "x"] if swap else ["x", "c"]
    nodes = [
        helper.make_node(scale_op, operands, ["xs"], name="scale"),
        softmax(inp="xs", axis=-1),
        topk(),
    ]
    return make_model(
        nodes, ["v", "i"], initializers=[const_i64("K", [k]), const_f32("c", c)], **kw
    )


def cast_softmax_topk(k=3):
    """fp16 x -> Cast(float) -> Softmax -> TopK (an fp16 model's upcast softmax)."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], name="upcast", to=TensorProto.FLOAT),
        softmax(inp="xf", axis=-1),
        topk(),
    ]
    return make_model(
        nodes, ["v", "i"], initializers=[const_i64("K", [k])], dtype=TensorProto.FLOAT16
    )


def router(k=2, cast=False, dtype=TensorProto.FLOAT, shape=(6, 8)):
    """x -> TopK(k) -> [Cast float] -> Softmax(values); indices are a graph output."""
    nodes = [topk(inp="x", outs=("tv", "i"))]
    softmax_in = "tv"
    if cast:
        nodes.append(
            helper.make_node("Cast", ["tv"], ["tvf"], name="upcast", to=TensorProto.FLOAT)
        )
        softmax_in = "tvf"
    nodes.append(softmax(inp=softmax_in, out="w", axis=-1))
    return make_model(
        nodes, ["w", "i"], initializers=[const_i64("K", [k])], dtype=dtype, shape=shape
    )


def renormalized_router(k=2, shape=(6, 8)):
    """x -> Softmax(axis=1) -> TopK -> v / ReduceSum(v, -1, keepdims) (HF Mixtral)."""
    nodes = [
        softmax(axis=1),
        topk(),
        helper.make_node("ReduceSum", ["v", "axes"], ["s"], name="sum", keepdims=1),
        helper.make_node("Div", ["v", "s"], ["w"], name="renorm"),
    ]
    return make_model(
        nodes,
        ["w", "i"],
        initializers=[const_i64("K", [k]), const_i64("axes", [-1])],
        shape=shape,
    )


def softmax_cast_topk(k=3, renormalize=False, shape=(6, 8)):
    """fp16 x -> Softmax -> Cast(float) -> TopK [-> v / ReduceSum(v)].

    torch's dynamo exporter emits this for ``softmax(fp16, dim=-1, dtype=torch.float)``.
    """
    nodes = [
        softmax(axis=-1),
        helper.make_node("Cast", ["p"], ["pf"], name="upcast", to=TensorProto.FLOAT),
        topk(inp="pf"),
    ]
    outputs = ["v", "i"]
    if renormalize:
        nodes += [
            helper.make_node("ReduceSum", ["v", "axes"], ["s"], name="sum", keepdims=1),
            helper.make_node("Div", ["v", "s"], ["w"], name="renorm"),
        ]
        outputs = ["w", "i"]
    return make_model(
        nodes,
        outputs,
        initializers=[const_i64("K", [k]), const_i64("axes", [-1])],
        dtype=TensorProto.FLOAT16,
        shape=shape,
    )
