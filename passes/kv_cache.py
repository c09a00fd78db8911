"""``kv-cache``: attention over a quantized KV cache (``com.toolkit::QuantKVAttention``).

Rewrites the eager attention of an exported decoder (``toolkit export``; the raw form
described in ENVIRONMENT.md, the same for our models and Hugging Face GPT-2, Llama,
Qwen2, Mistral and Phi-3)::

    present.{i}.key   = Concat(past_key_values.{i}.key, k_new, axis=2)   # graph output
    present.{i}.value = Concat(past_key_values.{i}.value, v_new, axis=2)  # graph output
    k_rep, v_rep      = [Unsqueeze(axis 2) -> Expand -> Reshape](present.*)  # GQA repeat_kv, or nothing
    scores            = Add(Mul(MatMul(q, Transpose(k_rep, perm=[0,1,3,2])), scale), bias)
    out               = MatMul(Softmax(scores, axis=-1), v_rep)

and the forms exporters write for SDPA (Hugging Face ``attn_implementation="sdpa"``):
torch's dynamo decomposition (keys transposed by Reshape -> Transpose -> Reshape with
shapes read from the keys, checked symbolically; ``sqrt(scale)`` on q and k; a NaN guard
``Where(IsNaN(p), 0, p)`` after the Softmax), an ONNX ``Attention`` node (opset >= 23;
a boolean mask becomes an additive bias) and the TorchScript exporter's form (Shape
nodes on the repeated values that size the output are pointed at the op's output),

into one ``QuantKVAttention(q, k_new, v_new, <cache>, bias)`` per layer, and changes
the model's cache I/O from ``past_key_values.{i}.key/value`` to the quantized layout
of ``toolkit/ops/kv_quant.py`` (``past_key_values.{i}.key_q`` ... ``value_res`` in,
``present.{i}.*`` out). ``Shape`` nodes that read the old cache tensors (exporters
compute the past length from them) are rebuilt from the new tensors.

The pass changes the model's I/O, so it is opt-in (``toolkit convert --kv-cache``).
Either every layer is rewritten or none: a layer that does not match raises a
:class:`PassError` naming the node and why.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import numpy as np
import onnx_ir as ir

from passes import kv_cache_gqa
from passes.registry import GraphPass, PassOptions, PassResult
from passes.rule_application import describe_node
from toolkit.errors import PassError
from toolkit.ops import FLOAT32_ONLY_OPS, kv_quant

DOMAIN = "com.toolkit"
_PAST = re.compile(r"^past_key_values\.(\d+)\.key$")
_REPEAT_OPS = ("Unsqueeze", "Expand", "Reshape")
PROFILE = {8: "kv-int8", 4: "kv-int4", 2: "kv-2bit"}
GROUPS = (8, 16, 32, 64, 128)  # the group sizes the op takes (KIVI uses 32 to 128)


@dataclasses.dataclass(frozen=True)
class KVCacheOptions(PassOptions):
    """Options of ``kv-cache``."""

    scheme: str = dataclasses.field(
        default="kivi4", metadata={"help": f"cache scheme: {', '.join(kv_quant.PRESETS)}"})
    group: int = dataclasses.field(
        default=0, metadata={"help": "group size G: tokens per key group (KIVI), channels per group (int4 keys and "
                                     "values, KIVI values: min(G, head dim)); int4: at most the head dim; not for "
                                     f"int8 (one scale per token); 0: {kv_quant.DEFAULT_GROUP}, channel groups "
                                     "capped to the head dim"})
    residual: int = dataclasses.field(
        default=-1, metadata={"help": "full-precision residual window R: recent tokens kept unquantized, "
                                      "quantized when the window fills; -1: the scheme's default (128 for "
                                      "int4 and KIVI, none for int8); KIVI needs a multiple of G"})
    quantize_query: bool = dataclasses.field(
        default=False, metadata={"help": "round the query to int8 per row (QuantKVAttention quantize_query=1): "
                                         "integer QK dot products for int8 keys on CPU; not with --portable"})
    capacity: int = dataclasses.field(
        default=0, metadata={"help": "fixed cache capacity in tokens (0: the cache grows every step); the "
                                     "cache tensors keep their shape and a host can update them in place"})

    def validate(self) -> None:
        if self.scheme not in kv_quant.PRESETS:
            raise PassError(f"kv-cache: unknown scheme {self.scheme!r}",
                            hint=f"use one of {', '.join(kv_quant.PRESETS)} (e.g. --kv-cache kivi4)")
        if self.group not in (0, *GROUPS):
            raise PassError(f"kv-cache: group={self.group} is not supported",
                            hint="use --kv-group 32, 64 or 128 (KIVI's sizes; 8 and 16 for small heads)")
        if self.group and self.scheme.startswith("int8"):
            raise PassError(f"kv-cache: group={self.group} does not apply to scheme {self.scheme}: int8 has one "
                            "scale per token row, no groups",
                            hint="drop --kv-group (it sets the groups of int4, kivi4 and kivi2)")
        group = self.effective_group
        if self.residual < -1:
            raise PassError(f"kv-cache: residual={self.residual} must be >= 0 (or -1 for the scheme's default)",
                            hint="e.g. --kv-residual 128")
        if self.scheme.startswith("kivi") and self.residual != -1 and (
                self.residual < group or self.residual % group):
            raise PassError(f"kv-cache: residual={self.residual} must be a positive multiple of group={group}",
                            hint="e.g. --kv-group 32 --kv-residual 128")
        if self.capacity < 0:
            raise PassError(f"kv-cache: capacity={self.capacity} must be 0 (growing cache) or a positive number of "
                            "tokens", hint="e.g. --kv-capacity 4096")
        # The quantized slots fill a residual window (R tokens) at a time: fewer than R
        # slots are never used, and slots past a multiple of R are dead weight. KIVI's R
        # is a positive multiple of G (above), so this also gives whole key groups; a
        # separate group rule, checked first, named capacities this one then refused.
        window = (self.residual if self.residual != -1 else
                  (0 if self.scheme.startswith("int8") else kv_quant.LOW_BIT_RESIDUAL))
        if self.capacity and window and self.capacity % window:
            fit = max(window, self.capacity // window * window)
            raise PassError(
                f"kv-cache: capacity={self.capacity} is not a multiple of the residual window {window}: the "
                f"quantized slots fill {window} tokens at a time, so only {self.capacity // window * window} of "
                f"them could ever be used",
                hint=f"use --kv-capacity {fit} or {fit + window} (or a smaller --kv-residual)")

    @property
    def effective_group(self) -> int:
        """G as given, or the default for 0 (which the pass caps to the head dim)."""
        return self.group or kv_quant.DEFAULT_GROUP


@dataclasses.dataclass
class Layer:
    index: int
    past_k: ir.Value
    past_v: ir.Value
    concat_k: ir.Node | None  # None for GroupQueryAttention (``gqa``)
    concat_v: ir.Node | None
    query: ir.Value | None
    scale: float
    bias: ir.Value | None
    out: ir.Value
    remove: list[ir.Node]
    shape_users: list[tuple[ir.Node, str]]  # (Shape node, "past" | "present") of the key or value
    form: str = "eager"  # "eager" (MatMul ... Softmax ... MatMul, any key transpose) or "attention" (ONNX Attention)
    key_path: list[ir.Node] = dataclasses.field(default_factory=list)  # keys^T [-> Mul] -> MatMul(q, .)
    key_scale: float = 1.0  # the part of ``scale`` that key_path's Mul applies (SDPA's sqrt(scale) on K^T)
    repeat_k: list[ir.Node] = dataclasses.field(default_factory=list)  # repeat_kv (Unsqueeze, Expand, Reshape)
    repeat_v: list[ir.Node] = dataclasses.field(default_factory=list)  # after each Concat, or nothing
    dead_k: list[ir.Node] = dataclasses.field(default_factory=list)  # shape arithmetic that served only the
    dead_v: list[ir.Node] = dataclasses.field(default_factory=list)  # attention, from the repeated keys / values
    bool_mask: bool = False  # the bias is an ONNX Attention boolean mask (True: attend)
    out_shapes: list[ir.Node] = dataclasses.field(default_factory=list)  # Shape of repeated K/V read for B, H, D only
    gqa: kv_cache_gqa.Layer | None = None  # onnxruntime-genai's GroupQueryAttention (passes/kv_cache_gqa.py)


class NoMatch(Exception):
    pass


class SlicedCache(NoMatch):
    """The past is cut before attention (a cache capped to a window)."""


SLICED_CACHE_HINT = ("re-export with `toolkit export` (it keeps the whole past and applies a sliding window in "
                     "the attention mask), or convert without this pass")


def _const_scalar(value: ir.Value | None) -> float | None:
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    arr = tensor.numpy()
    if arr.size != 1:
        return None
    return float(arr.reshape(()))


def _int_list(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def _split_uses(value: ir.Value) -> tuple[list[ir.Node], list[ir.Node]]:
    """(Shape consumers, other consumers) of ``value``."""
    shapes, others = [], []
    for use in value.uses():
        (shapes if use.node.op_type == "Shape" and use.node.domain in ("", "ai.onnx") else others).append(use.node)
    return shapes, others


def _only_use(value: ir.Value, what: str, graph_output_ok: bool = False) -> ir.Node:
    uses = value.uses()
    if (value.is_graph_output() and not graph_output_ok) or len(uses) != 1:
        users = ", ".join(describe_node(u.node) for u in uses) or "none"
        raise NoMatch(f"{what} {value.name!r} must have exactly one consumer (has: {users}"
                       f"{'; it is a graph output' if value.is_graph_output() else ''})")
    return uses[0].node


def _cache_concat(graph_outputs: dict[str, ir.Value], past: ir.Value, present_name: str
                  ) -> tuple[ir.Node, list, list[ir.Node]]:
    """(the Concat(past, new) that makes the present, the Shape readers of the past, nodes
    that die with it: a one-input Concat, an identity the TorchScript exporter writes first)."""
    shapes, others = _split_uses(past)
    extra: list[ir.Node] = []
    if (len(others) == 1 and others[0].op_type == "Concat" and len(others[0].inputs) == 1
            and others[0].domain in ("", "ai.onnx") and not others[0].outputs[0].is_graph_output()):
        extra = [others[0]]
        past = others[0].outputs[0]
        more, others = _split_uses(past)
        shapes += more
    if any(n.op_type == "Slice" for n in others):
        raise SlicedCache(f"input {past.name!r} is sliced before attention ("
                           f"{', '.join(describe_node(n) for n in others)}): a cache cut to a window (sliding-window "
                           "attention exported with a capped cache) is not supported")
    if len(others) != 1 or others[0].op_type != "Concat":
        raise NoMatch(f"input {past.name!r} is read by {', '.join(describe_node(n) for n in others) or 'nothing'};"
                       " expected one Concat(past, new, axis=2) (a flat KV cache from `toolkit export`)")
    concat = others[0]
    axis = concat.attributes.get_int("axis", 0)
    if len(concat.inputs) != 2 or concat.inputs[0] is not past or axis not in (2, -2):
        why = (f"it has {len(concat.inputs)} inputs" if len(concat.inputs) != 2 else
               f"its first input is {concat.inputs[0].name!r}" if concat.inputs[0] is not past else f"axis={axis}")
        raise NoMatch(f"{describe_node(concat)} is not Concat(past, new) on axis 2 ({why})")
    out = concat.outputs[0]
    if graph_outputs.get(present_name) is not out:
        raise NoMatch(f"{describe_node(concat)} does not produce the graph output {present_name!r}")
    return concat, [(n, "past") for n in shapes], extra


def _repeat_chain(present: ir.Value, what: str) -> tuple[ir.Value, list[ir.Node], list]:
    """Follow Hugging Face repeat_kv (Unsqueeze axis 2 -> Expand -> Reshape) from ``present``."""
    shapes, others = _split_uses(present)
    shape_users = [(n, "present") for n in shapes]
    if len(others) != 1:
        raise NoMatch(f"{what} cache {present.name!r} has {len(others)} non-Shape consumers "
                       f"({', '.join(describe_node(n) for n in others)}); expected the attention alone")
    node = others[0]
    if node.op_type != "Unsqueeze":
        return present, [], shape_users
    axes = _int_list(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes not in ([2], [-3]):
        raise NoMatch(f"{describe_node(node)} unsqueezes axes {axes}; repeat_kv (query head h reads KV head "
                       "h // n_rep) unsqueezes axis 2")
    expand = _only_use(node.outputs[0], "repeat_kv Unsqueeze output")
    if expand.op_type != "Expand":
        raise NoMatch(f"{describe_node(expand)} follows the repeat_kv Unsqueeze; expected Expand")
    reshape = _only_use(expand.outputs[0], "repeat_kv Expand output")
    if reshape.op_type != "Reshape":
        raise NoMatch(f"{describe_node(reshape)} follows the repeat_kv Expand; expected Reshape")
    return reshape.outputs[0], [node, expand, reshape], shape_users


def _shape_symbols(value: ir.Value | None, rank4: frozenset[int] = frozenset(), depth: int = 0) -> list | None:
    """A 1-D shape tensor as a list of symbols (an int, or ``(source, axis)``: dimension
    ``axis`` of ``source`` as read by a Shape node), or None where it is not computed from
    constants, Shape, Slice, Gather, Concat, Unsqueeze, Squeeze and Cast alone. ``rank4``: ids
    of values known to be 4-D whose shape may not be annotated (a raw TorchScript export)."""
    if value is None or depth > 16:
        return None
    if (known := _int_list(value)) is not None:
        return known
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op, ins = node.op_type, node.inputs
    if op == "Shape":
        rank = len(ins[0].shape) if ins[0].shape is not None else 4 if id(ins[0]) in rank4 else None
        if rank is None:
            return None
        dims = list(range(rank))[node.attributes.get_int("start", 0):node.attributes.get_int("end", rank)]
        return [(ins[0], a) for a in dims]
    if op == "Concat":
        parts = [_shape_symbols(v, rank4, depth + 1) for v in ins]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if op in ("Unsqueeze", "Squeeze", "Cast"):
        return _shape_symbols(ins[0], rank4, depth + 1)
    if op in ("Slice", "Gather"):
        dims = _shape_symbols(ins[0], rank4, depth + 1)
        if dims is None:
            return None
        if op == "Gather":
            index = _int_list(ins[1])
            if index is None or node.attributes.get_int("axis", 0) or any(not -len(dims) <= i < len(dims)
                                                                           for i in index):
                return None
            return [dims[i] for i in index]
        starts, ends = _int_list(ins[1]), _int_list(ins[2])
        axes = _int_list(ins[3]) if len(ins) > 3 and ins[3] is not None else [0]
        steps = _int_list(ins[4]) if len(ins) > 4 and ins[4] is not None else [1]
        if starts is None or ends is None or len(starts) != 1 or axes not in ([0], [-1]) or steps != [1]:
            return None
        return dims[starts[0]:ends[0]]  # ONNX Slice clamps like a Python slice (step 1)
    return None


def _is_dim(symbol: Any, value: ir.Value, axis: int) -> bool:
    """Whether a shape symbol is dimension ``axis`` of ``value`` (read, or a static int equal to it)."""
    if isinstance(symbol, tuple):
        return symbol[0] is value and symbol[1] == axis
    dim = value.shape[axis] if value.shape is not None and len(value.shape) > axis else None
    return isinstance(symbol, int) and isinstance(dim, int) and symbol == dim


def _key_transpose(keys: ir.Value, node: ir.Node) -> list[ir.Node]:
    """The nodes that swap the last two axes of the keys, starting at their consumer ``node``:
    ``Transpose(perm=[0,1,3,2])`` (eager and TorchScript exports), or torch's dynamo SDPA
    decomposition ``Reshape([-1, T, D]) -> Transpose([0,2,1]) -> Reshape([B, H, D, T])``
    whose shapes (computed from ``Shape(keys)``) are checked to be exactly that."""
    perm = list(node.attributes.get_ints("perm", None) or [])
    if node.op_type == "Transpose" and perm == [0, 1, 3, 2]:
        return [node]
    if node.op_type == "Reshape" and node.inputs[0] is keys:
        flat = _shape_symbols(node.inputs[1], frozenset({id(keys)}))
        transpose = _only_use(node.outputs[0], "flattened key")
        back = _only_use(transpose.outputs[0], "transposed flat key") if transpose.op_type == "Transpose" else None
        if (flat is not None and len(flat) == 3 and flat[0] == -1 and _is_dim(flat[1], keys, 2)
                and _is_dim(flat[2], keys, 3) and list(transpose.attributes.get_ints("perm", None) or []) == [0, 2, 1]
                and back is not None and back.op_type == "Reshape"):
            dims = _shape_symbols(back.inputs[1], frozenset({id(keys)}))
            if dims is not None and len(dims) == 4 and all(_is_dim(d, keys, a) for d, a in zip(dims, (0, 1, 3, 2))):
                return [node, transpose, back]
        raise NoMatch(f"{describe_node(node)} reshapes the keys, but not as torch's SDPA decomposition of "
                       "keys.transpose(-2, -1) (Reshape [-1, T, D] -> Transpose [0,2,1] -> Reshape [B, H, D, T] "
                       "with shapes read from the keys)")
    raise NoMatch(f"{describe_node(node)} consumes the keys; expected Transpose(perm=[0,1,3,2]) (or torch's SDPA "
                   "decomposition of it, or an ONNX Attention node)")


def _dead_with(starts: list[ir.Node], removed: list[ir.Node], kept: list[ir.Value | None]) -> list[ir.Node] | None:
    """The nodes downstream of ``starts`` (stopping at ``removed``) when nothing outside them
    and ``removed`` reads them (shape arithmetic that served only the rewritten attention);
    None when some of it is used elsewhere, or computes a value the new op still reads
    (``kept``: the query and the mask, which may be sized from the keys)."""
    stop = {id(n) for n in removed}
    keep = {id(v) for v in kept if v is not None}
    seen: dict[int, ir.Node] = {}
    stack = list(starts)
    while stack:
        node = stack.pop()
        if id(node) in stop or id(node) in seen:
            continue
        seen[id(node)] = node
        if len(seen) > 64 or any(o.is_graph_output() or id(o) in keep for o in node.outputs):
            return None
        stack += [u.node for o in node.outputs for u in o.uses()]
    return list(seen.values())


def remove_nodes(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Remove ``nodes`` (no node outside them may read them), consumers first."""
    pending = {id(n): n for n in nodes}
    while pending:
        ready = [n for n in pending.values()
                 if not any(id(u.node) in pending for o in n.outputs for u in o.uses())]
        if not ready:
            raise RuntimeError("remove_nodes: the nodes read each other in a cycle")
        for node in ready:
            graph.remove(node, safe=True)
            del pending[id(node)]


def _attention_node(node: ir.Node, k_rep: ir.Value, v_rep: ir.Value) -> tuple[float | None, ir.Value]:
    """(scale, mask) of an ONNX ``Attention`` (opset 23) node that torch's dynamo exporter
    writes for SDPA at opset >= 23, checked to be plain 4-D attention over the keys and
    values; raises NoMatch naming what differs."""
    ins = [*node.inputs, *[None] * 6]
    where = describe_node(node)
    if ins[1] is not k_rep or ins[2] is not v_rep:
        raise NoMatch(f"{where} does not read the cache's keys and values as its inputs 1 and 2")
    if any(v is not None for v in ins[4:]):
        raise NoMatch(f"{where} takes past_key / past_value (or nonpad_kv_seqlen) inputs: the pass rewrites "
                       "an Attention that reads Concat(past, new) as its keys and values")
    for name, why in (("is_causal", "a causal flag instead of a mask (export with an attention mask)"),
                      ("softcap", "logit soft-capping, which QuantKVAttention does not apply"),
                      ("q_num_heads", "3-D inputs"), ("kv_num_heads", "3-D inputs")):
        attr = node.attributes.get(name)
        if attr is not None and attr.value:
            raise NoMatch(f"{where} has {name}={attr.value}: {why}")
    extra = [o for o in node.outputs[1:] if o is not None and (o.uses() or o.is_graph_output())]
    if extra:
        raise NoMatch(f"{where}: its output {extra[0].name!r} is used; only the attention output can be rewritten")
    mask = ins[3]
    if mask is None:
        raise NoMatch(f"{where} has no attention mask (attention over every key, not a decoder's)")
    if mask.dtype not in (ir.DataType.FLOAT, ir.DataType.BOOL) or (
            mask.shape is not None and (len(mask.shape) != 4 or mask.shape[1] not in (1, None))):
        raise NoMatch(f"{where}: mask {mask.name!r} is {mask.dtype} of shape {mask.shape}; expected a float32 or "
                       "boolean [batch, 1, query, key] mask")
    scale = node.attributes.get_float("scale", 0.0)
    return (scale or None), mask


def _match_eager(k_rep: ir.Value, v_rep: ir.Value, node: ir.Node, value_reader: ir.Node, past_v: ir.Value
                 ) -> tuple[list[ir.Node], float, float, ir.Value, ir.Value | None, ir.Value, list[ir.Node]]:
    """The attention as MatMul / Softmax / MatMul from the keys' consumer ``node``:
    (key_path, key_scale, scale, query, bias, output, every node of it)."""
    key_path = _key_transpose(k_rep, node)
    scale = 1.0
    node = _only_use(key_path[-1].outputs[0], "transposed key")
    if node.op_type == "Mul":  # SDPA decomposition: sqrt(scale) on q and k
        c = (_const_scalar(node.inputs[1]) if node.inputs[0] is key_path[-1].outputs[0]
             else _const_scalar(node.inputs[0]))
        if c is None:
            raise NoMatch(f"{describe_node(node)} scales the keys by a non-constant")
        scale *= c
        key_path.append(node)
        node = _only_use(node.outputs[0], "scaled key")
    key_scale = scale
    qk = node
    if qk.op_type != "MatMul" or qk.inputs[1] is not key_path[-1].outputs[0]:
        raise NoMatch(f"{describe_node(qk)} consumes the keys; expected MatMul(query, keys^T)")
    key_path.append(qk)
    core = list(key_path)
    node = _only_use(qk.outputs[0], "attention scores")
    if node.op_type in ("Mul", "Div"):
        other = node.inputs[1] if node.inputs[0] is qk.outputs[0] else node.inputs[0]
        c = _const_scalar(other)
        if c is None or (node.op_type == "Div" and node.inputs[1] is not other) or c == 0:
            raise NoMatch(f"{describe_node(node)} scales the scores by a non-constant")
        scale *= c if node.op_type == "Mul" else 1.0 / c
        core.append(node)
        node = _only_use(node.outputs[0], "scaled scores")
    bias = None
    if node.op_type == "Add":
        prev = core[-1].outputs[0]
        bias = node.inputs[1] if node.inputs[0] is prev else node.inputs[0]
        core.append(node)
        node = _only_use(node.outputs[0], "masked scores")
    softmax = node
    if softmax.op_type != "Softmax" or softmax.attributes.get_int("axis", -1) not in (-1, 3):
        raise NoMatch(f"{describe_node(softmax)} follows the scores; expected Softmax(axis=-1)")
    core.append(softmax)
    probs = softmax.outputs[0]
    # TorchScript writes softmax(..., dtype=float32).to(query.dtype) as Casts to float32
    while len(uses := probs.uses()) == 1 and not probs.is_graph_output() and uses[0].node.op_type == "Cast" \
            and uses[0].node.attributes.get_int("to", 0) == ir.DataType.FLOAT:
        core.append(uses[0].node)
        probs = uses[0].node.outputs[0]
    guard = _nan_guard(probs)
    if guard:  # SDPA exports zero a NaN row (every key masked with -inf); the op gives such rows zeros
        core += guard
        probs = guard[-1].outputs[0]
    pv = _only_use(probs, "attention probabilities")
    if pv.op_type != "MatMul" or pv.inputs[0] is not probs or pv.inputs[1] is not v_rep:
        raise NoMatch(f"{describe_node(pv)} consumes the probabilities; expected MatMul(probs, values) with the "
                       f"values of {past_v.name!r}")
    if value_reader is not pv:
        raise NoMatch(f"the values of {past_v.name!r} are read by {describe_node(value_reader)}, not by "
                       f"the attention's {describe_node(pv)}")
    core.append(pv)
    return key_path, key_scale, scale, qk.inputs[0], bias, pv.outputs[0], core


def match_layer(model: ir.Model, index: int, past_k: ir.Value, past_v: ir.Value) -> Layer:
    graph = model.graph
    outputs = {v.name: v for v in graph.outputs}
    concat_k, shape_users, identity_k = _cache_concat(outputs, past_k, f"present.{index}.key")
    concat_v, shape_users_v, identity_v = _cache_concat(outputs, past_v, f"present.{index}.value")
    shape_users += shape_users_v
    k_rep, repeat_k, su = _repeat_chain(concat_k.outputs[0], "key")
    shape_users += su
    v_rep, repeat_v, su = _repeat_chain(concat_v.outputs[0], "value")
    shape_users += su
    remove = [concat_k, concat_v, *repeat_k, *repeat_v]

    # The repeated keys and values (GQA) may also be read by Shape nodes (torch's SDPA
    # decomposition reads the key shape to transpose it): that arithmetic must serve the
    # attention alone. Without GQA they are the present outputs, whose Shape readers are
    # rebuilt like the past's.
    rep_shapes: dict[str, list[ir.Node]] = {"key": [], "value": []}
    consumers = {}
    for value, what, repeated in ((k_rep, "key", bool(repeat_k)), (v_rep, "value", bool(repeat_v))):
        shapes, others = _split_uses(value)
        if repeated:
            rep_shapes[what] = shapes
        if len(others) != 1:
            raise NoMatch(f"repeated {what} {value.name!r} must have exactly one consumer besides Shape nodes (has: "
                           f"{', '.join(describe_node(n) for n in others) or 'none'})")
        consumers[what] = others[0]
    form, key_path, key_scale, bool_mask = "eager", [], 1.0, False
    node = consumers["key"]
    head_dim = past_k.shape[3] if past_k.shape is not None and len(past_k.shape) == 4 else None
    if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
        scale, bias = _attention_node(node, k_rep, v_rep)
        if scale is None:
            if not isinstance(head_dim, int):
                raise NoMatch(f"{describe_node(node)} has no scale and the head dim of {past_k.name!r} is not static")
            scale = 1.0 / float(np.sqrt(head_dim))
        form, bool_mask = "attention", bias.dtype == ir.DataType.BOOL
        query, out = node.inputs[0], node.outputs[0]
        remove.append(node)
    else:
        key_path, key_scale, scale, query, bias, out, core = _match_eager(k_rep, v_rep, node, consumers["value"],
                                                                           past_v)
        remove += core
    # Each Shape reader of the repeated keys / values either serves the attention alone
    # (dead with it), or reads only the batch, head and head-dim axes, which the
    # attention's output has too (TorchScript's SDPA shapes its output from the values),
    # or only the batch, length and head-dim axes, which the cache's rebuilt shape has
    # (a mask cut to the keys' length).
    dead: dict[str, list[ir.Node]] = {"key": identity_k, "value": identity_v}
    out_shapes = []
    kept = [query, bias]
    for what, shapes in rep_shapes.items():
        for shape in shapes:
            gone = _dead_with([shape], remove, kept)
            axes, dead_readers = _axes_read(shape, remove, kept) if gone is None else (None, [])
            if gone is not None:
                dead[what] += gone
            elif axes is not None and axes <= {0, 1, 3}:
                out_shapes.append(shape)
                dead[what] += dead_readers
            elif axes is not None and axes <= {0, 2, 3}:
                shape_users.append((shape, "present"))
                dead[what] += dead_readers
            else:
                raise NoMatch(f"the shape of the repeated {what}s ({describe_node(shape)}) is used outside the "
                               "attention (for more than its batch, length, head and head-dim sizes, or through "
                               "over 64 nodes of shape arithmetic)")
    return Layer(index, past_k, past_v, concat_k, concat_v, query, scale, bias, out, remove, shape_users,
                  form=form, key_path=key_path, key_scale=key_scale, repeat_k=repeat_k, repeat_v=repeat_v,
                  dead_k=dead["key"], dead_v=dead["value"], bool_mask=bool_mask,
                  out_shapes=out_shapes)


def _match_gqa(graph: ir.Graph, index: int, past_k: ir.Value, past_v: ir.Value) -> Layer | None:
    """The layer when its past is read by a GroupQueryAttention node (onnxruntime-genai), else None."""
    shapes, others = _split_uses(past_k)
    shapes_v, others_v = _split_uses(past_v)
    node = next((n for n in others if kv_cache_gqa.is_gqa(n)), None)
    if node is None:
        return None
    if others != [node] or others_v != [node]:
        raise NoMatch(f"the past of layer {index} is read by {', '.join(describe_node(n) for n in others + others_v)}"
                       f"; expected {describe_node(node)} alone")
    gqa = kv_cache_gqa.match(node, past_k, past_v, graph)
    present_k, present_v = node.outputs[1], node.outputs[2]
    outputs = {v.name: v for v in graph.outputs}
    for value, name in ((present_k, f"present.{index}.key"), (present_v, f"present.{index}.value")):
        if outputs.get(name) is not value or value.uses():
            raise NoMatch(f"{describe_node(node)} must produce the graph output {name!r}, read by nothing else")
    return Layer(index, past_k, past_v, None, None, None, gqa.scale, None, node.outputs[0], [node],
                  [(n, "past") for n in shapes + shapes_v], form="gqa", gqa=gqa)


def _axes_read(shape: ir.Node, removed: list[ir.Node], kept: list[ir.Value | None]
               ) -> tuple[set[int] | None, list[ir.Node]]:
    """(the axes of its input whose sizes a Shape node's live readers take, constant Gather
    or Slice readers only, or None; the readers that serve the rewritten attention alone,
    which die with it). The shape's input is 4-D (repeated keys or values), annotated or not."""
    if shape.outputs[0].is_graph_output():
        return None, []
    axes = list(range(4))[shape.attributes.get_int("start", 0):shape.attributes.get_int("end", 4)]
    read: set[int] = set()
    dead: list[ir.Node] = []
    for use in shape.outputs[0].uses():
        if (gone := _dead_with([use.node], removed, kept)) is not None:
            dead += gone
            continue
        symbols = (_shape_symbols(use.node.outputs[0], frozenset({id(shape.inputs[0])}))
                   if use.node.op_type in ("Gather", "Slice") else None)
        if symbols is None:
            return None, []
        read |= {s[1] for s in symbols if isinstance(s, tuple) and s[0] is shape.inputs[0]} & set(axes)
    return read, dead


def rewire_out_shapes(graph: ir.Graph, layer: Layer, out: ir.Value) -> None:
    """Point the layer's ``out_shapes`` at the new attention output ``out`` (same batch, head
    and head-dim sizes); the graph is re-sorted, as they may come before it."""
    for shape in layer.out_shapes:
        shape.replace_input_with(0, out)
    if layer.out_shapes:
        graph.sort()


def _nan_guard(probs: ir.Value) -> list[ir.Node]:
    """``Where(IsNaN(p), 0, p)`` after the Softmax (torch's SDPA exports), or []."""
    users = [u.node for u in probs.uses()]
    isnan = next((n for n in users if n.op_type == "IsNaN"), None)
    where = next((n for n in users if n.op_type == "Where"), None)
    if (len(users) != 2 or isnan is None or where is None or list(where.inputs)[0::2] != [isnan.outputs[0], probs]
            or len(isnan.outputs[0].uses()) != 1 or _const_scalar(where.inputs[1]) != 0.0):
        return []
    return [isnan, where]


def _int64(name: str, values: list[int]) -> ir.Value:
    return ir.val(name, const_value=ir.tensor(np.array(values, dtype=np.int64)))


def _float(name: str, value: float) -> ir.Value:
    return ir.val(name, const_value=ir.tensor(np.array(value, dtype=np.float32)))


def apply(model: ir.Model, options: KVCacheOptions, *, explain: bool = False) -> PassResult:
    """Rewrite every layer's attention; count = number of layers rewritten."""
    del explain  # a mismatch is an error (all layers or none), with its reason
    graph = model.graph
    pasts = {}
    for value in graph.inputs:
        m = _PAST.match(value.name or "")
        if m:
            pasts[int(m.group(1))] = value
    if not pasts:
        return PassResult(name=PASS.name, count=0, explanations=[
            "the model has no past_key_values.{i}.key inputs (export it with `toolkit export`)"])
    inputs_by_name = {v.name: v for v in graph.inputs}
    layers = []
    for index in sorted(pasts):
        past_k = pasts[index]
        past_v = inputs_by_name.get(f"past_key_values.{index}.value")
        if past_v is None:
            raise PassError(f"kv-cache: input past_key_values.{index}.value is missing",
                            hint="the model must have a flat KV cache (`toolkit export`)")
        for past in (past_k, past_v):
            if past.dtype is not None and past.dtype != ir.DataType.FLOAT:
                raise PassError(f"kv-cache: input {past.name!r} is {past.dtype.name.lower()}; QuantKVAttention "
                                "takes float32 attention (query, new keys and values, the residual window)",
                                hint="convert the float32 model with `toolkit convert MODEL --kv-cache SCHEME "
                                f"--float16` (the rest runs in float16, {', '.join(FLOAT32_ONLY_OPS)} stay "
                                "float32), or leave out --kv-cache")
        try:
            layers.append(_match_gqa(graph, index, past_k, past_v) or match_layer(model, index, past_k, past_v))
        except kv_cache_gqa.Mismatch as err:
            raise PassError(f"kv-cache: layer {index}: {err}", hint=kv_cache_gqa.HINT) from None
        except NoMatch as err:
            hint = (SLICED_CACHE_HINT if isinstance(err, SlicedCache) else
                    "the pass rewrites eager attention (`toolkit export`), torch exporters' SDPA forms and ONNX "
                    "Attention nodes; run `toolkit inspect` "
                    "on the model and report the pattern if it is a standard one")
            raise PassError(f"kv-cache: layer {index}: {err}", hint=hint) from None

    shape = layers[0].past_k.shape
    if layers[0].gqa is not None and shape is not None and len(shape) == 4:
        # onnxruntime-genai leaves the head dim symbolic: the node's attributes and query width give it
        shape = ir.Shape([shape[0], layers[0].gqa.kv_heads, shape[2], layers[0].gqa.head_dim])
        if any(layer.gqa is None for layer in layers):
            raise PassError("kv-cache: some layers are GroupQueryAttention and some are not",
                            hint="convert a model exported in one form")
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise PassError(f"kv-cache: input {layers[0].past_k.name!r} has shape {shape}; expected "
                        "[batch, kv_heads, past_len, head_dim] with static kv_heads and head_dim",
                        hint="re-export with `toolkit export`")
    batch, kv_heads, head_dim = shape[0], shape[1], shape[3]
    # int4's groups are channels only: a G above the head dim cannot be what was asked
    # for (the default caps itself: a small head gets one group per row). KIVI's G is
    # also its key group in tokens, which any head honours; its value groups take
    # min(G, head dim) channels (recorded as value_group).
    if options.scheme == "int4" and options.group > head_dim:
        fits = [g for g in GROUPS if g <= head_dim]
        raise PassError(f"kv-cache: group={options.group} is larger than the head dim {head_dim} of "
                        f"{layers[0].past_k.name!r}: int4 quantizes groups of G channels of a head",
                        hint=(f"use --kv-group {fits[-1]} or smaller, or " if fits else "") +
                        f"leave --kv-group out ({kv_quant.DEFAULT_GROUP}, capped to the head dim)")
    try:
        scheme = kv_quant.scheme_for(options.scheme, head_dim, options.effective_group,
                                     None if options.residual == -1 else options.residual,
                                     quantize_query=options.quantize_query)
    except ValueError as err:
        raise PassError(f"kv-cache: {err}", hint="choose another --kv-group / --kv-residual") from None
    pb = head_dim * scheme.bits // 8

    def cache_shapes(prefix: str) -> dict[str, ir.Shape]:
        n, g, r = f"{prefix}_quantized_length", f"{prefix}_key_groups", f"{prefix}_residual_length"
        if options.capacity:  # static: the capacity and the residual slots
            n, r = options.capacity, scheme.residual_slots
            g = n // scheme.key_group if scheme.key_per_channel else g
        kparams = [batch, kv_heads, g, head_dim] if scheme.key_per_channel else \
            [batch, kv_heads, n, head_dim // scheme.key_group]
        return {"key_q": ir.Shape([batch, kv_heads, n, pb]), "key_scale": ir.Shape(kparams),
                "key_zero": ir.Shape(kparams), "key_res": ir.Shape([batch, kv_heads, r, head_dim]),
                "value_q": ir.Shape([batch, kv_heads, n, pb]),
                "value_scale": ir.Shape([batch, kv_heads, n, head_dim // scheme.value_group]),
                "value_zero": ir.Shape([batch, kv_heads, n, head_dim // scheme.value_group]),
                "value_res": ir.Shape([batch, kv_heads, r, head_dim])}

    dtypes = {"q": ir.DataType.UINT8, "scale": ir.DataType.FLOAT16, "zero": ir.DataType.FLOAT16,
              "res": ir.DataType.FLOAT}
    names = [n for n in kv_quant.CACHE_TENSORS if not (scheme.symmetric and n.endswith("_zero"))]
    past_shapes, present_shapes = cache_shapes("past"), cache_shapes("present")
    attrs = [ir.AttrInt64(k, v) for k, v in scheme.to_attributes().items()]

    # Fixed capacity: one lengths tensor (N, r) for every layer, in and out; named as a
    # cache tensor so decoders pass it along with the others.
    lengths_in = lengths_out = None
    if options.capacity:
        lengths_in = ir.val(kv_quant.MODEL_LENGTHS_INPUT, ir.DataType.INT64, ir.Shape([2]))
        graph.inputs.append(lengths_in)
    shared = None  # GroupQueryAttention: the bias and rotary tables every layer reads
    for layer in layers:
        i = layer.index
        new_in = {n: ir.val(f"past_key_values.{i}.{n}", dtypes[n.rsplit("_", 1)[1]], past_shapes[n]) for n in names}
        pv = layer.remove[-1]
        if layer.gqa is not None:
            shared = shared or kv_cache_gqa.Shared(graph, layer.gqa)
            shared.anchor = layer.gqa.node
            query, k_new, v_new = layer.gqa.split_heads(shared, f"kv_cache/layer{i}")
            bias = shared.bias()
        else:
            query, k_new, v_new = layer.query, layer.concat_k.inputs[1], layer.concat_v.inputs[1]
            bias = layer.bias
        if layer.bool_mask:  # ONNX Attention's boolean mask (True: attend) as the op's additive bias
            where = ir.Node("", "Where", [bias, _float(f"kv_cache/layer{i}/attend", 0.0),
                                          _float(f"kv_cache/layer{i}/masked", -np.inf)],
                            name=f"kv_cache/layer{i}/MaskBias")
            for c in where.inputs[1:]:
                graph.register_initializer(c)
            graph.insert_before(pv, [where])
            bias = where.outputs[0]
        op_inputs = [query, k_new, v_new, *(new_in.get(n) for n in kv_quant.CACHE_TENSORS), bias,
                     lengths_in]
        while op_inputs[-1] is None:
            op_inputs.pop()
        with_lengths = lengths_in is not None and lengths_out is None  # the first layer reports them
        node = ir.Node(DOMAIN, kv_quant.OP_TYPE, op_inputs,
                       [*attrs, ir.AttrFloat32("scale", float(layer.scale))],
                       num_outputs=1 + len(kv_quant.CACHE_TENSORS) + int(with_lengths),
                       name=f"kv_cache/layer{i}/QuantKVAttention")
        if with_lengths:
            lengths_out = node.outputs[-1]
            lengths_out.name, lengths_out.dtype, lengths_out.shape = kv_quant.MODEL_LENGTHS_OUTPUT, ir.DataType.INT64, ir.Shape([2])
            graph.outputs.append(lengths_out)
        out = node.outputs[0]
        out.name, out.dtype = f"kv_cache.{i}.attention", ir.DataType.FLOAT
        out.shape = None if layer.gqa is not None else layer.out.shape
        new_out = {}
        for value, n in zip(node.outputs[1:1 + len(kv_quant.CACHE_TENSORS)], kv_quant.CACHE_TENSORS):
            if n in new_in:
                value.name = f"present.{i}.{n}"
                value.dtype, value.shape = new_in[n].dtype, present_shapes[n]
                new_out[n] = value
            else:
                value.name = ""  # symmetric: no zero point
        graph.insert_before(pv, [node])
        if layer.gqa is not None:
            out = layer.gqa.merge_heads(graph, out, f"kv_cache/layer{i}")
        ir.convenience.replace_all_uses_with(layer.out, out)
        rewire_out_shapes(graph, layer, out)

        # The shape of the old cache tensors, rebuilt: [B, Hkv, N + r (+ S), D]; N and r
        # are the tensors' lengths, or the lengths input with a fixed capacity.
        for shape_node, which in layer.shape_users:
            pre = f"kv_cache/layer{i}/{shape_node.name}"
            shape_r = ir.Node("", "Shape", [new_in["key_res"]], name=f"{pre}/ShapeRes")
            res_dims = shape_r.outputs[0]
            starts = [_int64(f"{pre}/c{j}", [v]) for j, v in enumerate((0, 2, 3, 2, 3, 4))]
            head = ir.Node("", "Slice", [res_dims, starts[0], starts[1]], name=f"{pre}/Head")
            tail = ir.Node("", "Slice", [res_dims, starts[4], starts[5]], name=f"{pre}/Tail")
            nodes = [shape_r, head, tail]
            if lengths_in is not None:
                length = ir.Node("", "ReduceSum", [lengths_in], [ir.AttrInt64("keepdims", 1)], name=f"{pre}/PastLen")
                nodes.append(length)
            else:
                shape_q = ir.Node("", "Shape", [new_in["key_q"]], [ir.AttrInt64("start", 2), ir.AttrInt64("end", 3)],
                                  name=f"{pre}/ShapeQ")
                r_len = ir.Node("", "Slice", [res_dims, starts[1], starts[2]], name=f"{pre}/ResLen")
                length = ir.Node("", "Add", [shape_q.outputs[0], r_len.outputs[0]], name=f"{pre}/PastLen")
                nodes += [shape_q, r_len, length]
            total = length.outputs[0]
            if which == "present":
                s_len = ir.Node("", "Shape", [k_new], [ir.AttrInt64("start", 2), ir.AttrInt64("end", 3)],
                                name=f"{pre}/NewLen")
                total_node = ir.Node("", "Add", [total, s_len.outputs[0]], name=f"{pre}/TotalLen")
                nodes += [s_len, total_node]
                total = total_node.outputs[0]
            full = ir.Node("", "Concat", [head.outputs[0], total, tail.outputs[0]], [ir.AttrInt64("axis", 0)],
                           name=f"{pre}/Shape")
            nodes.append(full)
            start = shape_node.attributes.get_int("start", 0)
            end = shape_node.attributes.get_int("end", 4)
            sliced = ir.Node("", "Slice", [full.outputs[0], _int64(f"{pre}/start", [start]),
                                            _int64(f"{pre}/end", [end])], name=f"{pre}/Slice")
            nodes.append(sliced)
            for c in (*starts, sliced.inputs[1], sliced.inputs[2]):
                graph.register_initializer(c)
            graph.insert_before(shape_node, nodes)
            ir.convenience.replace_all_uses_with(shape_node.outputs[0], sliced.outputs[0])
            graph.remove(shape_node, safe=True)

        # Cache I/O: the new tensors take the old ones' places.
        for old, kind in ((layer.past_k, "key"), (layer.past_v, "value")):
            pos = list(graph.inputs).index(old)
            graph.inputs.pop(pos)
            for j, n in enumerate(n for n in names if n.startswith(kind)):
                graph.inputs.insert(pos + j, new_in[n])
            out_pos = [v.name for v in graph.outputs].index(f"present.{i}.{kind}")
            graph.outputs.pop(out_pos)
            for j, n in enumerate(n for n in names if n.startswith(kind)):
                graph.outputs.insert(out_pos + j, new_out[n])

        remove_nodes(graph, [*layer.remove, *layer.dead_k, *layer.dead_v])

    model.opset_imports.setdefault(DOMAIN, 1)
    info = {"scheme": options.scheme, **scheme.to_attributes(), "kv_heads": kv_heads, "head_dim": head_dim,
            "capacity": options.capacity, "residual_slots": scheme.residual_slots if options.capacity else 0,
            "layers": len(layers), "bytes_per_token": scheme.bytes_per_token(kv_heads, head_dim) * len(layers),
            "fp32_bytes_per_token": 2 * kv_heads * head_dim * 4 * len(layers)}
    positions = [layer.gqa.rotary.positions for layer in layers if layer.gqa is not None and layer.gqa.rotary]
    if positions and "toolkit.context_length" not in model.metadata_props:
        # onnxruntime-genai records none: the rotary caches' rows are the positions the
        # model takes (generate and parity refuse longer runs up front)
        model.metadata_props["toolkit.context_length"] = str(min(positions))
    model.metadata_props["toolkit.kv_cache"] = options.scheme
    model.metadata_props["toolkit.kv_quant"] = json.dumps(info, sort_keys=True)
    model.metadata_props["toolkit.parity_profile"] = PROFILE[scheme.bits]
    return PassResult(name=PASS.name, count=len(layers),
                      details={"scheme": options.scheme, "bits": scheme.bits, "layers": len(layers),
                               "scales": sorted({round(layer.scale, 6) for layer in layers})})


PASS = GraphPass(
    name="kv-cache",
    description="Attention over a quantized KV cache (QuantKVAttention: int8 / int4 / KIVI 4- and 2-bit); "
    "changes the cache I/O",
    options_type=KVCacheOptions,
    apply=apply,
)
