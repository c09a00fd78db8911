"""``portable``: give every toolkit operator in the model a body in standard ONNX ops.

Each ``com.toolkit`` op used by the model gets a model-local ONNX function of the
same domain and name whose body is the unfused subgraph it replaced. Runtimes
without the op library (ONNX Runtime without ``register_custom_ops_library``,
``onnx.reference``, ORT Web / mobile) run the function; ONNX Runtime with the
library registered runs the fused kernel instead (verified: a registered custom op
takes precedence over a model-local function). The results are the same op
contract (softmax_topk.h) either way.

``FusedSoftmaxTopK`` body: ``x / temperature`` in float32, then by the ``normalize`` and
``log_probs`` attributes (``If`` on attribute-valued constants) one of
Softmax→TopK, LogSoftmax→TopK, TopK→Softmax, TopK→LogSoftmax. A function call
must bind every output of the function (ONNX Runtime rejects fewer), so the body
has the two outputs our passes use; a node that also asks for the optional
log-normaliser is refused with an explanation.
``SampleTopKTopP`` body: Softmax→TopK, then the kernel's sampling rule written
with CumSum / ArgMax masks and its SplitMix64 counter RNG in uint64 arithmetic:
the same token for the same seed. ``LowRankMatMul``: MatMul→MatMul(→Add).
``QuantKVAttention``: dequantize → attention → quantize the flushed residual, see
:mod:`passes.portable_kv`.

Bodies that depend on which optional inputs a node has (LowRankMatMul's bias, the
KV scheme's zero points and attention bias) are function *overloads* (ONNX IR 10)
named after that variant; ONNX Runtime resolves them. ``onnx.reference`` (1.23)
ignores overloads, so it runs the non-overloaded bodies only (FusedSoftmaxTopK,
SampleTopKTopP, LowRankMatMul without bias).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx import FunctionProto

from passes.function_builder import BOOL, DOUBLE, FLOAT, INT64, ONNX_OPSET, UINT64, FunctionBuilder
from passes.registry import GraphPass, PassOptions, PassResult
from toolkit.errors import PassError

DOMAIN = "com.toolkit"
NEWEST_BODY_OPSET = 23  # the newest model opset the bodies are checked at (tests/passes/test_kv_cache_sdpa.py)


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
        # in float32 as the kernel computes: a float16 temperature below ~3e-8 would be 0
        # (x / 0 = inf, then NaN probabilities) and float16 softmax sums lose precision
        helper.make_node("Cast", ["logits"], ["logits_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["logits_f", "t"], ["scaled"]),
        attr_const("normalize", "normalize_i", "value_int"),
        helper.make_node("Cast", ["normalize_i"], ["use_renorm"], to=TensorProto.BOOL),
        attr_const("log_probs", "log_probs_i", "value_int"),
        helper.make_node("Cast", ["log_probs_i"], ["use_log"], to=TensorProto.BOOL),
        if_node("use_renorm", renorm, full, ["values_f", "indices"]),
        helper.make_node("CastLike", ["values_f", "logits"], ["values"]),
    ]
    fn = helper.make_function(DOMAIN, "FusedSoftmaxTopK", ["logits"], ["values", "indices"], nodes,
                              [helper.make_opsetid("", ONNX_OPSET)], attributes=["k"])
    # Attributes with defaults (the op contract's), so nodes may omit them.
    for name, value in (("temperature", 1.0), ("normalize", 0), ("log_probs", 0)):
        fn.attribute_proto.append(helper.make_attribute(name, value))
    return fn


def _splitmix64(b: FunctionBuilder, z: str) -> str:
    """SplitMix64 on uint64 values (wrapping arithmetic), as sample_math.h."""
    def shift_xor(v: str, bits: int) -> str:
        return b.op("BitwiseXor", v, b.op("BitShift", v, b.const(bits, np.uint64), direction="RIGHT"))

    z = b.op("Add", z, b.const(0x9E3779B97F4A7C15, np.uint64))
    z = b.op("Mul", shift_xor(z, 30), b.const(0xBF58476D1CE4E5B9, np.uint64))
    z = b.op("Mul", shift_xor(z, 27), b.const(0x94D049BB133111EB, np.uint64))
    return shift_xor(z, 31)


def _first_true(b: FunctionBuilder, mask: str, otherwise: str) -> str:
    """Per row of ``mask [N, k]``: the index of its first true entry, else ``otherwise [N, 1]``."""
    as_float = b.op("Cast", mask, to=FLOAT)
    first = b.op("ArgMax", as_float, axis=1, keepdims=1)  # ties (all zero / all one): the first index
    has_any = b.op("Cast", b.op("ReduceMax", as_float, b.const([1]), keepdims=1), to=BOOL)
    return b.op("Where", has_any, first, otherwise)


def _sample_topk_function() -> FunctionProto:
    """SampleTopKTopP (sample_topk.h): softmax → top-k, then sample_math.h's draw, vectorised.

    Each loop of ``SamplePosition`` stops at the first index where a condition
    holds, so it becomes "first true entry" of a mask; its running sums are the
    float64 ``CumSum`` of the candidates (sequential, the kernel's order), which
    keeps the draw identical to the kernel's for a given seed.
    """
    b = FunctionBuilder()
    one = b.const([1])
    x = b.op("Cast", "logits", to=FLOAT)
    probs = b.op("Softmax", b.op("Div", x, b.attr("temperature", "value_float")), axis=-1)
    k1 = b.op("Unsqueeze", b.attr("k", "value_int"), b.const([0]))
    values, indices = b.op("TopK", probs, k1, outputs=2, axis=-1)
    rows_by_k = b.op("Concat", b.const([-1]), k1, axis=0)
    values = b.reshape(values, rows_by_k)  # [N, k]
    indices = b.reshape(indices, rows_by_k)
    p = b.op("Cast", values, to=DOUBLE)
    col = b.op("Range", b.const(0), b.attr("k", "value_int"), b.const(1))  # [k]
    # m: the prefix of valid candidates (p > 0 after the first)
    positive = b.op("Or", b.op("Equal", col, b.const(0)), b.op("Greater", p, b.const(0.0, np.float64)))
    axis1 = b.const(1)  # CumSum takes a scalar axis
    broken = b.op("CumSum", b.op("Cast", b.op("Not", positive), to=INT64), axis1)
    m = b.op("ReduceSum", b.op("Cast", b.op("Equal", broken, b.const(0)), to=INT64), one, keepdims=1)  # [N, 1]
    mass_upto = b.op("CumSum", p, axis1)
    total = b.op("GatherElements", mass_upto, b.op("Sub", m, b.const(1)), axis=1)
    # n: the shortest prefix (within m) whose mass reaches top_p of the top-k mass
    target_mass = b.op("Mul", b.op("Cast", b.attr("top_p", "value_float"), to=DOUBLE), total)
    reached = b.op("And", b.op("GreaterOrEqual", mass_upto, target_mass), b.op("Less", col, m))
    n = b.op("Add", _first_true(b, reached, b.op("Sub", m, b.const(1))), b.const(1))
    # q: those of the n with p >= min_p * p0 (the first always; transformers' order: top-p, then min-p)
    p0 = b.op("Slice", p, b.const([0]), one, one)
    floor_p = b.op("Mul", b.op("Cast", b.attr("min_p", "value_float"), to=DOUBLE), p0)
    dropped = b.op("And", b.op("Less", p, floor_p), b.op("Greater", col, b.const(0)))
    q = _first_true(b, b.op("Or", dropped, b.op("GreaterOrEqual", col, n)), n)
    kept = b.op("GatherElements", mass_upto, b.op("Sub", q, b.const(1)), axis=1)
    # u: the counter-based uniform of (seed, row), or of (seed[row], 0) with a seed per row
    rows = b.op("Range", b.const(0), b.op("Squeeze", b.dim(p, 0, 1), b.const([0])), b.const(1))
    one_seed = b.op("Equal", b.op("Size", "seed"), b.const(1))
    counter = b.op("Where", one_seed, rows, b.const(0))  # (Where has no uint64 kernel in ORT)
    counter = b.op("Unsqueeze", b.op("Cast", counter, to=UINT64), one)  # [N, 1]
    seeds = b.reshape(b.op("Cast", "seed", to=UINT64), b.const([-1, 1]))  # [1, 1] or [N, 1]
    # the first node that meets a seed count other than 1 or N: its name is the runtime's error message
    mixed = b.op("BitwiseXor", _splitmix64(b, seeds), counter,
                 node_name="SampleTopKTopP_seed_must_have_1_element_or_1_per_row_of_logits")
    bits = _splitmix64(b, mixed)
    u = b.op("Mul", b.op("Cast", b.op("BitShift", bits, b.const(11, np.uint64), direction="RIGHT"), to=DOUBLE),
             b.const(1.0 / 9007199254740992.0, np.float64))
    # j: the first candidate (within q) whose running mass passes u * kept
    passed = b.op("And", b.op("Greater", mass_upto, b.op("Mul", u, kept)), b.op("Less", col, q))
    j = _first_true(b, passed, b.op("Sub", q, b.const(1)))
    lead = b.dim("logits", 0, -1)
    b.rename(b.reshape(b.op("GatherElements", indices, j, axis=1), lead), "token_ids")
    b.rename(b.reshape(b.op("GatherElements", values, j, axis=1), lead), "token_probs")
    return b.function(DOMAIN, "SampleTopKTopP", ["logits", "seed"], ["token_ids", "token_probs"],
                      {"k": None, "temperature": 1.0, "top_p": 1.0, "min_p": 0.0, "seed": 0})


def _lowrank_overload(with_bias: bool, int8: bool) -> str:
    return "_".join((["int8"] if int8 else []) + (["bias"] if with_bias else []))


def _lowrank_function(with_bias: bool, int8: bool = False) -> FunctionProto:
    """LowRankMatMul (lowrank_matmul.h): ``(x · U) · V (+ bias)``, float16 weights widened,
    int8 weights dequantized per column as ``float(codes) * scale``: the same float32
    values as DequantizeLinear(axis=1), a form ONNX Runtime's optimizer does not turn into
    MatMulNBits (which, at its default accuracy level 4, also rounds the activations to
    int8: about 1% logit error on llama-stdlib, flipped tokens)."""
    b = FunctionBuilder()
    if int8:
        u = b.op("Mul", b.op("CastLike", "U", "x"), "U_scale")
        v = b.op("Mul", b.op("CastLike", "V", "x"), "V_scale")
    else:
        u, v = b.op("CastLike", "U", "x"), b.op("CastLike", "V", "x")
    y = b.op("MatMul", b.op("MatMul", "x", u), v)
    if with_bias:
        y = b.op("Add", y, "bias")
    b.rename(y, "y")
    inputs = ["x", "U", "V"] + (["bias"] if with_bias else []) + (["U_scale", "V_scale"] if int8 else [])
    return b.function(DOMAIN, "LowRankMatMul", inputs, ["y"], overload=_lowrank_overload(with_bias, int8))


def _body_for(node: ir.Node, model: ir.Model) -> tuple[str, Callable[[], FunctionProto]] | None:
    """(overload, body factory) for a toolkit node, or None when no body exists.

    Most bodies read the node's attributes at run time (``ref_attr_name``), so one
    function serves every node of the op. Where an op's optional inputs change the
    computation, the node gets an *overload* (ONNX IR 10 function overloads, which
    ONNX Runtime resolves) specialised for it.
    """
    present = [v is not None for v in node.inputs]
    if node.op_type == "FusedSoftmaxTopK":
        return "", _softmax_topk_function
    if node.op_type == "SampleTopKTopP":
        return "", _sample_topk_function
    if node.op_type == "LowRankMatMul":
        with_bias = len(present) > 3 and present[3]
        int8 = len(present) > 4 and present[4]
        return _lowrank_overload(with_bias, int8), lambda: _lowrank_function(with_bias, int8)
    if node.op_type == "QuantKVAttention":
        from passes.portable_kv import kv_attention_function, overload_name

        if len(present) > 12 and present[12]:
            raise PassError(
                f"portable: node {node.name!r} uses QuantKVAttention's fixed-capacity cache (input "
                f"{node.inputs[12].name!r}), which appends in place; standard ONNX ops cannot",
                hint="convert without --kv-capacity (the growing cache) for a portable model")
        if node.attributes.get_int("quantize_query", 0):
            raise PassError(
                f"portable: node {node.name!r} has QuantKVAttention attribute quantize_query=1 (int8 query), "
                "which the portable function does not implement",
                hint="convert without --kv-quantize-query for a portable model")

        return overload_name(node), lambda: kv_attention_function(node)
    return None


def _bind_default_seed(node: ir.Node, model: ir.Model) -> None:
    """A SampleTopKTopP without the seed input gets its attribute as a constant input.

    Same draw for the kernel (input 1 overrides the attribute with the same value);
    the function body then always has its seed.
    """
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return
    attr = node.attributes.get("seed")
    seed = 0 if attr is None else attr.as_int()
    value = ir.Value(name=f"{node.name or 'SampleTopKTopP'}/seed", type=ir.TensorType(ir.DataType.INT64),
                     shape=ir.Shape([1]), const_value=ir.tensor(np.array([seed], np.int64)))
    model.graph.register_initializer(value)
    if len(node.inputs) > 1:
        node.replace_input_with(1, value)
    else:
        node.resize_inputs(2)
        node.replace_input_with(1, value)


def _bind_zero_bias(node: ir.Node, model: ir.Model) -> None:
    """An int8 LowRankMatMul without bias gets a zero bias (input 3).

    Its scales come after the optional bias, and ONNX Runtime's function inlining
    does not bind formal inputs after an empty one correctly (measured: wrong outputs,
    no error); y + 0 is y, so a zero bias changes nothing but lets every int8 node
    use the one ``int8_bias`` body.
    """
    if len(node.inputs) < 6 or node.inputs[4] is None or node.inputs[3] is not None:
        return
    scale = node.inputs[5]
    n = scale.shape[0] if scale is not None and scale.shape is not None and len(scale.shape) == 1 else None
    if n is None and scale is not None and scale.const_value is not None:
        n = scale.const_value.shape[0]
    if not isinstance(n, int):
        raise PassError(f"portable: node {node.name!r} (LowRankMatMul, int8) has no bias and V_scale has no "
                        "static length, so no zero bias can stand in for it",
                        hint="give V_scale a static shape [N] (it is a constant in models from the low-rank pass)")
    value = ir.Value(name=f"{node.name or 'LowRankMatMul'}/zero_bias", type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape([n]), const_value=ir.tensor(np.zeros(n, np.float32)))
    model.graph.register_initializer(value)
    node.replace_input_with(3, value)


def _spell_out_defaults(node: ir.Node, function: ir.Function) -> None:
    """Give the node every attribute the body reads, at the op's default where it has none.

    The kernel sees the values it would have defaulted to anyway; runtimes that do not
    apply function attribute defaults (onnx.reference) then find every value.
    """
    for name, attr in function.attributes.items():
        if name not in node.attributes and attr.value is not None:
            node.attributes[name] = ir.Attr(name, attr.type, attr.value)


def apply(model: ir.Model, options: PortableOptions, *, explain: bool = False) -> PassResult:
    """Attach a function body for each toolkit op used; count = bodies attached."""
    nodes = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == DOMAIN]
    missing = sorted({n.op_type for n in nodes if _body_for(n, model) is None})
    if missing:
        raise PassError(
            f"portable: no standard-ONNX body for {', '.join(missing)}; the model would only run with the "
            "toolkit op library",
            hint="drop --portable, or do not use the passes that insert these ops",
        )
    with_norm = [n for n in nodes if n.op_type == "FusedSoftmaxTopK" and len(n.outputs) > 2]
    if with_norm:
        raise PassError(
            f"portable: node {with_norm[0].name!r} uses FusedSoftmaxTopK's optional log_normalizer output, "
            "which the portable body does not provide",
            hint="drop --portable for this model, or compute the normaliser with ReduceLogSumExp instead",
        )
    opset = model.opset_imports.get("", 0)
    if nodes and not ONNX_OPSET <= opset <= NEWEST_BODY_OPSET:
        raise PassError(
            f"portable: the function bodies are written in ONNX opsets {ONNX_OPSET} to {NEWEST_BODY_OPSET}, and the "
            f"model imports opset {opset}; a model-local function must import its model's opset",
            hint=f"convert with --opset {ONNX_OPSET} (the default) to {NEWEST_BODY_OPSET} (an ONNX file input: "
                 "export it at one of those opsets), or drop --portable",
        )
    count = 0
    for node in nodes:
        if node.op_type == "SampleTopKTopP":
            _bind_default_seed(node, model)
        if node.op_type == "LowRankMatMul":
            _bind_zero_bias(node, model)
        overload, factory = _body_for(node, model)
        node.overload = overload
        key = (DOMAIN, node.op_type, overload)
        if key not in model.functions:
            model.functions[key] = ir.serde.deserialize_function(factory())
            # onnx.checker wants a function to import its model's opset; the bodies' ops
            # mean the same in opsets 21 to 23 (22 and 23 add types, not semantics)
            model.functions[key].opset_imports[""] = opset
            count += 1
        _spell_out_defaults(node, model.functions[key])
    if count:
        model.opset_imports.setdefault("", ONNX_OPSET)
        model.opset_imports.setdefault(DOMAIN, 1)
        model.ir_version = max(model.ir_version, 10)  # function overloads are an IR 10 feature
    used = sorted({n.op_type for n in nodes})
    return PassResult(name=PASS.name, count=count, details={"ops": used})


PASS = GraphPass(
    name="portable",
    description="Attach a standard-ONNX function body to each com.toolkit op, so the model also runs without "
    "the op library",
    options_type=PortableOptions,
    apply=apply,
)
