"""``portable``: give every toolkit operator in the model a body in standard ONNX ops.

Each ``com.toolkit`` op used by the model gets a model-local ONNX function of the
same domain and name whose body is the unfused subgraph it replaced. Runtimes
without the op library (ONNX Runtime without ``register_custom_ops_library``,
``onnx.reference``, ORT Web / mobile) run the function; ONNX Runtime with the
library registered runs the fused kernel instead (verified: a registered custom op
takes precedence over a model-local function). The results are the same op
contract (softmax_topk.h) either way.

``FusedSoftmaxTopK`` body: ``x / temperature``, then by the ``normalize`` and
``log_probs`` attributes (``If`` on attribute-valued constants) one of
Softmax→TopK, LogSoftmax→TopK, TopK→Softmax, TopK→LogSoftmax. A function call
must bind every output of the function (ONNX Runtime rejects fewer), so the body
has the two outputs our passes use; a node that also asks for the optional
log-normaliser is refused with an explanation.
``SampleTopKTopP`` has no portable body yet: the pass says so instead of
producing a model that only runs with the library.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from passes.registry import GraphPass, PassOptions, PassResult
from toolkit.errors import PassError

DOMAIN = "com.toolkit"
ONNX_OPSET = 21


@dataclasses.dataclass(frozen=True)
class PortableOptions(PassOptions):
    """Options of ``portable`` (none yet)."""


def _softmax_topk_function():
    from onnx import TensorProto, helper

    def attr_const(name: str, out: str, kind: str):
        node = helper.make_node("Constant", [], [out], **{kind: 0 if kind != "value_float" else 1.0})
        node.attribute[0].ref_attr_name = name
        return node

    def branch(name: str, first: str, second: str | None, topk_on: str) -> object:
        """Softmax-like op then TopK (second=None), or TopK then the softmax-like op."""
        out_v = helper.make_empty_tensor_value_info(f"{name}_values")
        out_i = helper.make_empty_tensor_value_info(f"{name}_indices")
        if second is None:
            nodes = [helper.make_node(first, ["scaled"], [f"{name}_p"], axis=-1),
                     helper.make_node("TopK", [f"{name}_p", "k1"], [f"{name}_values", f"{name}_indices"], axis=-1)]
        else:
            nodes = [helper.make_node("TopK", [topk_on, "k1"], [f"{name}_kept", f"{name}_indices"], axis=-1),
                     helper.make_node(second, [f"{name}_kept"], [f"{name}_values"], axis=-1)]
        return helper.make_graph(nodes, name, [], [out_v, out_i])

    def if_node(cond: str, then_g, else_g, outs: list[str]):
        return helper.make_node("If", [cond], outs, then_branch=then_g, else_branch=else_g)

    def nested(name: str, log_graph, plain_graph):
        node = if_node("use_log", log_graph, plain_graph, [f"{name}_v", f"{name}_i"])
        out_v = helper.make_empty_tensor_value_info(f"{name}_v")
        out_i = helper.make_empty_tensor_value_info(f"{name}_i")
        return helper.make_graph([node], name, [], [out_v, out_i])

    renorm = nested("renorm", branch("renorm_log", "", "LogSoftmax", "scaled"),
                    branch("renorm_plain", "", "Softmax", "scaled"))
    full = nested("full", branch("full_log", "LogSoftmax", None, ""), branch("full_plain", "Softmax", None, ""))
    nodes = [
        attr_const("k", "k0", "value_int"),
        helper.make_node("Constant", [], ["axis0"], value_ints=[0]),
        helper.make_node("Unsqueeze", ["k0", "axis0"], ["k1"]),
        attr_const("temperature", "t", "value_float"),
        helper.make_node("CastLike", ["t", "logits"], ["t_like"]),
        helper.make_node("Div", ["logits", "t_like"], ["scaled"]),
        attr_const("normalize", "normalize_i", "value_int"),
        helper.make_node("Cast", ["normalize_i"], ["use_renorm"], to=TensorProto.BOOL),
        attr_const("log_probs", "log_probs_i", "value_int"),
        helper.make_node("Cast", ["log_probs_i"], ["use_log"], to=TensorProto.BOOL),
        if_node("use_renorm", renorm, full, ["values", "indices"]),
    ]
    fn = helper.make_function(DOMAIN, "FusedSoftmaxTopK", ["logits"], ["values", "indices"], nodes,
                              [helper.make_opsetid("", ONNX_OPSET)], attributes=["k"])
    # Attributes with defaults (the op contract's), so nodes may omit them.
    for name, value in (("temperature", 1.0), ("normalize", 0), ("log_probs", 0)):
        fn.attribute_proto.append(helper.make_attribute(name, value))
    return fn


_BODIES = {"FusedSoftmaxTopK": _softmax_topk_function}


def apply(model: ir.Model, options: PortableOptions, *, explain: bool = False) -> PassResult:
    """Attach a function body for each toolkit op used; count = bodies attached."""
    used = sorted({n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == DOMAIN})
    missing = [op for op in used if op not in _BODIES]
    if missing:
        raise PassError(
            f"portable: no standard-ONNX body for {', '.join(missing)}; the model would only run with the "
            "toolkit op library",
            hint="drop --portable, or do not use the passes that insert these ops (e.g. sampling-head with "
            "sample=true)",
        )
    with_norm = [n for n in ir.traversal.RecursiveGraphIterator(model.graph)
                 if n.domain == DOMAIN and n.op_type == "FusedSoftmaxTopK" and len(n.outputs) > 2]
    if with_norm:
        raise PassError(
            f"portable: node {with_norm[0].name!r} uses FusedSoftmaxTopK's optional log_normalizer output, "
            "which the portable body does not provide",
            hint="drop --portable for this model, or compute the normaliser with ReduceLogSumExp instead",
        )
    count = 0
    for op in used:
        key = (DOMAIN, op, "")
        if key in model.functions:
            continue
        model.functions[key] = ir.serde.deserialize_function(_BODIES[op]())
        count += 1
    if count:
        model.opset_imports.setdefault("", ONNX_OPSET)
        model.opset_imports.setdefault(DOMAIN, 1)
    return PassResult(name=PASS.name, count=count, details={"ops": used})


PASS = GraphPass(
    name="portable",
    description="Attach a standard-ONNX function body to each com.toolkit op, so the model also runs without "
    "the op library",
    options_type=PortableOptions,
    apply=apply,
)
