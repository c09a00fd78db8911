"""``kv-cache`` on ``com.microsoft::GroupQueryAttention`` (onnxruntime-genai's model builder).

The builder writes each layer's attention as one node::

    attn, present.{i}.key, present.{i}.value = GroupQueryAttention(
        qkv (or q, k, v), past_key_values.{i}.key, past_key_values.{i}.value,
        seqlens_k, total_sequence_length, cos_cache, sin_cache)

keys and values packed behind the query (``[B, S, (H + 2 Hkv) D]``), the rotary
embedding applied inside (``do_rotary=1``), and per-row lengths ``seqlens_k =
ReduceSum(attention_mask) - 1`` in place of a mask: GQA takes a batch's rows as
right-padded, at positions ``seqlens_k + 1 - S + s``.

``QuantKVAttention`` takes rotated queries and keys in heads and an additive bias, so
the rewrite (:class:`Layer`, :class:`Shared`) splits q / k / v into heads
(``Split -> Reshape -> Transpose``), rotates them in plain ONNX (``Gather`` of the
cos/sin caches at the positions, rotate-half or interleaved pairs), builds the causal
and padding bias from ``attention_mask`` and merges the op's heads back into
``[B, S, H D]``. Positions and the mask follow the Hugging Face convention (left
padding: positions ``CumSum(attention_mask) - 1``, masked keys get ``-inf``), which is
what ``toolkit parity`` and ``toolkit generate`` feed; for a batch without padding
both conventions give the same positions and mask, so the converted model matches
the original one there.

Refused by name: a sliding window (``local_window_size``), ``softcap``,
``smooth_softmax``, the optional position / bias / sink inputs, a used ``output_qk``,
a ``seqlens_k`` not computed from the graph's ``attention_mask``, and head sizes that
cannot be read statically.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from passes.rule_application import describe_node

OP = ("com.microsoft", "GroupQueryAttention")
# GroupQueryAttention's inputs (ONNX Runtime 1.32's schema). Those past index 8
# (positions, a bias, sinks, cache scales, q/k norm weights, ...) change the op's
# positions, scores or cache in ways the rewrite does not rebuild: any one given is refused.
_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
           "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
           "k_norm_weight", "query_seqlens")
# Attributes whose meaning the rewrite reproduces (or checks are at their defaults);
# any other one (newer builders add quantized caches, q/k norms, windowed buffers)
# is refused by name rather than ignored.
_KNOWN_ATTRIBUTES = frozenset({"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved",
                               "local_window_size", "softcap", "smooth_softmax", "qk_output", "causal"})


HINT = ("the rewrite takes GroupQueryAttention as onnxruntime-genai's model builder writes it for Llama, Qwen2, "
        "Mistral and Phi-3 (CPU, fp32); export the model with `toolkit export` (eager attention) to convert it "
        "instead")


class Mismatch(Exception):
    """The node is GroupQueryAttention, in a form the rewrite does not take (the message says why)."""


def is_gqa(node: ir.Node | None) -> bool:
    return node is not None and (node.domain, node.op_type) == OP


def _static_width(value: ir.Value) -> int | None:
    """The static last dim of ``value``: its annotation, or the weight / bias / ``N`` of the
    MatMul, Add or MatMulNBits that produces it (onnxruntime-genai writes no value_info)."""
    if value.shape is not None and len(value.shape) >= 1 and isinstance(value.shape[-1], int):
        return value.shape[-1]
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "MatMulNBits":
        return node.attributes.get_int("N")
    if node.op_type in ("MatMul", "Add"):
        for inp in node.inputs:
            if inp is not None and inp.const_value is not None and len(inp.const_value.shape) >= 1:
                return int(inp.const_value.shape[-1])
    return None


def _mask_of(seqlens: ir.Value | None) -> ir.Value | None:
    """The graph input ``seqlens_k`` is computed from (``Cast(Sub(ReduceSum(mask, 1), 1))``,
    Casts in any place, one Sub of the constant 1), or None."""
    value, subtracted = seqlens, False
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type == "Cast":
            value = node.inputs[0]
        elif node.op_type == "Sub" and not subtracted:
            one = ir.convenience.get_const_tensor(node.inputs[1])
            if one is None or one.numpy().size != 1 or float(one.numpy().reshape(())) != 1.0:
                return None
            value, subtracted = node.inputs[0], True
        elif node.op_type == "ReduceSum" and subtracted:
            axes = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes is None or axes.numpy().reshape(-1).tolist() not in ([1], [-1]):
                return None
            mask = node.inputs[0]
            while mask is not None and mask.producer() is not None and mask.producer().op_type == "Cast":
                mask = mask.producer().inputs[0]
            return mask if mask is not None and mask.is_graph_input() else None
        else:
            return None
    return None


def _head_dim(node: ir.Node) -> int | None:
    """D from the query's static width: ``(H + 2 Hkv) D`` packed, ``H D`` alone."""
    heads, kv_heads = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
    width = _static_width(node.inputs[0])
    packed = len(node.inputs) < 2 or node.inputs[1] is None
    total = heads + 2 * kv_heads if packed else heads
    return width // total if width and total > 0 and width % total == 0 else None


def past_head_dims(model: ir.Model) -> dict[str, int]:
    """The head dim of each graph input a GroupQueryAttention node reads as its past key or
    value (onnxruntime-genai leaves it symbolic)."""
    dims = {}
    for node in model.graph:
        if is_gqa(node) and (d := _head_dim(node)) is not None:
            for past in node.inputs[3:5]:
                if past is not None and past.is_graph_input():
                    dims[past.name] = d
    return dims


def table_shape(value: ir.Value | None) -> tuple[int, int] | None:
    """(positions, R/2) of a cos or sin cache: its static shape, or, for the ``If`` that
    picks one of two caches by length (onnxruntime-genai's LongRoPE Phi-3: short and long
    factors), the most positions of its branches' constant outputs, which must agree on R/2."""
    if value is None:
        return None
    if value.shape is not None and len(value.shape) == 2 and all(isinstance(d, int) for d in value.shape):
        return int(value.shape[0]), int(value.shape[1])
    node = value.producer()
    if node is None or node.op_type != "If" or node.domain not in ("", "ai.onnx"):
        return None
    shapes = []
    for branch in ("then_branch", "else_branch"):
        graph = node.attributes[branch].value if branch in node.attributes else None
        out = graph.outputs[value.index()] if graph is not None and value.index() < len(graph.outputs) else None
        tensor = ir.convenience.get_const_tensor(out) if out is not None else None
        if tensor is None or len(tensor.shape) != 2:
            return None
        shapes.append((int(tensor.shape[0]), int(tensor.shape[1])))
    if shapes[0][1] != shapes[1][1]:
        return None
    return max(s[0] for s in shapes), shapes[0][1]


@dataclasses.dataclass(frozen=True)
class Rotary:
    cos: ir.Value  # [positions, R/2]
    sin: ir.Value
    half: int  # R/2
    positions: int  # rows of the (longest) cache: the positions the model can take


@dataclasses.dataclass
class Layer:
    """One GroupQueryAttention node the rewrite takes."""

    node: ir.Node
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    mask: ir.Value  # the graph's attention_mask [B, T]
    rotary: Rotary | None  # None without do_rotary
    interleaved: bool

    def split_heads(self, shared: Shared, prefix: str) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(q [B, H, S, D], k, v [B, Hkv, S, D]) rotated, inserted before the node."""
        t = tape.Tape()
        d, h, hkv = self.head_dim, self.heads, self.kv_heads
        ins = self.node.inputs
        if ins[1] is None:  # packed
            sizes = t.initializer(ir.tensor(np.array([h * d, hkv * d, hkv * d], np.int64), name=f"{prefix}/qkv_sizes"))
            parts = t.op_multi_out("Split", [ins[0], sizes], {"axis": -1}, num_outputs=3, name=f"{prefix}/SplitQKV")
        else:
            parts = list(ins[:3])
        heads = []
        for part, n_heads, what in zip(parts, (h, hkv, hkv), "qkv"):
            shape = t.initializer(ir.tensor(np.array([0, 0, n_heads, d], np.int64), name=f"{prefix}/{what}_heads"))
            split = t.op("Reshape", [part, shape], name=f"{prefix}/{what.upper()}Heads")
            heads.append(t.op("Transpose", [split], {"perm": [0, 2, 1, 3]}, name=f"{prefix}/{what.upper()}Transpose"))
        if self.rotary is not None:
            cos, sin = shared.rotary_tables(self.rotary)
            heads[0] = _rotate(t, heads[0], cos, sin, self.rotary.half, d, self.interleaved, f"{prefix}/RotaryQ")
            heads[1] = _rotate(t, heads[1], cos, sin, self.rotary.half, d, self.interleaved, f"{prefix}/RotaryK")
        shared.insert(t)
        return heads[0], heads[1], heads[2]

    def merge_heads(self, graph: ir.Graph, out: ir.Value, prefix: str) -> ir.Value:
        """``[B, H, S, D] -> [B, S, H D]`` after the op that produces ``out``."""
        t = tape.Tape()
        back = t.op("Transpose", [out], {"perm": [0, 2, 1, 3]}, name=f"{prefix}/MergeTranspose")
        shape = t.initializer(ir.tensor(np.array([0, 0, self.heads * self.head_dim], np.int64),
                                        name=f"{prefix}/merged"))
        merged = t.op("Reshape", [back, shape], name=f"{prefix}/MergeHeads")
        _place(graph, t, after=out.producer())
        merged.dtype, merged.shape = ir.DataType.FLOAT, self.node.outputs[0].shape
        return merged


def _rotate(t: tape.Tape, x: ir.Value, cos: ir.Value, sin: ir.Value, half: int, head_dim: int, interleaved: bool,
            prefix: str) -> ir.Value:
    """Rotary embedding of ``x [B, N, S, D]`` with tables ``[B, 1, S, R/2]`` on the first R channels."""
    rot = 2 * half

    def cut(v: ir.Value, start: int, end: int, name: str, axis: int = -1) -> ir.Value:
        s, e, a = (t.initializer(ir.tensor(np.array([x_], np.int64), name=f"{prefix}/{name}_{k}"))
                   for k, x_ in (("start", start), ("end", end), ("axis", axis)))
        return t.op("Slice", [v, s, e, a], name=f"{prefix}/{name}")

    if interleaved:  # channel pairs (2i, 2i + 1)
        pairs = t.initializer(ir.tensor(np.array([0, 0, 0, half, 2], np.int64), name=f"{prefix}/pairs"))
        xr = t.op("Reshape", [cut(x, 0, rot, "Rot") if rot < head_dim else x, pairs], name=f"{prefix}/Pairs")
        axis = t.initializer(ir.tensor(np.array([-1], np.int64), name=f"{prefix}/last"))
        c, s = (t.op("Unsqueeze", [v, axis], name=f"{prefix}/{n}Pairs") for v, n in ((cos, "Cos"), (sin, "Sin")))
        x1, x2 = cut(xr, 0, 1, "Even"), cut(xr, 1, 2, "Odd")
    else:  # rotate half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        c, s = cos, sin
        x1, x2 = cut(x, 0, half, "First"), cut(x, half, rot, "Second")
    o1 = t.op("Sub", [t.op("Mul", [x1, c], name=f"{prefix}/Mul1c"), t.op("Mul", [x2, s], name=f"{prefix}/Mul2s")],
              name=f"{prefix}/Out1")
    o2 = t.op("Add", [t.op("Mul", [x2, c], name=f"{prefix}/Mul2c"), t.op("Mul", [x1, s], name=f"{prefix}/Mul1s")],
              name=f"{prefix}/Out2")
    rotated = t.op("Concat", [o1, o2], {"axis": -1}, name=f"{prefix}/Rotated")
    if interleaved:
        flat = t.initializer(ir.tensor(np.array([0, 0, 0, rot], np.int64), name=f"{prefix}/flat"))
        rotated = t.op("Reshape", [rotated, flat], name=f"{prefix}/Unpair")
    if rot < head_dim:
        rotated = t.op("Concat", [rotated, cut(x, rot, head_dim, "Pass")], {"axis": -1}, name=f"{prefix}/WithPass")
    return rotated


def _place(graph: ir.Graph, t: tape.Tape, *, before: ir.Node | None = None, after: ir.Node | None = None) -> None:
    """Put a tape's nodes into ``graph`` before or after a node, its constants as
    initializers, each output named after its node."""
    for node in t.nodes:
        for j, value in enumerate(node.outputs):
            if not value.name or value.name.startswith("anonymous"):
                value.name = f"{node.name}/output_{j}"
    for init in t.initializers:
        graph.register_initializer(init)
    if after is not None:
        graph.insert_after(after, t.nodes)
    else:
        graph.insert_before(before, t.nodes)


class Shared:
    """What the rewritten layers share, built once before the first of them: the bias
    ``[B, 1, S, T]`` from ``attention_mask`` and the rotary tables at the tokens' positions."""

    def __init__(self, graph: ir.Graph, first: Layer) -> None:
        self.graph, self.first = graph, first
        self.anchor = first.node  # the layer being rewritten: what is built for it goes before it
        self._bias: ir.Value | None = None
        self._tables: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
        self._positions: ir.Value | None = None
        self._length_values: tuple[ir.Value, ir.Value] | None = None

    def insert(self, t: tape.Tape) -> None:
        _place(self.graph, t, before=self.anchor)

    def _lengths(self, t: tape.Tape) -> tuple[ir.Value, ir.Value]:
        """(T, S) as int64 [1]: the mask's length and the new tokens' (the first layer's query)."""
        if self._length_values is None:
            p = "kv_cache/gqa"
            total = t.op("Shape", [self.first.mask], {"start": 1, "end": 2}, name=f"{p}/TotalLen")
            new = t.op("Shape", [self.first.node.inputs[0]], {"start": 1, "end": 2}, name=f"{p}/NewLen")
            self._length_values = (total, new)
        return self._length_values

    def positions(self) -> ir.Value:
        """``max(CumSum(mask) - 1, 0)`` over the last S positions: ``[B, S]`` int64."""
        if self._positions is None:
            t, p = tape.Tape(), "kv_cache/gqa"
            mask = t.op("Cast", [self.first.mask], {"to": ir.DataType.INT64}, name=f"{p}/MaskInt")
            axis = t.initializer(ir.tensor(np.array(1, np.int64), name=f"{p}/axis1"))
            one = t.initializer(ir.tensor(np.array(1, np.int64), name=f"{p}/one_scalar"))
            zero = t.initializer(ir.tensor(np.array(0, np.int64), name=f"{p}/zero_scalar"))
            counted = t.op("Sub", [t.op("CumSum", [mask, axis], name=f"{p}/CumSum"), one], name=f"{p}/Counted")
            _, new = self._lengths(t)
            start = t.op("Neg", [new], name=f"{p}/LastS")
            end = t.initializer(ir.tensor(np.array([np.iinfo(np.int64).max], np.int64), name=f"{p}/end"))
            axes = t.initializer(ir.tensor(np.array([1], np.int64), name=f"{p}/axes1"))
            last = t.op("Slice", [counted, start, end, axes], name=f"{p}/NewPositions")
            self._positions = t.op("Max", [last, zero], name=f"{p}/Positions")
            self.insert(t)
        return self._positions

    def rotary_tables(self, rotary: Rotary) -> tuple[ir.Value, ir.Value]:
        """cos / sin at the positions, ``[B, 1, S, R/2]``, once per pair of caches."""
        key = (id(rotary.cos), id(rotary.sin))
        if key not in self._tables:
            positions = self.positions()
            t, p = tape.Tape(), f"kv_cache/gqa/rotary{len(self._tables)}"
            axis = t.initializer(ir.tensor(np.array([1], np.int64), name=f"{p}/heads_axis"))
            tables = []
            for cache, what in ((rotary.cos, "Cos"), (rotary.sin, "Sin")):
                at = t.op("Gather", [cache, positions], {"axis": 0}, name=f"{p}/{what}At")
                table = t.op("Unsqueeze", [at, axis], name=f"{p}/{what}")
                table.dtype, table.shape = ir.DataType.FLOAT, ir.Shape([None, 1, None, rotary.half])
                tables.append(table)
            self.insert(t)
            self._tables[key] = (tables[0], tables[1])
        return self._tables[key]

    def bias(self) -> ir.Value:
        """``Where(causal & mask, 0, -inf)``: ``[B, 1, S, T]`` float32; query s sits at T - S + s."""
        if self._bias is None:
            t, p = tape.Tape(), "kv_cache/gqa"
            total, new = self._lengths(t)
            zero = t.initializer(ir.tensor(np.array(0, np.int64), name=f"{p}/zero"))
            step = t.initializer(ir.tensor(np.array(1, np.int64), name=f"{p}/step"))
            squeeze = t.initializer(ir.tensor(np.array([0], np.int64), name=f"{p}/squeeze0"))
            total_s = t.op("Squeeze", [total, squeeze], name=f"{p}/T")
            first_q = t.op("Sub", [total_s, t.op("Squeeze", [new, squeeze], name=f"{p}/S")], name=f"{p}/FirstQuery")
            keys = t.op("Range", [zero, total_s, step], name=f"{p}/KeyPositions")
            queries = t.op("Range", [first_q, total_s, step], name=f"{p}/QueryPositions")
            col = t.initializer(ir.tensor(np.array([1], np.int64), name=f"{p}/col"))
            causal = t.op("LessOrEqual", [keys, t.op("Unsqueeze", [queries, col], name=f"{p}/QueryCol")],
                          name=f"{p}/Causal")  # [S, T]
            mask_axes = t.initializer(ir.tensor(np.array([1, 2], np.int64), name=f"{p}/mask_axes"))
            kept = t.op("Unsqueeze", [t.op("Cast", [self.first.mask], {"to": ir.DataType.BOOL}, name=f"{p}/Kept"),
                                      mask_axes], name=f"{p}/KeptRows")  # [B, 1, 1, T]
            attend = t.op("And", [causal, kept], name=f"{p}/Attend")
            open_, closed = (t.initializer(ir.tensor(np.array(v, np.float32), name=f"{p}/{n}"))
                             for v, n in ((0.0, "attend"), (-np.inf, "masked")))
            self._bias = t.op("Where", [attend, open_, closed], name=f"{p}/Bias")
            self._bias.dtype = ir.DataType.FLOAT
            self.insert(t)
        return self._bias


def match(node: ir.Node, past_k: ir.Value, past_v: ir.Value, graph: ir.Graph) -> Layer:
    """The GroupQueryAttention ``node`` that reads ``past_k`` / ``past_v``, or :class:`Mismatch`."""
    ins = list(node.inputs) + [None] * (9 - len(node.inputs))
    where = describe_node(node)
    if ins[3] is not past_k or ins[4] is not past_v:
        raise Mismatch(f"{where} does not read {past_k.name!r} and {past_v.name!r} as its past key and value")
    for index in range(9, len(ins)):
        if ins[index] is not None:
            name = _INPUTS[index] if index < len(_INPUTS) else f"#{index}"
            raise Mismatch(f"{where} has the input {name} ({ins[index].name!r}), which the rewrite does not take")
    a = node.attributes
    unknown = sorted(set(a) - _KNOWN_ATTRIBUTES)
    if unknown:  # e.g. a quantized GQA cache (k_quant_type) or q/k norms inside the op (qk_norm_epsilon)
        raise Mismatch(f"{where} has the attribute(s) {', '.join(unknown)}, which the rewrite does not know")
    for attr, default in (("local_window_size", -1), ("softcap", 0.0), ("smooth_softmax", 0), ("qk_output", 0),
                          ("causal", 1)):
        value = a[attr].value if attr in a else default
        if value != default:
            raise Mismatch(f"{where} has {attr}={value}; the rewrite takes {attr}={default} only"
                           + (" (a sliding window)" if attr == "local_window_size" else ""))
    if len(node.outputs) > 3 and node.outputs[3].uses():
        raise Mismatch(f"{where}'s output_qk is used")
    heads, kv_heads = a.get_int("num_heads", 0), a.get_int("kv_num_heads", 0)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise Mismatch(f"{where} has num_heads={heads}, kv_num_heads={kv_heads}")
    if (ins[1] is None) != (ins[2] is None):
        raise Mismatch(f"{where} has a key without a value or a value without a key")
    head_dim = _head_dim(node)
    if head_dim is None:
        raise Mismatch(f"{where}: the width of its query {ins[0].name!r} is not static or not a multiple of its "
                       "heads")
    mask = _mask_of(ins[5])
    if mask is None or mask.shape is None or len(mask.shape) != 2:
        raise Mismatch(f"{where}: its seqlens_k {ins[5].name if ins[5] is not None else None!r} is not "
                       "ReduceSum(attention_mask) - 1 of a 2-D graph input")
    rotary = None
    if a.get_int("do_rotary", 0):
        cos, sin = ins[7], ins[8]
        tables = [table_shape(c) for c in (cos, sin)]
        if tables[0] is None or tables[0] != tables[1] or tables[0][1] * 2 > head_dim:
            raise Mismatch(f"{where} rotates without cos/sin caches of one static shape [positions, R/2] with R <= "
                           f"the head dim {head_dim} (they are {tables[0]} and {tables[1]})")
        rotary = Rotary(cos, sin, tables[0][1], tables[0][0])
    scale = a["scale"].value if "scale" in a else 0.0
    return Layer(node, heads, kv_heads, head_dim, float(scale) or 1.0 / float(np.sqrt(head_dim)), mask, rotary,
                 bool(a.get_int("rotary_interleaved", 0)))
