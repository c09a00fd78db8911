"""Quantized KV cache: the scheme, the cache layout and a NumPy reference.

This module is THE place where the cache layout of ``com.toolkit::QuantKVAttention``
is defined; the C++/CUDA kernels (``custom_ops/kv_attention/``), the graph pass
(``passes/kv_cache.py``), the decoder driver and ``toolkit inspect`` all follow it.

Schemes (KIVI, Liu et al. 2024, "A Tuning-Free Asymmetric 2bit Quantization for KV
Cache"): keys are quantized **per channel** (one scale/zero per channel for a group
of ``key_group`` consecutive tokens) and values **per token** (one scale/zero per
token for a group of ``value_group`` consecutive channels). The ``residual`` most
recent tokens stay in full precision; when the residual window holds ``residual``
tokens it is quantized as one block (``residual / key_group`` key groups) and
emptied. The int8 schemes quantize keys per token too (no residual needed).

Per layer the cache is eight tensors (``past_key_values.{i}.<name>`` in,
``present.{i}.<name>`` out), with N quantized tokens and r < R residual tokens:

===============  =======  ==============================================  =============================
name             dtype    shape                                           meaning
===============  =======  ==============================================  =============================
``key_q``        uint8    ``[B, Hkv, N, D * bits / 8]``                   packed key codes, token rows
``key_scale``    float16  ``[B, Hkv, N / Gk, D]`` (per channel)           scale s of each group
                          ``[B, Hkv, N, D / Gk]`` (per token)
``key_zero``     float16  as ``key_scale`` (absent when symmetric)        zero point z (the group min)
``key_res``      float32  ``[B, Hkv, r, D]``                              full-precision residual keys
``value_q``      uint8    ``[B, Hkv, N, D * bits / 8]``                   packed value codes
``value_scale``  float16  ``[B, Hkv, N, D / Gv]``                         per token, per channel group
``value_zero``   float16  as ``value_scale`` (absent when symmetric)
``value_res``    float32  ``[B, Hkv, r, D]``
===============  =======  ==============================================  =============================

Packing: within a token row, byte ``j`` holds channels ``j*P .. j*P+P-1`` (``P =
8 / bits``), channel ``j*P + i`` in bits ``[i*bits, (i+1)*bits)`` (lowest first).

Quantization of a group ``x`` (float32), asymmetric: ``s = fp16((max - min) /
(2^bits - 1))``, ``z = fp16(min)``, ``code = clamp(rint((x - z) / s), 0, 2^bits - 1)``
(``code = 0`` when ``s == 0``), dequantized ``s * code + z``. Symmetric (int8
only): ``s = fp16(max|x| / 127)``, ``code = clamp(rint(x / s), -127, 127) + 128``,
dequantized ``s * (code - 128)``. Scales in float16 follow KIVI; at head dim 128
they keep int8 at 3.94x and 4-bit (G=32) at 6.4x smaller than float32.

Fixed capacity (op input ``cache_lengths``, ``toolkit convert --kv-capacity C``): the
token dimensions above become capacities (``C`` quantized slots, a multiple of Gk for
per-channel keys; ``R - 1`` residual slots), the valid ``(N, r)`` travel as an int64
``[2]`` tensor (``past_key_values.lengths`` / ``present.lengths`` in a converted
model), and every present tensor has the shape of its past tensor, so a host can bind
each present output to its past input's buffer (IOBinding) and the op appends the new
tokens in place. Slots past the valid lengths are never read (:func:`to_capacity`,
:func:`from_capacity`, :func:`attention_capacity`).

Padding: when keys are quantized per channel, positions whose attention bias (at
the last query row) is <= ``MASKED_BIAS`` are left out of the group's min/max, so
left-padding tokens do not widen the range of real tokens. Attention of the current
call uses the full-precision keys/values of the residual and the new tokens; they
are quantized for the *next* call (KIVI's prefill rule).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MASKED_BIAS = -1.0e8
CACHE_TENSORS = ("key_q", "key_scale", "key_zero", "key_res", "value_q", "value_scale", "value_zero", "value_res")


@dataclasses.dataclass(frozen=True)
class KVScheme:
    """A quantized-cache scheme (the attributes of ``QuantKVAttention``).

    Attributes:
        bits: 8, 4 or 2.
        key_per_channel: KIVI keys (per channel, groups of ``key_group`` tokens);
            False: per token, groups of ``key_group`` channels.
        key_group: Gk (tokens when per channel, channels when per token).
        value_group: Gv, channels per value group.
        residual: R, full-precision tokens kept before a block is quantized.
        symmetric: int8 only, per-token keys only: no zero point.
        quantize_query: round each scaled query row to int8 (:func:`quantize_query`)
            before attention; the CPU kernel then scores int8 per-token keys with
            integer dot products. Changes the numerics (see the README's KV section).
    """

    bits: int
    key_per_channel: bool
    key_group: int
    value_group: int
    residual: int
    symmetric: bool = False
    quantize_query: bool = False

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    def validate(self, head_dim: int) -> None:
        """Raise ``ValueError`` naming the attribute and the fix."""
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits={self.bits}: use 8, 4 or 2")
        if head_dim % self.per_byte:
            raise ValueError(f"head dim {head_dim} is not a multiple of {self.per_byte} ({self.bits}-bit packing)")
        if self.value_group <= 0 or head_dim % self.value_group:
            raise ValueError(f"value_group={self.value_group} must divide the head dim {head_dim}")
        if self.key_group <= 0:
            raise ValueError(f"key_group={self.key_group} must be positive")
        if self.key_per_channel:
            if self.residual < self.key_group or self.residual % self.key_group:
                raise ValueError(f"residual={self.residual} must be a positive multiple of key_group="
                                 f"{self.key_group} when keys are quantized per channel")
            if self.symmetric:
                raise ValueError("symmetric quantization is only for per-token int8 keys")
        else:
            if head_dim % self.key_group:
                raise ValueError(f"key_group={self.key_group} must divide the head dim {head_dim} (per-token keys)")
            if self.residual < 0:
                raise ValueError(f"residual={self.residual} must be >= 0")
        if self.symmetric and self.bits != 8:
            raise ValueError("symmetric quantization is int8 only")

    def bytes_per_token(self, kv_heads: int, head_dim: int) -> float:
        """Asymptotic cache bytes per token and layer (the residual window excluded)."""
        codes = 2 * kv_heads * head_dim * self.bits / 8
        params = 1 if self.symmetric else 2  # scale (+ zero), 2 bytes each
        # Per channel: D params per Gk tokens; per token: D / Gk params per token.
        key_params = kv_heads * head_dim / self.key_group * params * 2
        value_params = kv_heads * head_dim / self.value_group * params * 2
        return codes + key_params + value_params

    @property
    def residual_slots(self) -> int:
        """Most tokens the full-precision residual holds between calls (R - 1; a full window is flushed)."""
        return max(self.residual - 1, 0)

    def residual_bytes(self, kv_heads: int, head_dim: int) -> int:
        """Most bytes the full-precision residual can hold per layer (keys and values)."""
        return 2 * kv_heads * self.residual_slots * head_dim * 4

    def to_attributes(self) -> dict[str, int]:
        attrs = {"bits": self.bits, "key_per_channel": int(self.key_per_channel), "key_group": self.key_group,
                 "value_group": self.value_group, "residual": self.residual, "symmetric": int(self.symmetric)}
        if self.quantize_query:  # left out when off: models converted before it stay byte-identical
            attrs["quantize_query"] = 1
        return attrs


PRESETS = ("int8", "int8-asym", "int4", "kivi4", "kivi2")


QUERY_INT8_SUFFIX = "-q8"  # a preset name + this suffix: the same scheme with quantize_query

# The group size G of int4 and KIVI when none is given (KIVI's smallest); channel
# groups are capped to a smaller head dim.
DEFAULT_GROUP = 32


# The residual window of the 4- and 2-bit presets when none is given (int8 keeps
# none): on llama-stdlib, int4 per token without it misses the kv-int4 parity gate
# (one greedy flip in the 6-step decode) and passes with it (README, KV section).
LOW_BIT_RESIDUAL = 128


def scheme_for(name: str, head_dim: int, group: int = DEFAULT_GROUP, residual: int | None = None,
               quantize_query: bool = False) -> KVScheme:
    """The scheme of a ``--kv-cache`` name for a model with ``head_dim``.

    ``int8``: symmetric per token (one scale per head and token). ``int8-asym``:
    asymmetric per token. ``int4``: asymmetric per token in groups of ``group``
    channels. ``kivi4`` / ``kivi2``: KIVI keys per channel in groups of ``group``
    tokens, values per token in groups of ``min(group, head_dim)`` channels.
    ``residual``: full-precision recent tokens, quantized when the window fills;
    None gives each preset its own (``LOW_BIT_RESIDUAL`` for int4 and KIVI, none
    for int8). ``quantize_query`` (or the name suffix ``-q8``, e.g.
    ``int8-q8``): the query is rounded to int8 per row.
    """
    if name.endswith(QUERY_INT8_SUFFIX):
        name, quantize_query = name.removesuffix(QUERY_INT8_SUFFIX), True
    g_ch = min(group, head_dim)
    r8 = 0 if residual is None else residual
    r_low = LOW_BIT_RESIDUAL if residual is None else residual
    if name == "int8":
        s = KVScheme(8, False, head_dim, head_dim, r8, symmetric=True)
    elif name == "int8-asym":
        s = KVScheme(8, False, head_dim, head_dim, r8)
    elif name == "int4":
        s = KVScheme(4, False, g_ch, g_ch, r_low)
    elif name in ("kivi4", "kivi2"):
        s = KVScheme(4 if name == "kivi4" else 2, True, group, g_ch, r_low)
    else:
        raise ValueError(f"unknown KV cache scheme {name!r}: use one of {', '.join(PRESETS)}")
    if quantize_query:
        s = dataclasses.replace(s, quantize_query=True)
    s.validate(head_dim)
    return s


# ---------------------------------------------------------------- quantization


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16)


def quantize_groups(x: np.ndarray, bits: int, symmetric: bool, axis: int,
                    valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize ``x`` (float32) with one (scale, zero) per slice along ``axis``.

    ``x`` has the group as its ``axis`` dimension; ``valid`` (broadcastable bool)
    marks the elements that count for min/max. Returns integer codes (uint8, not
    packed), scale and zero (float16, ``axis`` reduced to size 1; zero is None when
    symmetric). A NaN among the counted elements makes the group's scale and zero
    NaN and its codes the fixed ones (128 symmetric, 0 asymmetric), so the NaN stays
    in every value read back; a NaN quotient (an inf element over an inf scale) takes
    the lowest code, as a clamp that fails every comparison does.
    """
    x = np.asarray(x, np.float32)
    levels = (1 << bits) - 1
    if symmetric:
        a = np.abs(x) if valid is None else np.where(valid, np.abs(x), 0.0)
        amax = a.max(axis=axis, keepdims=True).astype(np.float32)
        s16 = _f16(amax / np.float32(127.0))
        s = s16.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s > 0, np.rint(x / s), 0.0)
        codes = (np.clip(np.where(np.isnan(q), -127.0, q), -127, 127) + 128).astype(np.uint8)
        return codes, s16, None
    if valid is None:
        mn, mx = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    else:
        mn = np.where(valid, x, np.inf).min(axis=axis, keepdims=True)
        mx = np.where(valid, x, -np.inf).max(axis=axis, keepdims=True)
        none = mn > mx  # no valid element (+inf > -inf; a NaN compares false): an all-zero group
        mn, mx = np.where(none, 0.0, mn), np.where(none, 0.0, mx)
    s16 = _f16((mx.astype(np.float32) - mn.astype(np.float32)) / np.float32(levels))
    z16 = _f16(mn)
    s, z = s16.astype(np.float32), z16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint((x - z) / s), 0.0)
    codes = np.clip(np.where(np.isnan(q), 0.0, q), 0, levels).astype(np.uint8)
    return codes, s16, z16


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes ``[..., D]`` (uint8 < 2^bits) into ``[..., D * bits / 8]``."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).astype(np.uint8)
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per):
        out |= (c[..., i] << (i * bits)).astype(np.uint8)
    return out


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``[..., D * bits / 8]`` -> ``[..., D]`` codes."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per).astype(np.uint8)


def quantize_keys(k: np.ndarray, scheme: KVScheme, valid: np.ndarray | None = None):
    """Keys ``[B, H, n, D]`` -> (packed codes, scale, zero) in the cache layout."""
    b, h, n, d = k.shape
    if scheme.key_per_channel:
        g = scheme.key_group
        assert n % g == 0
        xg = k.reshape(b, h, n // g, g, d)
        vg = None if valid is None else valid.reshape(b, 1, n // g, g, 1)
        codes, s, z = quantize_groups(xg, scheme.bits, False, axis=3, valid=vg)
        codes = codes.reshape(b, h, n, d)
        s, z = s.reshape(b, h, n // g, d), z.reshape(b, h, n // g, d)
    else:
        g = scheme.key_group
        xg = k.reshape(b, h, n, d // g, g)
        codes, s, z = quantize_groups(xg, scheme.bits, scheme.symmetric, axis=4)
        codes = codes.reshape(b, h, n, d)
        s = s.reshape(b, h, n, d // g)
        z = None if z is None else z.reshape(b, h, n, d // g)
    return pack(codes, scheme.bits), s, z


def quantize_values(v: np.ndarray, scheme: KVScheme):
    """Values ``[B, H, n, D]`` -> (packed codes, scale, zero), per token."""
    b, h, n, d = v.shape
    g = scheme.value_group
    codes, s, z = quantize_groups(v.reshape(b, h, n, d // g, g), scheme.bits, scheme.symmetric, axis=4)
    return (pack(codes.reshape(b, h, n, d), scheme.bits), s.reshape(b, h, n, d // g),
            None if z is None else z.reshape(b, h, n, d // g))


def dequantize_keys(q: np.ndarray, s: np.ndarray, z: np.ndarray | None, scheme: KVScheme) -> np.ndarray:
    codes = unpack(q, scheme.bits).astype(np.float32)
    if scheme.key_per_channel:
        g = scheme.key_group
        sf = np.repeat(s.astype(np.float32), g, axis=2)
        zf = np.repeat(z.astype(np.float32), g, axis=2)
    else:
        g = scheme.key_group
        sf = np.repeat(s.astype(np.float32), g, axis=3)
        zf = None if z is None else np.repeat(z.astype(np.float32), g, axis=3)
    if zf is None:
        return sf * (codes - 128.0)
    return sf * codes + zf


def dequantize_values(q: np.ndarray, s: np.ndarray, z: np.ndarray | None, scheme: KVScheme) -> np.ndarray:
    codes = unpack(q, scheme.bits).astype(np.float32)
    g = scheme.value_group
    sf = np.repeat(s.astype(np.float32), g, axis=3)
    if z is None:
        return sf * (codes - 128.0)
    return sf * codes + np.repeat(z.astype(np.float32), g, axis=3)


def empty_cache(batch: int, kv_heads: int, head_dim: int, scheme: KVScheme) -> dict[str, np.ndarray]:
    """The cache of a sequence with no tokens yet (all lengths 0)."""
    pb = head_dim * scheme.bits // 8
    kshape = (batch, kv_heads, 0, head_dim) if scheme.key_per_channel else \
        (batch, kv_heads, 0, head_dim // scheme.key_group)
    vshape = (batch, kv_heads, 0, head_dim // scheme.value_group)
    out = {
        "key_q": np.zeros((batch, kv_heads, 0, pb), np.uint8),
        "key_scale": np.zeros(kshape, np.float16),
        "key_zero": np.zeros(kshape, np.float16),
        "key_res": np.zeros((batch, kv_heads, 0, head_dim), np.float32),
        "value_q": np.zeros((batch, kv_heads, 0, pb), np.uint8),
        "value_scale": np.zeros(vshape, np.float16),
        "value_zero": np.zeros(vshape, np.float16),
        "value_res": np.zeros((batch, kv_heads, 0, head_dim), np.float32),
    }
    if scheme.symmetric:
        del out["key_zero"], out["value_zero"]
    return out


def _cat(a: np.ndarray | None, b: np.ndarray | None, axis: int = 2) -> np.ndarray | None:
    if a is None or b is None:
        return None
    return np.concatenate([a, b], axis=axis)


def quantize_query(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The int8 query of ``quantize_query=1``: (rounded query, codes, scales), float32.

    Per row (last axis) of the already scaled query ``q``: ``a = max |q|``, codes
    ``c = round(q * (127 / a))`` (half to even) in [-127, 127], scale ``a / 127``,
    rounded query ``c * scale``; all in float32, in this order (the kernel's
    arithmetic). A row of zeros stays zero; a row holding inf or NaN becomes NaN.
    """
    q = np.asarray(q, np.float32)
    amax = np.abs(q).max(axis=-1, keepdims=True)
    finite = np.isfinite(amax)
    ok = finite & (amax > 0)
    safe = np.where(ok, amax, np.float32(1))
    codes = np.clip(np.rint(q * (np.float32(127) / safe)), -127, 127).astype(np.float32)
    codes = np.where(ok, codes, np.float32(0))
    scales = np.where(ok, safe / np.float32(127), np.where(finite, np.float32(0), np.float32(np.nan)))
    scales = scales.astype(np.float32)
    rounded = np.where(ok, codes * scales, np.broadcast_to(scales, q.shape)).astype(np.float32)
    return rounded, codes.astype(np.int8), scales[..., 0]


def scaled_query(query: np.ndarray, scale: float = 0.0) -> np.ndarray:
    """``query * scale`` in float32 as the kernel forms it (``scale`` 0: ``1 / sqrt(D)`` in float32)."""
    d = query.shape[-1]
    sc32 = np.float32(scale) if scale else np.float32(1) / np.sqrt(np.float32(d))
    return np.asarray(query, np.float32) * sc32


def attention(query: np.ndarray, key: np.ndarray, value: np.ndarray, cache: dict[str, np.ndarray],
              scheme: KVScheme, bias: np.ndarray | None = None, scale: float = 0.0
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reference of ``QuantKVAttention``: (output ``[B, Hq, S, D]``, present cache).

    ``query [B, Hq, S, D]``, ``key``/``value`` ``[B, Hkv, S, D]`` (the new tokens,
    RoPE applied), ``cache`` as :func:`empty_cache`, ``bias`` additive, shape
    ``[B or 1, 1, S, T]`` with ``T = N + r + S``; None means causal (query ``s``
    sees positions ``<= N + r + s``). ``scale`` 0 means ``1 / sqrt(D)``.
    """
    query, key, value = (np.asarray(t, np.float32) for t in (query, key, value))
    b, hq, s_len, d = query.shape
    hkv = key.shape[1]
    rep = hq // hkv
    n = cache["key_q"].shape[2]
    r = cache["key_res"].shape[2]
    t_len = n + r + s_len
    if bias is None:
        pos = np.arange(t_len)[None, :]
        qpos = (n + r + np.arange(s_len))[:, None]
        bias = np.where(pos <= qpos, 0.0, -np.inf).astype(np.float32)[None, None]
    bias = np.broadcast_to(np.asarray(bias, np.float32), (b, 1, s_len, t_len))

    k_deq = dequantize_keys(cache["key_q"], cache["key_scale"], cache.get("key_zero"), scheme)
    v_deq = dequantize_values(cache["value_q"], cache["value_scale"], cache.get("value_zero"), scheme)
    k_res = np.concatenate([cache["key_res"], key], axis=2)
    v_res = np.concatenate([cache["value_res"], value], axis=2)
    k_all = np.concatenate([k_deq, k_res], axis=2).astype(np.float64)
    v_all = np.concatenate([v_deq, v_res], axis=2).astype(np.float64)
    k_all = np.repeat(k_all, rep, axis=1)
    v_all = np.repeat(v_all, rep, axis=1)
    sc = scale or 1.0 / math.sqrt(d)
    q64 = query.astype(np.float64)
    if scheme.quantize_query:  # scaled in float32 as the kernel does, then rounded
        q64, sc = quantize_query(scaled_query(query, scale))[0].astype(np.float64), 1.0
    scores = np.einsum("bhsd,bhtd->bhst", q64, k_all) * sc + bias.astype(np.float64)
    m = scores.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(scores - m)
    den = p.sum(-1, keepdims=True)
    # a fully masked row (every score -inf) gives zeros; a NaN score makes its row NaN, as in the kernels
    p = p / np.where(den > 0, den, 1.0)
    out = np.einsum("bhst,bhtd->bhsd", p, v_all).astype(np.float32)

    # The present cache: flush whole residual blocks.
    total_r = r + s_len
    if scheme.residual > 0:
        flush = (total_r // scheme.residual) * scheme.residual
    else:
        flush = total_r
    present = dict(cache)
    if flush:
        kf, vf = k_res[:, :, :flush], v_res[:, :, :flush]
        valid = None
        if scheme.key_per_channel:
            valid = bias[:, 0, -1, n: n + flush] > MASKED_BIAS  # [B, flush]
            valid = valid[:, None, :]
        kq, ks, kz = quantize_keys(kf, scheme, valid)
        vq, vs, vz = quantize_values(vf, scheme)
        present["key_q"] = _cat(cache["key_q"], kq)
        present["key_scale"] = _cat(cache["key_scale"], ks)
        present["value_q"] = _cat(cache["value_q"], vq)
        present["value_scale"] = _cat(cache["value_scale"], vs)
        if not scheme.symmetric:
            present["key_zero"] = _cat(cache["key_zero"], kz)
            present["value_zero"] = _cat(cache["value_zero"], vz)
    present["key_res"] = np.ascontiguousarray(k_res[:, :, flush:])
    present["value_res"] = np.ascontiguousarray(v_res[:, :, flush:])
    return out, present


# ---------------------------------------------------------------- fixed-capacity cache
#
# The op's second cache mode (input ``cache_lengths``): every cache tensor keeps a
# fixed token dimension (``capacity`` quantized slots, ``residual_slots`` residual
# slots), the valid lengths (N, r) travel as an int64 [2] tensor, and the present
# tensors have the shape of the past ones, so a host can bind each present output to
# its past input's buffer. Slots past the valid lengths are never read.


def _token_slots(name: str, tokens: int, scheme: KVScheme) -> int:
    """Length along axis 2 of cache tensor ``name`` holding ``tokens`` quantized tokens."""
    if name in ("key_scale", "key_zero") and scheme.key_per_channel:
        return tokens // scheme.key_group
    return tokens


def to_capacity(cache: dict[str, np.ndarray], scheme: KVScheme, capacity: int,
                residual_slots: int | None = None, fill: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A growing-layout cache in fixed-capacity tensors (``fill`` in the unused slots) and its lengths."""
    n, r = cache["key_q"].shape[2], cache["key_res"].shape[2]
    slots = scheme.residual_slots if residual_slots is None else residual_slots
    if n > capacity or r > slots:
        raise ValueError(f"cache of {n} quantized + {r} residual tokens does not fit {capacity} + {slots} slots")
    if scheme.key_per_channel and capacity % scheme.key_group:
        raise ValueError(f"capacity {capacity} must be a multiple of key_group={scheme.key_group}")
    out = {}
    for name, t in cache.items():
        size = slots if name.endswith("_res") else _token_slots(name, capacity, scheme)
        full = np.full(t.shape[:2] + (size,) + t.shape[3:], fill, t.dtype)
        full[:, :, :t.shape[2]] = t
        out[name] = full
    return out, np.array([n, r], np.int64)


def from_capacity(cache: dict[str, np.ndarray], lengths: np.ndarray, scheme: KVScheme) -> dict[str, np.ndarray]:
    """The valid part of a fixed-capacity cache, in the growing layout."""
    n, r = (int(v) for v in lengths)
    return {name: np.ascontiguousarray(t[:, :, :(r if name.endswith("_res") else _token_slots(name, n, scheme))])
            for name, t in cache.items()}


def attention_capacity(query: np.ndarray, key: np.ndarray, value: np.ndarray, cache: dict[str, np.ndarray],
                       lengths: np.ndarray, scheme: KVScheme, bias: np.ndarray | None = None, scale: float = 0.0
                       ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Reference of the fixed-capacity mode: (output, present tensors, present lengths).

    The present tensors are the past ones with the valid part replaced by
    :func:`attention`'s present cache; unused slots keep their past contents.
    """
    out, grown = attention(query, key, value, from_capacity(cache, lengths, scheme), scheme, bias, scale)
    present = {name: t.copy() for name, t in cache.items()}
    n2, r2 = grown["key_q"].shape[2], grown["key_res"].shape[2]
    for name, t in grown.items():
        if t.shape[2] > present[name].shape[2]:
            raise ValueError(f"cache full: {name} needs {t.shape[2]} slots, has {present[name].shape[2]}")
        present[name][:, :, :t.shape[2]] = t
    return out, present, np.array([n2, r2], np.int64)


# ---------------------------------------------------------------- one-node model

OP_TYPE = "QuantKVAttention"
OP_INPUTS = ("query", "key", "value", *(f"past_{n}" for n in CACHE_TENSORS), "attn_bias")
OP_OUTPUTS = ("output", *(f"present_{n}" for n in CACHE_TENSORS))
# The fixed-capacity mode's extra input (index 12) and output (index 9), and their names
# in a converted model (one pair for all layers, named as cache tensors so decoders feed
# each step's present.lengths back as the next past_key_values.lengths).
LENGTHS_INPUT, LENGTHS_OUTPUT = "cache_lengths", "present_cache_lengths"
MODEL_LENGTHS_INPUT, MODEL_LENGTHS_OUTPUT = "past_key_values.lengths", "present.lengths"


def _dims(name: str) -> list[int | str]:
    """The lengths are [2]; every other tensor of the op is rank 4 with symbolic dimensions."""
    if name.endswith("cache_lengths"):
        return [2]
    return [f"{name}_{i}" for i in range(4)]


def single_op_model(scheme: KVScheme, with_bias: bool = True, scale: float = 0.0, capacity: bool = False):
    """An ONNX model holding one ``QuantKVAttention`` node; I/O named as in ``OP_INPUTS``/``OP_OUTPUTS``.

    ``capacity``: the fixed-capacity cache mode (``cache_lengths`` in,
    ``present_cache_lengths`` out); otherwise the growing cache.
    """
    from onnx import TensorProto, helper

    from toolkit import ops

    types = {"q": TensorProto.UINT8, "scale": TensorProto.FLOAT16, "zero": TensorProto.FLOAT16,
             "lengths": TensorProto.INT64}

    def ttype(name: str) -> int:
        return types.get(name.rsplit("_", 1)[-1], TensorProto.FLOAT)

    skip = {"past_key_zero", "past_value_zero", "present_key_zero", "present_value_zero"} if scheme.symmetric else set()
    extra_in, extra_out = ((LENGTHS_INPUT,), (LENGTHS_OUTPUT,)) if capacity else ((), ())
    ins = [n if n not in skip and (n != "attn_bias" or with_bias) else "" for n in OP_INPUTS + extra_in]
    outs = [n if n not in skip else "" for n in OP_OUTPUTS + extra_out]
    for names in (ins, outs):
        while names and not names[-1]:
            names.pop()
    node = helper.make_node(OP_TYPE, ins, outs, domain=ops.DOMAIN, scale=float(scale), **scheme.to_attributes())
    graph = helper.make_graph(
        [node], "quant_kv_attention",
        [helper.make_tensor_value_info(n, ttype(n), _dims(n)) for n in ins if n],
        [helper.make_tensor_value_info(n, ttype(n), _dims(n)) for n in outs if n])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])
    model.ir_version = 10
    return model
