"""``onnx.checker`` that accepts ONNX Runtime's own ops in the standard domain, and
models past protobuf's 2 GiB limit held in memory.

ONNX Runtime registers a few ops in the standard domain that onnx has no schema for,
most usefully ``SimplifiedLayerNormalization`` (RMSNorm), which onnxruntime-genai's
model builder, ORT's transformer optimizer and onnxscript's ORT fusions all emit.
``onnx.checker`` rejects any model holding one ("No Op registered for ..."), although
ONNX Runtime runs it, so every pass and ``toolkit parity`` refused such models as
invalid. :func:`check_model` checks them as ops of an unknown domain instead: the rest
of the model, and these nodes' place in the graph, are still checked; their attributes
and types are ONNX Runtime's to check when it loads the model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

# The domain the checker's copy moves those nodes to: unknown to onnx, so not checked.
_UNCHECKED_DOMAIN = "toolkit.unchecked.ort_standard_domain"
# Protocol buffers cannot serialize a message of 2 GiB or more, and onnx.checker
# serializes a model given in memory: a larger one is checked without its weights.
PROTOBUF_LIMIT = (1 << 31) - 1
# What a model holds besides its tensors' data (nodes, names, attributes, shapes): room
# left under the limit for it. Counting it exactly takes ByteSize, which serializes the
# whole message (measured: as long as SerializeToString, 1.5 s for 512 MB of weights),
# i.e. the very work the checker then does again.
_GRAPH_HEADROOM = 64 << 20


def exceeds_protobuf_limit(data_bytes: int) -> bool:
    """Whether a model whose tensors hold ``data_bytes`` may not serialize."""
    return data_bytes + _GRAPH_HEADROOM >= PROTOBUF_LIMIT


def _tensor_bytes(t: Any) -> int:
    """Bytes of a TensorProto's data, from the lengths of its fields (nothing serialized)."""
    return (len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data))
            + 8 * (len(t.int64_data) + len(t.double_data) + len(t.uint64_data)) + sum(map(len, t.string_data)))


def too_large_to_serialize(model: Any) -> bool:
    """Whether ``model`` may be past protobuf's 2 GiB serialization limit: its
    initializers' and Constant nodes' data, with headroom for the rest."""
    from toolkit.parity import all_graphs

    data = 0
    for graph in all_graphs(model):
        data += sum(_tensor_bytes(t) for t in graph.initializer)
        data += sum(_tensor_bytes(t) for node in graph.node for attr in node.attribute
                    for t in ([attr.t] if attr.HasField("t") else attr.tensors))
    return exceeds_protobuf_limit(data)


# ONNX Runtime's own ops in the standard domain that the producers above write. Its
# kernel registry lists others there too (Scale, Crop, ImageScaler ...: ONNX's removed
# experimental ops, which ORT refuses at current opsets, whatever the registry's version
# range says), so the list is explicit and checked against the registry.
_RUNTIME_STANDARD_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


@functools.cache
def runtime_only_ops() -> frozenset[str]:
    """ONNX Runtime's standard-domain ops that onnx has no schema for and this
    onnxruntime implements (of :data:`_RUNTIME_STANDARD_DOMAIN_OPS`)."""
    import onnx

    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        kernels = ort_c.get_all_opkernel_def()
    except (ImportError, AttributeError):  # a runtime without the kernel registry listing
        return frozenset()
    return frozenset(k.op_name for k in kernels if k.domain in ("", "ai.onnx") and
                     k.op_name in _RUNTIME_STANDARD_DOMAIN_OPS and not onnx.defs.has(k.op_name))


def _all_nodes(model: Any) -> list[Any]:
    """The nodes of the main graph, its subgraphs and the model's functions."""
    from toolkit.parity import all_graphs

    return [n for g in all_graphs(model) for n in g.node] + [n for f in model.functions for n in f.node]


def is_runtime_only(node: Any) -> bool:
    """Whether ``node`` is one of :func:`runtime_only_ops` (onnx has no schema for it)."""
    return node.domain in ("", "ai.onnx") and node.op_type in runtime_only_ops()


def _checkable_copy(model: Any) -> Any:
    """A copy of ``model`` whose runtime-only nodes are in an unknown domain, and whose
    main-graph initializers are graph inputs of the same type and shape (weights are
    neither copied nor, when external, looked for beside the current directory)."""
    import onnx

    shadow = onnx.ModelProto(ir_version=model.ir_version)
    shadow.opset_import.extend(model.opset_import)
    shadow.opset_import.add(domain=_UNCHECKED_DOMAIN, version=1)
    shadow.functions.extend(model.functions)
    for function in shadow.functions:
        function.opset_import.add(domain=_UNCHECKED_DOMAIN, version=1)
    src, graph = model.graph, shadow.graph
    graph.name = src.name
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(src, field))
    declared = {i.name for i in src.input}
    weights = [(t.name, t.data_type, t.dims) for t in src.initializer]
    weights += [(s.values.name, s.values.data_type, s.dims) for s in src.sparse_initializer]
    graph.input.extend(onnx.helper.make_tensor_value_info(name, dtype, list(dims))
                       for name, dtype, dims in weights if name not in declared)
    for node in _all_nodes(shadow):
        if is_runtime_only(node):
            node.domain = _UNCHECKED_DOMAIN
    return shadow


def check_model(model: Any, *, full_check: bool = False, path: str | Path | None = None) -> None:
    """``onnx.checker.check_model(model, full_check)``, except that ONNX Runtime's own
    standard-domain ops (:func:`runtime_only_ops`) are not checked against a schema, and
    that a model in memory past 2 GiB (weights loaded) is checked without its
    initializers' data, which onnx cannot serialize (as is one whose initializers are
    external references: in memory, onnx looks for their files beside the current
    directory). ``path``: the model's file, checked from there (external data is looked
    for beside it) when none of this applies. Raises what ``onnx.checker`` raises."""
    import onnx

    weightless = path is None and (too_large_to_serialize(model) or any(
        t.data_location == t.EXTERNAL for t in model.graph.initializer))  # (not looked for beside the cwd)
    if weightless or any(is_runtime_only(n) for n in _all_nodes(model)):
        onnx.checker.check_model(_checkable_copy(model), full_check=full_check)
        return
    onnx.checker.check_model(str(path) if path is not None else model, full_check=full_check)
