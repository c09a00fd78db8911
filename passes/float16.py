"""``float16``: run the model's float32 computation in float16.

The conversion itself is ONNX Runtime's (``onnxruntime.transformers.float16.
convert_float_to_float16``), with its default block list plus the ``com.toolkit`` ops
that take float32 only (``toolkit.ops.FLOAT32_ONLY_OPS``: ``QuantKVAttention``,
``LowRankMatMul``, ``SampleTopKTopP``): those stay float32 islands behind Casts. The
converter keeps the weights only they read float32; ``LowRankMatMul`` reads float16
factors itself, so the pass makes its factors float16. ``FusedSoftmaxTopK`` takes
float16 and is converted. By default the model's inputs and outputs keep their float32 type
(``keep_io_types``), so hosts, ``toolkit parity`` and ``toolkit generate`` feed it as
before; the KV cache I/O of a model without ``--kv-cache`` therefore stays float32.

Two repairs of the converter's output, both measured on converted models (an audit):

* it appends the Casts of the inputs after the nodes that read them: the graph is
  sorted again (ONNX requires topological order; ONNX Runtime tolerates it, the
  checker and every ``toolkit`` command do not);
* a float32 value that only passes through (a cache input read by a float32 op, a
  float32 op's output that is a graph output) gets a ``Cast(float16) -> Cast(float32)``
  round trip, which rounded the quantized cache's full-precision residual window to
  float16. Every such pair is removed: the value is read (or written) as it was.

The pass records ``toolkit.float16`` in the metadata, and the parity profile ``fp16``
unless a pass recorded a looser one (a quantized cache's).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from passes.registry import GraphPass, PassOptions, PassResult
from toolkit.errors import PassError


@dataclasses.dataclass(frozen=True)
class Float16Options(PassOptions):
    """Options of ``float16``."""

    keep_io_types: bool = dataclasses.field(
        default=True,
        metadata={"help": "keep the model's float32 inputs and outputs (logits, KV cache) float32"})

    def validate(self) -> None:
        if not isinstance(self.keep_io_types, bool):
            raise PassError(f"float16 option 'keep_io_types' must be a bool, got {self.keep_io_types!r}",
                            hint="set keep_io_types=true or keep_io_types=false")


def _float32_weights(graph: ir.Graph) -> int:
    """Float32 initializers some node reads (weights an earlier pass replaced wait for cleanup)."""
    return sum(1 for v in graph.initializers.values()
               if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and v.uses())


def _is_cast(node: ir.Node | None, to: ir.DataType) -> bool:
    return (node is not None and node.op_type == "Cast" and node.domain in ("", "ai.onnx")
            and node.attributes.get_int("to", -1) == to)


def _drop_round_trips(graph: ir.Graph) -> int:
    """Remove ``Cast(float32) <- Cast(float16) <- x`` (x float32) by reading x; returns the
    number of outer Casts removed. A round trip onto a graph output makes x's producer
    write the output, unless x is a graph input or is itself a graph output."""
    removed = 0
    for outer in list(graph):
        if not _is_cast(outer, ir.DataType.FLOAT):
            continue
        inner = outer.inputs[0].producer() if outer.inputs[0] is not None else None
        if not _is_cast(inner, ir.DataType.FLOAT16) or inner.inputs[0] is None:
            continue
        x, y = inner.inputs[0], outer.outputs[0]
        if x.dtype != ir.DataType.FLOAT:
            continue
        if y.is_graph_output():
            if x.is_graph_input() or x.is_graph_output() or x.producer() is None:
                continue
            name = y.name
            for i, out in enumerate(graph.outputs):
                if out is y:
                    graph.outputs[i] = x
            y.name = None
            x.name = name
        ir.convenience.replace_all_uses_with(y, x)
        graph.remove(outer, safe=True)
        if not inner.outputs[0].uses():
            graph.remove(inner, safe=True)
        removed += 1
    return removed


def _float16_factors(graph: ir.Graph) -> int:
    """``LowRankMatMul`` takes float16 factors and widens them exactly in the kernel, but
    ORT's converter keeps the weights of a blocked op float32 (behind a no-op Cast): the
    factors of each such op become float16 initializers read directly (rounded like every
    other weight of the model, within float16's range), so they are half the bytes in
    memory too. Returns the number of ops rewired."""
    import numpy as np

    rewired = 0
    for node in graph:
        if node.domain != "com.toolkit" or node.op_type != "LowRankMatMul" or len(node.inputs) < 3:
            continue
        casts = [node.inputs[i].producer() if node.inputs[i] is not None else None for i in (1, 2)]
        sources = [c.inputs[0] if _is_cast(c, ir.DataType.FLOAT) else None for c in casts]
        if not all(v is not None and v.const_value is not None and len(v.uses()) == 1 and not v.is_graph_input()
                   and v.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) for v in sources):
            continue  # (int8 factors, or factors shared with another reader)
        for i, cast, weight in zip((1, 2), casts, sources):
            if weight.const_value.dtype == ir.DataType.FLOAT:
                half = np.clip(weight.const_value.numpy(), -65504.0, 65504.0).astype(np.float16)
                weight.const_value = ir.tensor(half, name=weight.name)
            weight.type = ir.TensorType(ir.DataType.FLOAT16)
            node.replace_input_with(i, weight)
            if not cast.outputs[0].uses() and not cast.outputs[0].is_graph_output():
                graph.remove(cast, safe=True)
        rewired += 1
    return rewired


# Names ONNX Runtime's converter gives the Casts it adds (value / node name prefixes).
_CONVERTER_PREFIXES = ("graph_input_cast", "graph_output_cast")


def _rename_converter_names(graph: ir.Graph) -> None:
    """A float16 model written by ORT's converter (by hand) holds values and nodes named
    ``graph_input_cast_0`` ...; converting it again would name new ones the same (a
    redeclared output). Its inner values and nodes are renamed out of the way."""
    io = {id(v) for v in (*graph.inputs, *graph.outputs)}
    for node in graph:
        if (node.name or "").startswith(_CONVERTER_PREFIXES):
            node.name = f"toolkit_{node.name}"
        for value in node.outputs:
            if id(value) not in io and (value.name or "").startswith(_CONVERTER_PREFIXES):
                value.name = f"toolkit_{value.name}"


# Ops whose constant inputs are weights (a constant elsewhere may be a mask fill of
# -3.4e38 or -1e9, which clamping to -65504 keeps a mask).
_WEIGHT_READERS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "Einsum", "LowRankMatMul"})


def _refuse_out_of_range(graph: ir.Graph) -> None:
    """A float32 weight (a constant that a MatMul, Gemm, Conv, Gather ... reads, in any
    graph or subgraph, initializer or Constant node) with finite values beyond float16's
    range (65504) would be clamped silently by the converter, and its results overflow
    to inf / NaN: refused, naming the weights."""
    import numpy as np

    bad = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type not in _WEIGHT_READERS:
            continue
        for value in node.inputs:
            tensor = ir.convenience.get_const_tensor(value) if value is not None else None  # (or Constant)
            if tensor is None or tensor.dtype != ir.DataType.FLOAT or value.name in bad:
                continue
            array = np.abs(tensor.numpy())
            peak = float(np.max(array, initial=0.0, where=np.isfinite(array)))
            if peak > 65504.0:
                bad[value.name] = peak
    if bad:
        listed = ", ".join(f"{name!r} (|w| up to {peak:.4g})"
                           for name, peak in sorted(bad.items(), key=lambda kv: -kv[1])[:5])
        raise PassError(f"float16: {len(bad)} weight{'s hold' if len(bad) > 1 else ' holds'} values beyond "
                        f"float16's range (65504), which the conversion would clamp: {listed}",
                        hint="leave out --float16 (float32), or rescale those layers in the source model")


def apply(model: ir.Model, options: Float16Options, *, explain: bool = False) -> PassResult:
    """Convert in place; count = float32 weights converted to float16."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from toolkit.checker import too_large_to_serialize
    from toolkit.ops import FLOAT32_ONLY_OPS

    del explain
    if model.metadata_props.get("toolkit.float16") == "1":
        done = "the model is float16 already (its metadata toolkit.float16 says so): nothing to convert"
        return PassResult(name=PASS.name, count=0, explanations=[done])
    if model.functions:
        raise PassError("float16: the model has local functions (" + ", ".join(sorted(
            f"{d}::{n}" for d, n, _ in model.functions)) + "); the converter does not convert their bodies",
                        hint="run float16 before portable (`toolkit convert --float16 --portable` does)")
    _refuse_out_of_range(model.graph)
    _rename_converter_names(model.graph)
    before = _float32_weights(model.graph)
    proto = ir.serde.serialize_model(model)
    # The converter's shape inference serializes the model, which cannot pass 2 GB; the
    # exporter's and the passes' type annotations are what it needs without it.
    converted = convert_float_to_float16(proto, keep_io_types=options.keep_io_types,
                                         disable_shape_infer=too_large_to_serialize(proto),
                                         op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FLOAT32_ONLY_OPS])
    result = ir.serde.deserialize_model(converted)
    result.graph.sort()
    round_trips = _drop_round_trips(result.graph)
    factors = _float16_factors(result.graph)
    model.graph = result.graph
    after = _float32_weights(model.graph)
    model.metadata_props["toolkit.float16"] = "1"
    model.metadata_props.setdefault("toolkit.parity_profile", "fp16")
    past = [v for v in model.graph.inputs if (v.name or "").startswith("past_key_values.")]
    if model.metadata_props.get("toolkit.kv_cache") == "fp32" and past and all(
            v.dtype == ir.DataType.FLOAT16 for v in past):  # keep_io_types=false: a float16 cache
        model.metadata_props["toolkit.kv_cache"] = "fp16"
    kept = [n.op_type for n in model.graph if n.domain == "com.toolkit" and n.op_type in FLOAT32_ONLY_OPS]
    return PassResult(name=PASS.name, count=before - after, details={
        "float32_weights_converted": before - after, "float32_weights_kept": after,
        "float32_ops_kept": len(kept), "cast_round_trips_removed": round_trips,
        "low_rank_ops_with_float16_factors": factors})


PASS = GraphPass(
    name="float16",
    description="Run the float32 computation in float16 (ONNX Runtime's converter), keeping the com.toolkit "
    "ops that take float32 and, by default, the model's I/O types",
    options_type=Float16Options,
    apply=apply,
)
