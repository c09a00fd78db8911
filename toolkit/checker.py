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


def too_large_to_serialize(model: Any) -> bool:
    """Whether ``model`` is at or past protobuf's 2 GiB serialization limit (the
    weights' raw bytes alone, else the whole message: ByteSize serializes, and fails
    past the limit)."""
    from google.protobuf.message import EncodeError

    if sum(len(t.raw_data) for t in model.graph.initializer) >= PROTOBUF_LIMIT:
        return True
    try:
        return model.ByteSize() >= PROTOBUF_LIMIT
    except EncodeError:
        return True


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


def _nodes(nodes: Any) -> Any:
    """``nodes`` and every node of their subgraphs (If / Loop / Scan bodies)."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _nodes(sub.node)


def _all_nodes(model: Any) -> Any:
    yield from _nodes(model.graph.node)
    for function in model.functions:
        yield from _nodes(function.node)


def _runtime_only(node: Any, ops: frozenset[str]) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in ops


def _checkable_copy(model: Any, ops: frozenset[str]) -> Any:
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
        if _runtime_only(node, ops):
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

    ops = runtime_only_ops()
    weightless = path is None and (too_large_to_serialize(model) or any(
        t.data_location == t.EXTERNAL for t in model.graph.initializer))  # (not looked for beside the cwd)
    if weightless or any(_runtime_only(n, ops) for n in _all_nodes(model)):
        onnx.checker.check_model(_checkable_copy(model, ops), full_check=full_check)
        return
    onnx.checker.check_model(str(path) if path is not None else model, full_check=full_check)
