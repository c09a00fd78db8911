"""The standard-ONNX body of ``com.toolkit::QuantKVAttention`` (for the ``portable`` pass).

The body follows the op contract (custom_ops/kv_attention/kv_attention.h) and the
layout and reference in :mod:`toolkit.ops.kv_quant` step by step, with the cache
dequantized into full-precision tensors (what the fused kernel avoids):

1. unpack the codes (BitShift / BitwiseAnd) and dequantize: ``s * code + z``, or
   ``s * (code - 128)`` when symmetric; scales repeat over their group by a
   reshape to ``[..., groups, G, ...]`` and broadcasting;
2. attention over ``[dequantized past | residual | new tokens]``: GQA by a
   ``[B, Hkv, Hq/Hkv, S, D]`` view of the query, the additive bias or the causal
   rule, softmax (a row with every position masked gives zeros, as in the op);
3. the present cache: ``floor((r + S) / R) * R`` residual tokens (all when
   ``R = 0``) are quantized with float16 scale/zero computed from their min/max
   (``Round`` is round-half-to-even, like ``rint``), packed (lowest bits first) and
   appended; the rest stays the residual. With per-channel keys and a bias, key
   positions whose bias at the last query row is <= ``MASKED_BIAS`` are left out
   of the min/max (the padding rule).

The scheme (bits, groups, residual, symmetric, bias or causal) fixes the shape of
the computation, so each one gets its own function overload; ``scale`` is read
from the node at run time. Codes, scales and zeros come out bit-identical to the
reference's; the attention output differs from the kernel's only by float32
rounding (the kernel fuses the dequantization into its dot products).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import FunctionProto

from passes.function_builder import BOOL, FLOAT, FLOAT16, INT64, UINT8, FunctionBuilder
from toolkit.ops.kv_quant import MASKED_BIAS, OP_INPUTS, OP_OUTPUTS, KVScheme

DOMAIN = "com.toolkit"
_DEFAULTS = {"bits": 4, "key_per_channel": 1, "key_group": 32, "value_group": 32, "residual": 128, "symmetric": 0}


def _scheme(node: ir.Node) -> KVScheme:
    def get(name: str) -> int:
        attr = node.attributes.get(name)
        return _DEFAULTS[name] if attr is None else attr.as_int()

    return KVScheme(get("bits"), bool(get("key_per_channel")), get("key_group"), get("value_group"),
                    get("residual"), bool(get("symmetric")))


def _has_bias(node: ir.Node) -> bool:
    return len(node.inputs) > 11 and node.inputs[11] is not None


def overload_name(node: ir.Node) -> str:
    """The overload of this node's variant, e.g. ``b4_keys_per_channel_g32_32_r128_asym_bias``."""
    return overload_name_for(_scheme(node), _has_bias(node))


class _KVBody:
    """Builds the body for one scheme."""

    def __init__(self, scheme: KVScheme, with_bias: bool) -> None:
        self.s = scheme
        self.with_bias = with_bias
        self.b = FunctionBuilder()

    # ---------------------------------------------------------------- shapes
    def _shape(self, *parts: str) -> str:
        return self.b.op("Concat", *parts, axis=0)

    def _dim_div(self, tensor: str, axis: int, by: int) -> str:
        """``Shape(tensor)[axis] / by`` as a 1-D tensor (explicit: -1 cannot size an empty tensor)."""
        return self.b.op("Div", self.b.dim(tensor, axis, axis + 1), self.b.const([by]))

    def _grouped(self, x: str, per_channel: bool, group: int) -> tuple[str, int]:
        """``x [B, H, n, D]`` viewed with its quantization groups on their own axis (returned)."""
        b = self.b
        if per_channel:  # groups of G tokens: [B, H, n/G, G, D]
            shape = self._shape(b.dim(x, 0, 2), self._dim_div(x, 2, group), b.const([group]), b.dim(x, 3, 4))
            return b.reshape(x, shape), 3
        shape = self._shape(b.dim(x, 0, 3), self._dim_div(x, 3, group), b.const([group]))  # [B, H, n, D/G, G]
        return b.reshape(x, shape), 4

    # ---------------------------------------------------------------- codes
    def _unpack(self, packed: str) -> str:
        b, bits = self.b, self.s.bits
        if bits == 8:
            return b.op("Cast", packed, to=FLOAT)
        per = 8 // bits
        parts = b.op("BitShift", b.op("Unsqueeze", packed, b.const([-1])),
                     b.const([i * bits for i in range(per)], np.uint8), direction="RIGHT")
        codes = b.op("BitwiseAnd", parts, b.const((1 << bits) - 1, np.uint8))
        width = b.op("Mul", b.dim(packed, 3, 4), b.const([per]))
        return b.op("Cast", b.reshape(codes, self._shape(b.dim(packed, 0, 3), width)), to=FLOAT)

    def _pack(self, codes: str) -> str:
        b, bits = self.b, self.s.bits
        if bits == 8:
            return codes
        per = 8 // bits
        grouped = b.reshape(codes, self._shape(b.dim(codes, 0, 3), self._dim_div(codes, 3, per), b.const([per])))
        weighted = b.op("Mul", b.op("Cast", grouped, to=INT64),
                        b.const([1 << (i * bits) for i in range(per)]))  # disjoint bits: the sum is the OR
        return b.op("Cast", b.op("ReduceSum", weighted, b.const([-1]), keepdims=0), to=UINT8)

    def _dequantize(self, packed: str, scale: str, zero: str, per_channel: bool, group: int) -> str:
        b = self.b
        codes = self._unpack(packed)
        grouped, axis = self._grouped(codes, per_channel, group)
        s = b.op("Unsqueeze", b.op("Cast", scale, to=FLOAT), b.const([axis]))
        if self.s.symmetric:
            x = b.op("Mul", s, b.op("Sub", grouped, b.const(128.0, np.float32)))
        else:
            z = b.op("Unsqueeze", b.op("Cast", zero, to=FLOAT), b.const([axis]))
            x = b.op("Add", b.op("Mul", s, grouped), z)
        return b.reshape(x, b.dim(codes, 0))

    def _quantize(self, x: str, per_channel: bool, group: int, valid: str | None) -> tuple[str, str, str | None]:
        """``x [B, H, F, D]`` -> (packed codes, float16 scale, float16 zero or None)."""
        b = self.b
        grouped, axis = self._grouped(x, per_channel, group)
        axes = b.const([axis])
        levels = float((1 << self.s.bits) - 1)
        zero16 = None
        # ORT's ReduceMax / ReduceMin skip NaN on some paths: a group with a NaN gets a
        # NaN range explicitly, as in the reference and the kernels (kv_math.h NanMax)
        counted = grouped if valid is None else b.op("Where", valid, grouped, b.const(0.0, np.float32))
        has_nan = b.op("Greater", b.op("ReduceMax", b.op("Cast", b.op("IsNaN", counted), to=FLOAT), axes, keepdims=1),
                       b.const(0.0, np.float32))
        nan = b.const(np.nan, np.float32)
        if self.s.symmetric:
            amax = b.op("Where", has_nan, nan, b.op("ReduceMax", b.op("Abs", grouped), axes, keepdims=1))
            scale16 = b.op("Cast", b.op("Div", amax, b.const(127.0, np.float32)), to=FLOAT16)
            s = b.op("Cast", scale16, to=FLOAT)
            q = b.op("Round", b.op("Div", grouped, s))
            q = b.op("Where", b.op("IsNaN", q), b.const(-127.0, np.float32), q)  # inf / inf: the lowest code
            q = b.op("Clip", q, b.const(-127.0, np.float32), b.const(127.0, np.float32))
            q = b.op("Add", q, b.const(128.0, np.float32))
        else:
            if valid is None:
                lo = b.op("ReduceMin", grouped, axes, keepdims=1)
                hi = b.op("ReduceMax", grouped, axes, keepdims=1)
            else:  # padding positions do not count; a group with none valid is all zeros
                lo = b.op("ReduceMin", b.op("Where", valid, grouped, b.const(np.inf, np.float32)), axes, keepdims=1)
                hi = b.op("ReduceMax", b.op("Where", valid, grouped, b.const(-np.inf, np.float32)), axes, keepdims=1)
                empty = b.op("Greater", lo, hi)  # +inf > -inf; a NaN (kept, as in the kernels) compares false
                zero_f = b.const(0.0, np.float32)
                lo, hi = b.op("Where", empty, zero_f, lo), b.op("Where", empty, zero_f, hi)
            lo, hi = b.op("Where", has_nan, nan, lo), b.op("Where", has_nan, nan, hi)
            scale16 = b.op("Cast", b.op("Div", b.op("Sub", hi, lo), b.const(levels, np.float32)), to=FLOAT16)
            zero16 = b.op("Cast", lo, to=FLOAT16)
            s = b.op("Cast", scale16, to=FLOAT)
            q = b.op("Round", b.op("Div", b.op("Sub", grouped, b.op("Cast", zero16, to=FLOAT)), s))
            q = b.op("Where", b.op("IsNaN", q), b.const(0.0, np.float32), q)  # inf / inf: the lowest code
            q = b.op("Clip", q, b.const(0.0, np.float32), b.const(levels, np.float32))
        # a zero scale (constant group) codes everything as 0 (the symmetric 0 is 128)
        nothing = b.const(128.0 if self.s.symmetric else 0.0, np.float32)
        q = b.op("Where", b.op("Greater", s, b.const(0.0, np.float32)), q, nothing)
        codes = b.op("Cast", b.reshape(q, b.dim(x, 0)), to=UINT8)
        squeeze = b.const([axis])
        scale16 = b.op("Squeeze", scale16, squeeze)
        zero16 = None if zero16 is None else b.op("Squeeze", zero16, squeeze)
        return self._pack(codes), scale16, zero16

    # ---------------------------------------------------------------- body
    def build(self) -> FunctionProto:
        b, s = self.b, self.s
        one, two = b.const([1]), b.const([2])
        k_deq = self._dequantize("past_key_q", "past_key_scale", "past_key_zero", s.key_per_channel, s.key_group)
        v_deq = self._dequantize("past_value_q", "past_value_scale", "past_value_zero", False, s.value_group)
        k_res = b.op("Concat", "past_key_res", "key", axis=2)
        v_res = b.op("Concat", "past_value_res", "value", axis=2)
        keys = b.op("Concat", k_deq, k_res, axis=2)  # [B, Hkv, T, D]
        values = b.op("Concat", v_deq, v_res, axis=2)

        # attention: query head h reads KV head h / (Hq / Hkv)
        kv_heads = b.dim("key", 1, 2)
        rep = b.op("Div", b.dim("query", 1, 2), kv_heads)
        q5 = b.reshape("query", self._shape(b.dim("query", 0, 1), kv_heads, rep, b.dim("query", 2, 4)))
        k5 = b.op("Unsqueeze", keys, two)
        v5 = b.op("Unsqueeze", values, two)
        scores = b.op("MatMul", q5, b.op("Transpose", k5, perm=[0, 1, 2, 4, 3]))  # [B, Hkv, rep, S, T]
        scale_attr = b.attr("scale", "value_float")
        head_dim = b.op("Cast", b.dim("query", 3, 4), to=FLOAT)
        default_scale = b.op("Reciprocal", b.op("Sqrt", head_dim))
        scale = b.op("Where", b.op("Equal", scale_attr, b.const(0.0, np.float32)), default_scale, scale_attr)
        scores = b.op("Mul", scores, scale)
        total = b.dim(keys, 2, 3)
        if self.with_bias:
            scores = b.op("Add", scores, b.op("Unsqueeze", "attn_bias", one))
        else:  # causal: query s sees positions <= T - S + s
            steps = b.dim("query", 2, 3)
            total_0d = b.op("Squeeze", total, b.const([0]))
            positions = b.op("Range", b.const(0), total_0d, b.const(1))
            query_pos = b.op("Range", b.op("Squeeze", b.op("Sub", total, steps), b.const([0])), total_0d,
                             b.const(1))
            visible = b.op("LessOrEqual", positions, b.op("Unsqueeze", query_pos, one))  # [S, T]
            scores = b.op("Where", visible, scores, b.const(-np.inf, np.float32))
        # a fully masked row (every score -inf) gives zeros; a NaN score keeps its row NaN
        # (the reference and the kernels), so only rows with no score above -inf are zeroed
        open_scores = b.op("Cast", b.op("Not", b.op("IsInf", scores, detect_positive=0)), to=FLOAT)
        masked_row = b.op("Equal", b.op("ReduceMax", open_scores, b.const([-1]), keepdims=1),
                          b.const(0.0, np.float32))
        probs = b.op("Where", masked_row, b.const(0.0, np.float32), b.op("Softmax", scores, axis=-1))
        out = b.reshape(b.op("MatMul", probs, v5), b.dim("query", 0))
        b.rename(out, "output")

        # present cache: flush whole residual windows
        held = b.dim(k_res, 2, 3)
        flush = held if s.residual == 0 else b.op("Mul", b.op("Div", held, b.const([s.residual])),
                                                    b.const([s.residual]))
        big = b.const([np.iinfo(np.int64).max])
        k_flush = b.op("Slice", k_res, b.const([0]), flush, two)
        v_flush = b.op("Slice", v_res, b.const([0]), flush, two)
        valid = None
        if s.key_per_channel and self.with_bias:
            # bias [B|1, 1, S, T] at the last query row, positions N .. N+F-1 -> [B|1, 1, F/G, G, 1]
            past_n = b.dim("past_key_q", 2, 3)
            row = b.op("Slice", "attn_bias", b.const([-1]), b.const([np.iinfo(np.int64).max]), two)
            row = b.op("Slice", row, past_n, b.op("Add", past_n, flush), b.const([3]))
            kept = b.op("Greater", row, b.const(MASKED_BIAS, np.float32))  # [B|1, 1, 1, F]
            shape = self._shape(b.dim(row, 0, 1), b.const([1]), b.op("Div", flush, b.const([s.key_group])),
                                b.const([s.key_group, 1]))
            valid = b.op("Cast", b.reshape(kept, shape), to=BOOL)
        kq, ks, kz = self._quantize(k_flush, s.key_per_channel, s.key_group, valid)
        vq, vs, vz = self._quantize(v_flush, False, s.value_group, None)
        b.rename(b.op("Concat", "past_key_q", kq, axis=2), "present_key_q")
        b.rename(b.op("Concat", "past_key_scale", ks, axis=2), "present_key_scale")
        b.rename(b.op("Concat", "past_value_q", vq, axis=2), "present_value_q")
        b.rename(b.op("Concat", "past_value_scale", vs, axis=2), "present_value_scale")
        if s.symmetric:  # the node leaves these outputs unbound; the function still has to define them
            # as an empty slice of an input rather than a constant: optimizers that inline the
            # function and fold constants (onnxscript's) fail on a folded unbound output
            nothing = b.const([0])
            empty = b.op("Slice", "past_key_scale", nothing, nothing, nothing)
            b.rename(empty, "present_key_zero")
            b.rename(empty, "present_value_zero")
        else:
            b.rename(b.op("Concat", "past_key_zero", kz, axis=2), "present_key_zero")
            b.rename(b.op("Concat", "past_value_zero", vz, axis=2), "present_value_zero")
        b.rename(b.op("Slice", k_res, flush, big, two), "present_key_res")
        b.rename(b.op("Slice", v_res, flush, big, two), "present_value_res")
        inputs = list(OP_INPUTS if self.with_bias else OP_INPUTS[:-1])
        attributes = {name: int(v) for name, v in _DEFAULTS.items()} | {"scale": 0.0}
        return b.function(DOMAIN, "QuantKVAttention", inputs, list(OP_OUTPUTS), attributes,
                          overload=overload_name_for(s, self.with_bias))


def overload_name_for(scheme: KVScheme, with_bias: bool) -> str:
    keys = "keys_per_channel" if scheme.key_per_channel else "keys_per_token"
    return (f"b{scheme.bits}_{keys}_g{scheme.key_group}_{scheme.value_group}_r{scheme.residual}_"
            f"{'sym' if scheme.symmetric else 'asym'}_{'bias' if with_bias else 'causal'}")


def kv_attention_function(node: ir.Node) -> FunctionProto:
    """The body of this ``QuantKVAttention`` node's variant (see the module docstring)."""
    return _KVBody(_scheme(node), _has_bias(node)).build()
