"""QuantKVAttention: the CPU kernel vs the NumPy reference of the same quantization.

Each test runs several calls in a row (a prefill, then decode steps that fill and
flush the residual window), feeding each side its own present cache back:
- codes, float16 scales/zeros and the float32 residual must be bit-identical to the
  reference (``toolkit/ops/kv_quant.py``): the quantization is deterministic
  arithmetic (float32 min/max, one division, round-to-nearest-even);
- outputs within 2e-5 absolute + 2e-5 relative: the reference accumulates in
  float64, the kernel in float32 with a different summation order (online softmax
  over slices); with |v| <= ~4 and T <= 3000 the float32 error is below 1e-5.
Against full-precision attention the error must stay within the scheme's bound.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit import ops
from toolkit.ops import kv_quant as kq

OUT_ATOL = 2e-5
OUT_RTOL = 2e-5

SCHEMES = {
    "int8": kq.KVScheme(8, False, 32, 32, 0, symmetric=True),
    "int8-asym": kq.KVScheme(8, False, 32, 16, 0),
    "int4-token": kq.KVScheme(4, False, 16, 16, 0),
    "int4-res": kq.KVScheme(4, False, 32, 32, 8),
    "kivi4": kq.KVScheme(4, True, 8, 16, 16),
    "kivi2": kq.KVScheme(2, True, 8, 32, 8),
    "kivi8": kq.KVScheme(8, True, 4, 8, 12),
    # int8 query (quantize_query=1): integer dot products for per-token int8 keys and
    # for int4 keys in groups of 32k channels, the rounded query in float dot products
    # for the others (the KIVI schemes).
    "int8-q8": kq.KVScheme(8, False, 32, 32, 0, symmetric=True, quantize_query=True),
    "int8-asym-q8": kq.KVScheme(8, False, 32, 16, 0, quantize_query=True),
    "int4-q8": kq.KVScheme(4, False, 32, 16, 0, quantize_query=True),
    "int4-res-q8": kq.KVScheme(4, False, 32, 32, 8, quantize_query=True),
    "kivi4-q8": kq.KVScheme(4, True, 8, 16, 16, quantize_query=True),
    "kivi2-q8": kq.KVScheme(2, True, 8, 32, 8, quantize_query=True),
}


def make_session(scheme, with_bias=True, threads=1, scale=0.0, capacity=False, provider="cpu"):
    """One QuantKVAttention node in a session on the CPU EP, or on the CUDA EP (skips
    with the reason when onnxruntime-gpu, a CUDA device or the CUDA kernels are missing)."""
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("CUDAExecutionProvider is not available (needs onnxruntime-gpu and a CUDA device)")
        if not ops.has_cuda():
            pytest.skip("libtoolkit_ops.so was built without CUDA kernels")
    so = ops.session_options(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = kq.single_op_model(scheme, with_bias=with_bias, scale=scale, capacity=capacity)
    ep = "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=[ep])
    assert ep in sess.get_providers()
    return sess


def run_op(sess, q, k, v, cache, bias=None):
    feeds = {"query": q, "key": k, "value": v, **{f"past_{n}": t for n, t in cache.items()}}
    if bias is not None:
        feeds["attn_bias"] = bias
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds)))
    present = {n[len("present_"):]: t for n, t in outs.items() if n.startswith("present_")}
    return outs["output"], present


def causal_bias(batch, s_len, past, pad=None):
    """[B, 1, S, past + S] additive mask: causal, plus left padding (pad[b] positions)."""
    t_len = past + s_len
    pos = np.arange(t_len)[None, :]
    qpos = (past + np.arange(s_len))[:, None]
    allowed = np.broadcast_to(pos <= qpos, (batch, s_len, t_len)).copy()
    if pad is not None:
        for b, p in enumerate(pad):
            allowed[b, :, :p] = False
    return np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]


def assert_cache_equal(got, ref, where):
    assert set(got) == set(ref), where
    for name in ref:
        assert got[name].shape == ref[name].shape, f"{where}: {name} {got[name].shape} vs {ref[name].shape}"
        assert got[name].dtype == ref[name].dtype, f"{where}: {name}"
        np.testing.assert_array_equal(got[name], ref[name], err_msg=f"{where}: {name}")


def step_inputs(rng, batch, hq, hkv, s_len, d):
    """Queries, keys, values of one call; keys with per-channel offsets (the outlier channels KIVI is built for)."""
    q = rng.standard_normal((batch, hq, s_len, d)).astype(np.float32)
    k = (rng.standard_normal((batch, hkv, s_len, d)) + np.linspace(-3, 3, d)).astype(np.float32)
    v = rng.standard_normal((batch, hkv, s_len, d)).astype(np.float32)
    return q, k, v


def drive(scheme, batch, hq, hkv, d, steps, threads=1, with_bias=True, pad=None, seed=0, scale=0.0):
    """Prefill + decode with the op and the reference; returns per-step outputs of both."""
    rng = np.random.default_rng(seed)
    sess = make_session(scheme, with_bias=with_bias, threads=threads, scale=scale)
    cache_op = kq.empty_cache(batch, hkv, d, scheme)
    cache_ref = kq.empty_cache(batch, hkv, d, scheme)
    past = 0
    results = []
    for i, s_len in enumerate(steps):
        q, k, v = step_inputs(rng, batch, hq, hkv, s_len, d)
        bias = causal_bias(batch, s_len, past, pad) if with_bias else None
        out, cache_op = run_op(sess, q, k, v, cache_op, bias)
        ref, cache_ref = kq.attention(q, k, v, cache_ref, scheme, bias, scale)
        assert_cache_equal(cache_op, cache_ref, f"call {i}")
        np.testing.assert_allclose(out, ref, rtol=OUT_RTOL, atol=OUT_ATOL, err_msg=f"call {i}")
        results.append((q, k, v, bias, out))
        past += s_len
    return results, cache_op


@pytest.mark.parametrize("path", ["simd", "scalar"])
@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("batch,hq,hkv,d", [(1, 4, 2, 32), (2, 2, 2, 64), (1, 8, 1, 32)])
def test_prefill_then_decode_matches_reference(name, batch, hq, hkv, d, path, monkeypatch):
    # The CPU kernel has an AVX2 path and a portable one (TOOLKIT_KV_SCALAR=1 forces it).
    if path == "scalar":
        monkeypatch.setenv("TOOLKIT_KV_SCALAR", "1")
    scheme = SCHEMES[name]
    # 13-token prefill, then 1-token steps and a 5-token chunk: several windows fill and flush.
    drive(scheme, batch, hq, hkv, d, steps=[13] + [1] * 20 + [5, 1, 1])


@pytest.mark.parametrize("name", ["kivi4", "kivi2", "int8"])
def test_causal_default_without_bias(name):
    drive(SCHEMES[name], 1, 4, 2, 32, steps=[9, 1, 1, 7, 1], with_bias=False)


@pytest.mark.parametrize("name", ["kivi4", "int4-res"])
def test_left_padding_is_left_out_of_key_ranges(name):
    # Batch rows with 0, 3 and 11 padding tokens; padded keys get huge values that
    # would wreck a group's range if they were counted.
    scheme = SCHEMES[name]
    rng = np.random.default_rng(5)
    batch, hq, hkv, d, pad = 3, 4, 2, 32, [0, 3, 11]
    sess = make_session(scheme)
    cache_op = kq.empty_cache(batch, hkv, d, scheme)
    cache_ref = kq.empty_cache(batch, hkv, d, scheme)
    past = 0
    for s_len in [20, 1, 1, 1, 1, 8]:
        q = rng.standard_normal((batch, hq, s_len, d)).astype(np.float32)
        k = rng.standard_normal((batch, hkv, s_len, d)).astype(np.float32)
        v = rng.standard_normal((batch, hkv, s_len, d)).astype(np.float32)
        if past == 0:
            for b, p in enumerate(pad):
                k[b, :, :p] = 1e4
        bias = causal_bias(batch, s_len, past, pad)
        out, cache_op = run_op(sess, q, k, v, cache_op, bias)
        ref, cache_ref = kq.attention(q, k, v, cache_ref, scheme, bias)
        assert_cache_equal(cache_op, cache_ref, f"past {past}")
        np.testing.assert_allclose(out, ref, rtol=OUT_RTOL, atol=OUT_ATOL)
        past += s_len
    if scheme.key_per_channel:
        # Row 2's first key group (16 positions, 11 padded) kept a range of real keys.
        scales = cache_op["key_scale"][2, :, 0].astype(np.float32)
        assert scales.max() < 1.0, scales.max()


@pytest.mark.parametrize("scheme", [kq.KVScheme(2, True, 8, 8, 8), kq.KVScheme(4, False, 8, 8, 0),
                                    kq.KVScheme(8, False, 8, 8, 0),
                                    kq.KVScheme(8, False, 24, 8, 0, symmetric=True, quantize_query=True),
                                    kq.KVScheme(2, True, 8, 8, 8, quantize_query=True)],
                         ids=["kivi2", "int4-token", "int8-asym", "int8-q8", "kivi2-q8"])
def test_head_dim_not_a_multiple_of_16(scheme):
    # D = 24: 2-bit rows take the portable path (the AVX2 one reads 16 channels at a
    # time), 4- and 8-bit rows the AVX2 one with a lone last 8-channel chunk.
    drive(scheme, 1, 4, 2, 24, steps=[13] + [1] * 12)


def test_long_context_uses_slices_and_matches():
    # T ~ 1100 at batch 1 and 1 KV head: the kernel splits positions into slices.
    scheme = kq.KVScheme(4, True, 32, 32, 64)
    drive(scheme, 1, 4, 1, 64, steps=[1030, 1, 1, 63, 1])


def test_two_threads_are_bit_identical_to_one():
    scheme = SCHEMES["kivi2"]
    a, cache_a = drive(scheme, 2, 4, 2, 32, steps=[300, 1, 1, 1], threads=1, seed=3)
    b, cache_b = drive(scheme, 2, 4, 2, 32, steps=[300, 1, 1, 1], threads=2, seed=3)
    for (*_, out_a), (*_, out_b) in zip(a, b):
        np.testing.assert_array_equal(out_a, out_b)
    assert_cache_equal(cache_a, cache_b, "threads")


def test_scale_attribute():
    drive(SCHEMES["kivi4"], 1, 2, 2, 32, steps=[17, 1, 1], scale=0.05)


@pytest.mark.parametrize("path", ["simd", "scalar"])
@pytest.mark.parametrize("name", ["int8-q8", "int8-asym-q8", "int4-q8", "int4-res-q8", "int4-g64-q8", "kivi4-q8",
                                  "kivi2-q8"])
def test_int8_query_head_dim_128(name, path, monkeypatch):
    # Head dim 128 (the AVX2 integer path: 32 channels per multiply-add), 4 query rows
    # per KV head plus a lone one (rep 5), odd token counts: every branch of the 4x2
    # block and its remainders, against the reference; int4 key groups of 32 and 64
    # channels (two chunks per group scale).
    if path == "scalar":
        monkeypatch.setenv("TOOLKIT_KV_SCALAR", "1")
    scheme = SCHEMES.get(name) or kq.KVScheme(4, False, 64, 32, 0, quantize_query=True)
    drive(scheme, 1, 10, 2, 128, steps=[37, 1, 1, 3], seed=5)


def test_int8_query_rounding_is_applied():
    # The op with quantize_query=1 matches the reference that rounds the query and is
    # farther than the output tolerance from the one that does not (the rounding is
    # really there), while staying within a query quantization step of it.
    scheme = SCHEMES["int8-q8"]
    plain = kq.KVScheme(8, False, 32, 32, 0, symmetric=True)
    results, _ = drive(scheme, 1, 4, 2, 64, steps=[50, 1, 1], seed=7)
    cache = kq.empty_cache(1, 2, 64, plain)
    worst = 0.0
    for q, k, v, bias, out in results:
        ref, cache = kq.attention(q, k, v, cache, plain, bias)
        worst = max(worst, float(np.abs(out - ref).max()))
    assert worst > 10 * OUT_ATOL, worst
    assert worst < 0.05, worst


def test_int8_query_reference_rounding_rule():
    q = np.array([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, np.inf, 0.0, 2.0]], np.float32)
    rounded, codes, scales = kq.quantize_query(q)
    np.testing.assert_array_equal(codes[0], [64, -127, 32, 0])  # 63.5 -> 64 (half to even), 31.75 -> 32
    np.testing.assert_allclose(scales[0], 1.0 / 127, rtol=1e-7)
    np.testing.assert_array_equal(rounded[0], codes[0].astype(np.float32) * np.float32(1.0 / 127))
    np.testing.assert_array_equal(rounded[1], 0.0)
    assert scales[1] == 0.0 and np.isnan(scales[2]) and np.isnan(rounded[2]).all()
    x = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    r, c, s = kq.quantize_query(x)
    assert np.abs(c).max() == 127
    assert (np.abs(r - x) <= s[:, None] / 2 * (1 + 1e-6)).all()


def _fp_attention(q, k_all, v_all, bias):
    rep = q.shape[1] // k_all.shape[1]
    k_all, v_all = np.repeat(k_all, rep, 1).astype(np.float64), np.repeat(v_all, rep, 1).astype(np.float64)
    s = np.einsum("bhsd,bhtd->bhst", q.astype(np.float64), k_all) / math.sqrt(q.shape[-1]) + bias
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhst,bhtd->bhsd", p / p.sum(-1, keepdims=True), v_all)


# Bound on |out - fp_attention| for unit-normal q/v and offset keys, relative to the
# value range: the PV error alone is at most half a quantization step of v; key
# errors move the softmax weights, which costs about the same again.
ERROR_BOUND_STEPS = 1.5


@pytest.mark.parametrize("name", ["int8", "int4-token", "kivi4", "kivi2"])
def test_error_vs_full_precision_within_scheme_bound(name):
    scheme = SCHEMES[name]
    d = 32
    results, _ = drive(scheme, 1, 4, 2, d, steps=[40] + [1] * 30, seed=11)
    ks = np.concatenate([r[1] for r in results], axis=2)
    vs = np.concatenate([r[2] for r in results], axis=2)
    past = 0
    worst = 0.0
    for q, k, v, bias, out in results:
        s_len = q.shape[2]
        t = past + s_len
        ref = _fp_attention(q, ks[:, :, :t], vs[:, :, :t], bias.astype(np.float64))
        worst = max(worst, float(np.abs(out - ref).max()))
        past = t
    g = scheme.value_group
    vr = vs.reshape(*vs.shape[:-1], d // g, g)
    step = float((vr.max(-1) - vr.min(-1)).max()) / ((1 << scheme.bits) - 1)
    assert worst <= ERROR_BOUND_STEPS * step, (name, worst, step)
    if name == "kivi2":
        assert worst > 1e-3  # 2-bit must actually lose information (the test can fail)


def _feeds(scheme, batch=1, hq=4, hkv=2, s_len=1, d=32, n=0, r=0):
    cache = kq.empty_cache(batch, hkv, d, scheme)
    rng = np.random.default_rng(0)
    pb = d * scheme.bits // 8
    cache["key_q"] = np.zeros((batch, hkv, n, pb), np.uint8)
    cache["value_q"] = np.zeros((batch, hkv, n, pb), np.uint8)
    kshape = (batch, hkv, n // scheme.key_group, d) if scheme.key_per_channel else \
        (batch, hkv, n, d // scheme.key_group)
    cache["key_scale"] = np.zeros(kshape, np.float16)
    cache["value_scale"] = np.zeros((batch, hkv, n, d // scheme.value_group), np.float16)
    if not scheme.symmetric:
        cache["key_zero"] = cache["key_scale"].copy()
        cache["value_zero"] = cache["value_scale"].copy()
    cache["key_res"] = np.zeros((batch, hkv, r, d), np.float32)
    cache["value_res"] = np.zeros((batch, hkv, r, d), np.float32)
    feeds = {"query": rng.standard_normal((batch, hq, s_len, d)).astype(np.float32),
             "key": rng.standard_normal((batch, hkv, s_len, d)).astype(np.float32),
             "value": rng.standard_normal((batch, hkv, s_len, d)).astype(np.float32),
             **{f"past_{k}": v for k, v in cache.items()}}
    return feeds


def _fail(sess, feeds, *fragments):
    with pytest.raises(Exception) as err:
        sess.run(None, feeds)
    msg = str(err.value)
    assert "QuantKVAttention" in msg
    for f in fragments:
        assert f in msg, msg


@pytest.mark.parametrize("name", ["int8", "kivi4"])
def test_a_nan_score_makes_its_row_nan_at_any_position(name):
    """A NaN bias at any position of a row makes that row NaN, as ONNX Softmax does (and
    the reference): the vectorised exp clamped a NaN to exp(-87), which dropped NaN
    scores in whole 8-lane blocks (positions 0-55 of 61) and kept only the tail's."""
    scheme = SCHEMES[name]
    sess = make_session(scheme, with_bias=True)
    n, r = (48, 3) if scheme.residual else (60, 0)
    feeds = _feeds(scheme, hq=2, hkv=1, n=n, r=r)
    rng = np.random.default_rng(1)
    feeds["past_key_res"] = rng.standard_normal(feeds["past_key_res"].shape).astype(np.float32)
    feeds["past_value_res"] = rng.standard_normal(feeds["past_value_res"].shape).astype(np.float32)
    t_len = n + r + 1
    cache = {k[len("past_"):]: v for k, v in feeds.items() if k.startswith("past_")}
    for pos in range(t_len):
        bias = np.zeros((1, 1, 1, t_len), np.float32)
        bias[..., pos] = np.nan
        out, _ = run_op(sess, feeds["query"], feeds["key"], feeds["value"], cache, bias)
        ref, _ = kq.attention(feeds["query"], feeds["key"], feeds["value"], dict(cache), scheme, bias)
        assert np.isnan(out).all() and np.isnan(ref).all(), (pos, out)
    out, _ = run_op(sess, feeds["query"], feeds["key"], feeds["value"], cache, np.zeros((1, 1, 1, t_len), np.float32))
    assert np.isfinite(out).all()


def test_invalid_inputs_are_named():
    scheme = SCHEMES["kivi4"]
    sess = make_session(scheme, with_bias=True)
    good = _feeds(scheme, n=16, r=3)
    good["attn_bias"] = np.zeros((1, 1, 1, 20), np.float32)
    sess.run(None, good)  # the baseline is valid

    f = dict(good, past_key_q=np.zeros((1, 2, 16, 15), np.uint8))
    _fail(sess, f, "'past_key_q'", "[1,2,16,15]", "[1,2,-1,16]")
    f = _feeds(scheme, n=12, r=3)
    f["attn_bias"] = np.zeros((1, 1, 1, 16), np.float32)
    _fail(sess, f, "'past_key_q'", "multiple of key_group=8")
    f = _feeds(scheme, n=16, r=16)
    f["attn_bias"] = np.zeros((1, 1, 1, 33), np.float32)
    _fail(sess, f, "'past_key_res'", "fewer than residual=16")
    f = dict(good, attn_bias=np.zeros((1, 1, 1, 19), np.float32))
    _fail(sess, f, "'attn_bias'", "[1,1,1,20]")
    f = dict(good, key=np.zeros((1, 3, 1, 32), np.float32))
    _fail(sess, f, "'key'", "kv_heads dividing")
    f = dict(good, past_value_scale=np.zeros((1, 2, 16, 3), np.float16))
    _fail(sess, f, "'past_value_scale'", "[1,2,16,2]")
    f = dict(good, past_key_scale=np.zeros((1, 2, 16, 32), np.float16))
    _fail(sess, f, "'past_key_scale'", "[1,2,2,32]")


def test_codes_of_the_wrong_length_are_named_beside_their_scales():
    """int8 past codes one token short: the scales are the tensor that disagrees first,
    so the error names both, with the codes' shape, instead of blaming the scales alone."""
    scheme = SCHEMES["int8"]
    sess = make_session(scheme, with_bias=False)
    good = _feeds(scheme, n=12, r=0)
    sess.run(None, good)
    f = dict(good, past_key_q=good["past_key_q"][:, :, :11])
    _fail(sess, f, "'past_key_scale'", "past_key_q [1,2,11,32]", "fix that one")
    f = dict(good, past_value_q=good["past_value_q"][:, :, :11])
    _fail(sess, f, "'past_value_q'", "[1,2,11,32]")


@pytest.mark.parametrize("name", ["int8", "int8-q8", "kivi4", "kivi4-q8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nan_or_inf_query_makes_its_head_nan(name, bad):
    """A NaN (or inf) in one query row gave that head an output of exactly 0.0 (every
    score NaN: the slice looked fully masked), which looks like a real activation; the
    head is NaN now, as in the reference, and the other head is untouched."""
    scheme = SCHEMES[name]
    sess = make_session(scheme, with_bias=False)
    n, r = (16, 3) if scheme.residual else (16, 0)
    feeds = _feeds(scheme, hq=2, hkv=1, n=n, r=r)
    clean = sess.run(["output"], feeds)[0]
    feeds["query"] = feeds["query"].copy()
    feeds["query"][0, 0, 0, 0] = bad
    out = sess.run(["output"], feeds)[0]
    cache = {k[len("past_"):]: v for k, v in feeds.items() if k.startswith("past_")}
    ref, _ = kq.attention(feeds["query"], feeds["key"], feeds["value"], cache, scheme, None)
    assert np.isnan(out[0, 0]).all() and np.isnan(ref[0, 0]).all()
    np.testing.assert_array_equal(out[0, 1], clean[0, 1])


@pytest.mark.parametrize("left_out", ["present_key_zero", "present_value_zero", "both"])
def test_asymmetric_node_without_its_zero_outputs_is_a_named_error(left_out):
    """present_key_zero / present_value_zero are optional outputs (symmetric schemes have
    none); an asymmetric node that leaves one out wrote through a null output (SIGSEGV)."""
    scheme = SCHEMES["kivi4"]
    model = kq.single_op_model(scheme, with_bias=False)
    node = model.graph.node[0]
    names = ["present_key_zero", "present_value_zero"] if left_out == "both" else [left_out]
    for name in names:
        index = list(node.output).index(name)
        node.output[index] = ""
        model.graph.output.remove(next(o for o in model.graph.output if o.name == name))
    so = ops.session_options(1)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    expected = "both are" if left_out == "both" else f"{left_out} is"
    _fail(sess, _feeds(scheme), "symmetric=0 (bits=4) needs the outputs present_key_zero (3) and present_value_zero",
          f"but {expected} left out")


def test_an_integer_scale_attribute_is_that_scale():
    """`scale=1` written as an int attribute used to run at the default 1/sqrt(D)."""
    from onnx import helper

    scheme = SCHEMES["kivi4"]
    feeds = _feeds(scheme, n=16, r=3)  # 20 positions: the scale moves the softmax
    outs = []
    for value in (1, 1.0, 0.0):
        model = kq.single_op_model(scheme, with_bias=False)
        node = model.graph.node[0]
        node.attribute.remove(next(a for a in node.attribute if a.name == "scale"))
        node.attribute.append(helper.make_attribute("scale", value))
        sess = ort.InferenceSession(model.SerializeToString(), ops.session_options(1),
                                    providers=["CPUExecutionProvider"])
        outs.append(sess.run(["output"], feeds)[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.allclose(outs[0], outs[2], atol=1e-3)  # the default scale differs


def test_invalid_attributes_are_rejected():
    from onnx import helper

    for attrs, fragment in [({"bits": 3}, "bits=3"),
                            ({"key_per_channel": 1, "key_group": 32, "residual": 48}, "multiple"),
                            ({"symmetric": 1, "bits": 4, "key_per_channel": 0}, "symmetric=1"),
                            ({"quantize_query": 2}, "quantize_query=2"),
                            ({"bits": 4.0}, "attribute 'bits' must be an integer, got the float 4.0")]:
        model = kq.single_op_model(SCHEMES["kivi4"])
        node = model.graph.node[0]
        for key, value in attrs.items():
            for a in node.attribute:
                if a.name == key:
                    node.attribute.remove(a)
                    break
            node.attribute.append(helper.make_attribute(key, value))
        so = ops.session_options(1)
        with pytest.raises(Exception) as err:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
                None, _feeds(SCHEMES["kivi4"]))
        assert fragment in str(err.value), str(err.value)


def test_reference_pack_roundtrip_and_fp16_rounding():
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        codes = rng.integers(0, 1 << bits, (3, 64), dtype=np.uint8)
        assert np.array_equal(kq.unpack(kq.pack(codes, bits), bits), codes)
    # Byte layout: channel 0 in the low bits.
    assert kq.pack(np.array([[1, 2]], np.uint8), 4)[0, 0] == 0x21
    assert kq.pack(np.array([[1, 2, 3, 0]], np.uint8), 2)[0, 0] == 0b00111001


# ---------------------------------------------------------------- fixed-capacity cache
#
# With the input cache_lengths the cache tensors keep a fixed token dimension and the
# present outputs have the shape of the past inputs. Contract: the present tensors
# equal kq.attention_capacity bit for bit (valid part = the growing reference's
# present, unused slots = the past's), and the output is bit-identical to the
# growing cache's (the same arithmetic, only the strides differ). Unused slots are
# filled with garbage codes/scales to show they are never read.

GARBAGE = 0x7B  # uint8 code 123; float16 0x7B7B = 61280; float32 0x7B7B7B7B ~ 1.3e36


def _garbage_capacity(cache, scheme, capacity, slots):
    cap, lengths = kq.to_capacity(cache, scheme, capacity, slots)
    for name, t in cap.items():
        n = cache[name].shape[2]
        t.view(np.uint8)[:, :, n:] = GARBAGE
    return cap, lengths


def drive_capacity(scheme, batch, hq, hkv, d, steps, capacity, slots=None, threads=1, with_bias=True, seed=0,
                   provider="cpu"):
    rng = np.random.default_rng(seed)
    sess = make_session(scheme, with_bias=with_bias, threads=threads, capacity=True, provider=provider)
    grow = make_session(scheme, with_bias=with_bias, threads=threads, provider=provider)
    cache, lengths = _garbage_capacity(kq.empty_cache(batch, hkv, d, scheme), scheme, capacity, slots)
    cache_grow = kq.empty_cache(batch, hkv, d, scheme)
    past = 0
    for i, s_len in enumerate(steps):
        q, k, v = step_inputs(rng, batch, hq, hkv, s_len, d)
        bias = causal_bias(batch, s_len, past, None) if with_bias else None
        feeds = {"query": q, "key": k, "value": v, "cache_lengths": lengths,
                 **{f"past_{n}": t for n, t in cache.items()}}
        if bias is not None:
            feeds["attn_bias"] = bias
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        ref, ref_cache, ref_lengths = kq.attention_capacity(q, k, v, cache, lengths, scheme, bias)
        present = {n[len("present_"):]: t for n, t in outs.items()
                   if n.startswith("present_") and n != "present_cache_lengths"}
        assert_cache_equal(present, ref_cache, f"call {i}")
        np.testing.assert_array_equal(outs["present_cache_lengths"], ref_lengths)
        out_grow, cache_grow = run_op(grow, q, k, v, cache_grow, bias)
        np.testing.assert_array_equal(outs["output"], out_grow, err_msg=f"call {i}")
        np.testing.assert_allclose(outs["output"], ref, rtol=OUT_RTOL, atol=OUT_ATOL, err_msg=f"call {i}")
        cache, lengths = present, outs["present_cache_lengths"]
        past += s_len
    return cache, lengths


@pytest.mark.parametrize("path", ["simd", "scalar"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_fixed_capacity_matches_reference_and_growing_cache(name, path, monkeypatch):
    if path == "scalar":
        monkeypatch.setenv("TOOLKIT_KV_SCALAR", "1")
    scheme = SCHEMES[name]
    # 13 + 20 + 7 = 40 tokens into 48 quantized slots: windows fill and flush in place.
    drive_capacity(scheme, 2, 4, 2, 32, steps=[13] + [1] * 20 + [5, 1, 1], capacity=48)


def test_fixed_capacity_long_context_two_threads():
    # ~1100 positions at batch 1: sliced over two threads, into a 1152-slot cache.
    drive_capacity(kq.KVScheme(4, True, 32, 32, 64), 1, 4, 1, 64, steps=[1030, 1, 63, 1], capacity=1152,
                   threads=2)


@pytest.mark.parametrize("name", ["int8", "kivi4"])
def test_fixed_capacity_causal_default_and_extra_residual_slots(name):
    scheme = SCHEMES[name]
    drive_capacity(scheme, 1, 4, 2, 32, steps=[9, 1, 1, 7, 1], capacity=32, slots=scheme.residual + 5,
                   with_bias=False)


@pytest.mark.parametrize("name", ["int8", "kivi2", "int4-res"])
def test_fixed_capacity_in_place_with_iobinding(name):
    drive_in_place(SCHEMES[name], "cpu")


def drive_in_place(scheme, provider):
    """Present outputs bound to the past inputs' buffers: the op appends in place.

    The cache lives in one set of OrtValues (on the provider's device) for the whole
    run; after every step the buffers hold exactly what the reference's present cache
    holds.
    """
    batch, hq, hkv, d, capacity = 2, 4, 2, 32, 64
    rng = np.random.default_rng(7)
    sess = make_session(scheme, with_bias=True, capacity=True, provider=provider)
    cache, lengths = _garbage_capacity(kq.empty_cache(batch, hkv, d, scheme), scheme, capacity, None)
    ref_cache, ref_lengths = {n: t.copy() for n, t in cache.items()}, lengths.copy()
    values = {n: ort.OrtValue.ortvalue_from_numpy(t, provider, 0) for n, t in cache.items()}
    pointers = {n: v.data_ptr() for n, v in values.items()}
    binding = sess.io_binding()
    for n, v in values.items():
        binding.bind_ortvalue_input(f"past_{n}", v)
        binding.bind_ortvalue_output(f"present_{n}", v)
    # (an output: in device memory on CUDA; the input cache_lengths is read on the host)
    len_value = ort.OrtValue.ortvalue_from_numpy(np.zeros(2, np.int64), provider, 0)
    binding.bind_ortvalue_output("present_cache_lengths", len_value)
    past = 0
    for i, s_len in enumerate([11] + [1] * 40):
        q = rng.standard_normal((batch, hq, s_len, d)).astype(np.float32)
        k = rng.standard_normal((batch, hkv, s_len, d)).astype(np.float32)
        v = rng.standard_normal((batch, hkv, s_len, d)).astype(np.float32)
        bias = causal_bias(batch, s_len, past, None)
        for n, t in {"query": q, "key": k, "value": v, "attn_bias": bias, "cache_lengths": lengths}.items():
            binding.bind_cpu_input(n, t)
        out_value = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, hq, s_len, d), np.float32), provider, 0)
        binding.bind_ortvalue_output("output", out_value)
        sess.run_with_iobinding(binding)
        out = out_value.numpy()
        ref, ref_cache, ref_lengths = kq.attention_capacity(q, k, v, ref_cache, ref_lengths, scheme, bias)
        assert {n: v.data_ptr() for n, v in values.items()} == pointers  # still the same buffers
        assert_cache_equal({n: v.numpy() for n, v in values.items()}, ref_cache, f"step {i}")
        lengths = len_value.numpy().copy()
        np.testing.assert_array_equal(lengths, ref_lengths)
        np.testing.assert_allclose(out, ref, rtol=OUT_RTOL, atol=OUT_ATOL, err_msg=f"step {i}")
        past += s_len
    assert lengths.sum() == past


def test_fixed_capacity_errors_are_named():
    scheme = SCHEMES["kivi4"]  # key_group 8, residual 16
    sess = ort.InferenceSession(kq.single_op_model(scheme, with_bias=False, capacity=True).SerializeToString(),
                                ops.session_options(1), providers=["CPUExecutionProvider"])
    cache, _ = kq.to_capacity(kq.empty_cache(1, 2, 32, scheme), scheme, 16)
    rng = np.random.default_rng(0)

    def feeds(lengths, s_len=1, **over):
        f = {"query": rng.standard_normal((1, 4, s_len, 32)).astype(np.float32),
             "key": rng.standard_normal((1, 2, s_len, 32)).astype(np.float32),
             "value": rng.standard_normal((1, 2, s_len, 32)).astype(np.float32),
             "cache_lengths": np.array(lengths, np.int64), **{f"past_{n}": t for n, t in cache.items()}}
        return {**f, **over}

    sess.run(None, feeds([8, 3]))  # valid baseline
    _fail(sess, feeds([16, 15]), "cache is full", "32 quantized slots", "allocate a larger cache")
    _fail(sess, feeds([0, 0], s_len=40), "cache is full")
    _fail(sess, feeds([24, 0]), "cache_lengths = (24, 0)", "N must be in [0, 16]")
    _fail(sess, feeds([4, 0]), "multiple of key_group=8")
    _fail(sess, feeds([8, 16]), "r must be in [0, 15]")
    with pytest.raises(Exception, match="cache_lengths"):  # the model declares [2]; ONNX Runtime checks it
        sess.run(None, feeds([8, 3], cache_lengths=np.zeros(3, np.int64)))
    _fail(sess, feeds([8, 0], past_key_q=np.zeros((1, 2, 12, 16), np.uint8)), "'past_key_q'",
          "capacity that is a multiple of key_group=8")


def test_present_lengths_output_needs_the_lengths_input():
    from onnx import helper

    scheme = SCHEMES["int8"]
    model = kq.single_op_model(scheme, with_bias=False)
    node = model.graph.node[0]
    node.output.extend([""] * (9 - len(node.output)) + [kq.LENGTHS_OUTPUT])
    model.graph.output.append(helper.make_tensor_value_info(kq.LENGTHS_OUTPUT, 7, [2]))
    sess = ort.InferenceSession(model.SerializeToString(), ops.session_options(1),
                                providers=["CPUExecutionProvider"])
    _fail(sess, _feeds(scheme), "'present_cache_lengths'", "needs the input 'cache_lengths'")


def test_capacity_reference_roundtrip():
    scheme = SCHEMES["kivi4"]
    rng = np.random.default_rng(1)
    k = rng.standard_normal((1, 2, 21, 32)).astype(np.float32)
    _, cache = kq.attention(k[:, :, :, :], k, k, kq.empty_cache(1, 2, 32, scheme), scheme)
    cap, lengths = kq.to_capacity(cache, scheme, 32)
    assert cap["key_scale"].shape[2] == 4 and cap["key_q"].shape[2] == 32 and cap["key_res"].shape[2] == 15
    assert list(lengths) == [16, 5]
    assert_cache_equal(kq.from_capacity(cap, lengths, scheme), cache, "roundtrip")
    with pytest.raises(ValueError, match="does not fit"):
        kq.to_capacity(cache, scheme, 8)


# ---------------------------------------------------------------- CUDA kernel
#
# The CUDA kernel (custom_ops/kv_attention/kv_attention.cu) against the same NumPy
# reference and the same multi-step scenarios, with the same contract: codes,
# scales, zeros and residuals bit-identical, outputs within OUT_ATOL/OUT_RTOL. Two
# ways in: ONNX Runtime's CUDAExecutionProvider (needs onnxruntime-gpu), and the
# library's C entry point toolkit_quant_kv_attention_cuda driven through torch
# (a CUDA device without onnxruntime-gpu). Each skips with its reason.


def _cuda_ep_runner(scheme, with_bias=True, scale=0.0):
    """A ``run_op``-like callable on ONNX Runtime's CUDAExecutionProvider."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("CUDAExecutionProvider is not available (needs onnxruntime-gpu and a CUDA device)")
    if not ops.has_cuda():
        pytest.skip("libtoolkit_ops.so was built without CUDA kernels")
    so = ops.session_options(1)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = kq.single_op_model(scheme, with_bias=with_bias, scale=scale)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
    assert "CUDAExecutionProvider" in sess.get_providers()
    return lambda q, k, v, cache, bias: run_op(sess, q, k, v, cache, bias)


def grown_outputs(scheme, q, k, cache):
    """(shape, dtype) of each output of a growing-cache call, "output" first, in op
    order; the zero points None when the scheme is symmetric. For the C-entry runners."""
    b, _, s_len, d = q.shape
    hkv = k.shape[1]
    n, r = cache["key_q"].shape[2], cache["key_res"].shape[2]
    total = r + s_len
    flush = total // scheme.residual * scheme.residual if scheme.residual else total
    n2, r2 = n + flush, total - flush
    pb = d * scheme.bits // 8
    kshape = (b, hkv, n2 // scheme.key_group, d) if scheme.key_per_channel else (b, hkv, n2, d // scheme.key_group)
    vshape = (b, hkv, n2, d // scheme.value_group)
    outs = {"output": (q.shape, np.float32),
            "key_q": ((b, hkv, n2, pb), np.uint8), "key_scale": (kshape, np.float16),
            "key_zero": (kshape, np.float16), "key_res": ((b, hkv, r2, d), np.float32),
            "value_q": ((b, hkv, n2, pb), np.uint8), "value_scale": (vshape, np.float16),
            "value_zero": (vshape, np.float16), "value_res": ((b, hkv, r2, d), np.float32)}
    if scheme.symmetric:
        outs["key_zero"] = outs["value_zero"] = None
    return outs


def c_entry_args(scheme, q, k, v, cache, bias, n, r, extra_dims=()):
    """dims and attrs (ctypes int64 arrays) and the 12 host inputs of the CUDA C entries
    (toolkit_quant_kv_attention_cuda[_capacity]; extra_dims: the capacity one's Nc, Rc)."""
    import ctypes

    b, hq, s_len, d = q.shape
    hkv = k.shape[1]
    dims = (ctypes.c_int64 * (8 + len(extra_dims)))(b, hq, hkv, s_len, d, n, r,
                                                    0 if bias is None else bias.shape[0], *extra_dims)
    attrs = (ctypes.c_int64 * 7)(scheme.bits, int(scheme.key_per_channel), scheme.key_group, scheme.value_group,
                                 scheme.residual, int(scheme.symmetric), int(scheme.quantize_query))
    host = (q, k, v, cache["key_q"], cache["key_scale"], cache.get("key_zero"), cache["key_res"],
            cache["value_q"], cache["value_scale"], cache.get("value_zero"), cache["value_res"], bias)
    return dims, attrs, [None if t is None else np.ascontiguousarray(t) for t in host]


def _cuda_ctypes_runner(scheme, with_bias=True, scale=0.0):
    """A ``run_op``-like callable on toolkit_quant_kv_attention_cuda (device tensors from torch)."""
    import ctypes

    from test_softmax_topk import _cuda_torch

    torch = _cuda_torch()
    fn = ctypes.CDLL(str(ops.library_path())).toolkit_quant_kv_attention_cuda
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p]

    def run(q, k, v, cache, bias):
        n, r = cache["key_q"].shape[2], cache["key_res"].shape[2]
        if bias is not None:
            assert with_bias
        dims, attrs, host = c_entry_args(scheme, q, k, v, cache, bias, n, r)
        dev = [None if t is None else torch.from_numpy(t).cuda() for t in host]
        dtypes = {np.float32: torch.float32, np.float16: torch.float16, np.uint8: torch.uint8}
        outs = {name: None if spec is None else torch.empty(spec[0], dtype=dtypes[spec[1]], device="cuda")
                for name, spec in grown_outputs(scheme, q, k, cache).items()}
        ins = (ctypes.c_void_p * 12)(*[t.data_ptr() if t is not None and t.numel() else None for t in dev])
        outp = (ctypes.c_void_p * 9)(*[t.data_ptr() if t is not None and t.numel() else None
                                       for t in outs.values()])
        err = fn(dims, attrs, scale, ins, outp, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        assert err == 0, f"cudaError {err}"
        present = {n: t.cpu().numpy() for n, t in outs.items() if n != "output" and t is not None}
        return outs["output"].cpu().numpy(), present

    return run


CUDA_RUNNERS = {"ort-cuda-ep": _cuda_ep_runner, "ctypes": _cuda_ctypes_runner}


def _drive_cuda(runner, scheme, batch, hq, hkv, d, steps, with_bias=True, pad=None, pad_key=None, seed=0,
                scale=0.0, poison=None):
    """``drive`` on a CUDA runner (a CUDA_RUNNERS name or a runner factory): same inputs,
    same checks per call; returns the last present cache. ``poison``: a value written
    into one key and one value element of call 1's first token."""
    run = (CUDA_RUNNERS[runner] if isinstance(runner, str) else runner)(scheme, with_bias=with_bias, scale=scale)
    rng = np.random.default_rng(seed)
    cache_op = kq.empty_cache(batch, hkv, d, scheme)
    cache_ref = kq.empty_cache(batch, hkv, d, scheme)
    past = 0
    for i, s_len in enumerate(steps):
        q, k, v = step_inputs(rng, batch, hq, hkv, s_len, d)
        if pad_key is not None and past == 0:
            for b, p in enumerate(pad):
                k[b, :, :p] = pad_key
        if poison is not None and i == 1:
            k[0, hkv - 1, 0, 3] = v[batch - 1, 0, 0, 5] = poison
        bias = causal_bias(batch, s_len, past, pad) if with_bias else None
        out, cache_op = run(q, k, v, cache_op, bias)
        with np.errstate(invalid="ignore", over="ignore"):
            ref, cache_ref = kq.attention(q, k, v, cache_ref, scheme, bias, scale)
        assert_cache_equal(cache_op, cache_ref, f"call {i}")
        if poison is None:
            np.testing.assert_allclose(out, ref, rtol=OUT_RTOL, atol=OUT_ATOL, err_msg=f"call {i}")
        else:
            # A NaN reaches the same outputs. An inf scale gives inf or NaN by the order of
            # operations, or a finite row where the kernel's factored score is -inf and the
            # reference's dequantized key inf * 0 = NaN (README): compared where both are finite.
            if np.isnan(poison):
                np.testing.assert_array_equal(np.isnan(out), np.isnan(ref), err_msg=f"call {i}: NaN outputs")
            finite = np.isfinite(ref) & np.isfinite(out)
            assert finite.any(), f"call {i}: no finite output left to compare"
            np.testing.assert_allclose(out[finite], ref[finite], rtol=OUT_RTOL, atol=OUT_ATOL, err_msg=f"call {i}")
        past += s_len
    return cache_op


def _cpu_runner(scheme, with_bias=True, scale=0.0):
    sess = make_session(scheme, with_bias=with_bias, scale=scale)
    return lambda q, k, v, cache, bias: run_op(sess, q, k, v, cache, bias)


POISON_SCHEMES = ["int8", "int8-asym", "int4-token", "int4-res", "kivi4", "kivi2"]


@pytest.mark.parametrize("path", ["simd", "scalar"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", POISON_SCHEMES)
def test_a_nan_or_inf_entering_the_cache_is_stored_as_the_reference_stores_it(name, bad, path, monkeypatch):
    """A NaN in a flushed token's group makes the group's scale and zero NaN (the
    reference's NumPy max / min), so it reaches every later output; the kernels' min /
    max scans used to skip it and store a finite group (found by an audit: after 9 steps
    the reference's output was NaN and the kernel's finite). An inf quotient takes the
    lowest code. Codes, scales and zeros bit for bit, outputs non-finite where the
    reference's are."""
    if path == "scalar":
        monkeypatch.setenv("TOOLKIT_KV_SCALAR", "1")
    cache = _drive_cuda(_cpu_runner, SCHEMES[name], 2, 4, 2, 32, steps=[13] + [1] * 18, poison=bad)
    if np.isnan(bad):  # the poisoned groups were flushed: their scales hold the NaN
        assert np.isnan(cache["value_scale"]).any()


@pytest.mark.gpu
@pytest.mark.parametrize("runner", list(CUDA_RUNNERS))
@pytest.mark.parametrize("name", list(SCHEMES))  # the int8-query ones included
@pytest.mark.parametrize("batch,hq,hkv,d", [(1, 4, 2, 32), (2, 2, 2, 64), (1, 8, 1, 32)])
def test_cuda_prefill_then_decode_matches_reference(runner, name, batch, hq, hkv, d):
    _drive_cuda(runner, SCHEMES[name], batch, hq, hkv, d, steps=[13] + [1] * 20 + [5, 1, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("runner", list(CUDA_RUNNERS))
@pytest.mark.parametrize("name", ["kivi4", "kivi2", "int8"])
def test_cuda_causal_default_without_bias(runner, name):
    _drive_cuda(runner, SCHEMES[name], 1, 4, 2, 32, steps=[9, 1, 1, 7, 1], with_bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("runner", list(CUDA_RUNNERS))
@pytest.mark.parametrize("name", ["kivi4", "int4-res"])
def test_cuda_left_padding_is_left_out_of_key_ranges(runner, name):
    scheme = SCHEMES[name]
    cache = _drive_cuda(runner, scheme, 3, 4, 2, 32, steps=[20, 1, 1, 1, 1, 8], pad=[0, 3, 11], pad_key=1e4,
                        seed=5)
    if scheme.key_per_channel:
        # Row 2's first key group (11 of its positions padded) kept a range of real keys.
        assert cache["key_scale"][2, :, 0].astype(np.float32).max() < 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("runner", list(CUDA_RUNNERS))
def test_cuda_long_context_uses_slices_and_matches(runner):
    # T ~ 1100 at batch 1, 1 KV head: many key-position slices per block row, merged.
    _drive_cuda(runner, kq.KVScheme(4, True, 32, 32, 64), 1, 4, 1, 64, steps=[1030, 1, 1, 63, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("runner", list(CUDA_RUNNERS))
@pytest.mark.parametrize("d", [128, 256])
def test_cuda_large_head_dim_and_gqa(runner, d):
    # Head dims of real models (256 needs more than 48 KiB of shared memory per block).
    _drive_cuda(runner, SCHEMES["kivi4"], 2, 8, 2, d, steps=[37, 1, 1, 1, 9], seed=2)


@pytest.mark.gpu
@pytest.mark.parametrize("runner", list(CUDA_RUNNERS))
def test_cuda_int8_query_rounding_is_applied(runner):
    # As test_int8_query_rounding_is_applied: the CUDA output matches the reference
    # with the rounded query (checked inside _drive_cuda) and is farther than the
    # tolerance from the float-query one, within a query quantization step of it.
    scheme, plain = SCHEMES["int8-q8"], kq.KVScheme(8, False, 32, 32, 0, symmetric=True)
    run = CUDA_RUNNERS[runner](scheme, with_bias=True)
    rng = np.random.default_rng(7)
    cache, cache_plain, past, worst = kq.empty_cache(1, 2, 64, scheme), kq.empty_cache(1, 2, 64, plain), 0, 0.0
    for s_len in [50, 1, 1]:
        q, k, v = step_inputs(rng, 1, 4, 2, s_len, 64)
        bias = causal_bias(1, s_len, past, None)
        out, cache = run(q, k, v, cache, bias)
        ref, cache_plain = kq.attention(q, k, v, cache_plain, plain, bias)
        worst = max(worst, float(np.abs(out - ref).max()))
        past += s_len
    assert 10 * OUT_ATOL < worst < 0.05, worst


@pytest.mark.gpu
@pytest.mark.parametrize("runner", list(CUDA_RUNNERS))
def test_cuda_scale_attribute(runner):
    _drive_cuda(runner, SCHEMES["kivi4"], 1, 2, 2, 32, steps=[17, 1, 1], scale=0.05)


# The fixed-capacity cache on the CUDA EP: the same contract as on the CPU (presents
# equal kq.attention_capacity bit for bit, unused slots untouched), and the output
# bit-identical to the CUDA kernel's own growing-cache output.
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SCHEMES))
def test_cuda_fixed_capacity_matches_reference_and_growing_cache(name):
    drive_capacity(SCHEMES[name], 2, 4, 2, 32, steps=[13] + [1] * 20 + [5, 1, 1], capacity=48, provider="cuda")


@pytest.mark.gpu
def test_cuda_fixed_capacity_long_context_and_extra_slots():
    drive_capacity(kq.KVScheme(4, True, 32, 32, 64), 1, 4, 1, 64, steps=[1030, 1, 63, 1], capacity=1152,
                   provider="cuda")
    drive_capacity(SCHEMES["int8"], 1, 4, 2, 32, steps=[9, 1, 1, 7, 1], capacity=32,
                   slots=SCHEMES["int8"].residual + 5, with_bias=False, provider="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int8", "kivi2", "int4-res", "kivi4"])
def test_cuda_fixed_capacity_in_place_with_iobinding(name):
    drive_in_place(SCHEMES[name], "cuda")


# ---------------------------------------------------------------- property test



@st.composite
def _cases(draw):
    bits = draw(st.sampled_from([8, 4, 2]))
    d = draw(st.sampled_from([8, 16, 24, 32, 64]))
    per_channel = draw(st.booleans())
    symmetric = bits == 8 and not per_channel and draw(st.booleans())
    divisors = [g for g in (4, 8, 16, 32) if d % g == 0 and g % (8 // bits) == 0]
    value_group = draw(st.sampled_from(divisors))
    if per_channel:
        key_group = draw(st.sampled_from([2, 4, 8]))
        residual = key_group * draw(st.integers(1, 3))
    else:
        key_group = draw(st.sampled_from(divisors))
        residual = draw(st.sampled_from([0, 3, 8]))
    scheme = kq.KVScheme(bits, per_channel, key_group, value_group, residual, symmetric,
                         quantize_query=draw(st.booleans()))
    hkv = draw(st.integers(1, 3))
    rep = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 3))
    steps = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
    scale_kind = draw(st.sampled_from(["unit", "large", "tiny", "constant"]))
    with_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    return scheme, batch, hkv * rep, hkv, d, steps, scale_kind, with_bias, seed


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_property_matches_reference(case):
    """Random schemes, shapes and value ranges: exact cache, outputs within tolerance."""
    scheme, batch, hq, hkv, d, steps, scale_kind, with_bias, seed = case
    rng = np.random.default_rng(seed)
    sess = make_session(scheme, with_bias=with_bias)
    cache_op = kq.empty_cache(batch, hkv, d, scheme)
    cache_ref = kq.empty_cache(batch, hkv, d, scheme)
    mult = {"unit": 1.0, "large": 1e3, "tiny": 1e-4, "constant": 0.0}[scale_kind]
    past = 0
    for s_len in steps:
        q = rng.standard_normal((batch, hq, s_len, d)).astype(np.float32)
        k = (rng.standard_normal((batch, hkv, s_len, d)) * mult + 0.5).astype(np.float32)
        v = (rng.standard_normal((batch, hkv, s_len, d)) * mult - 0.25).astype(np.float32)
        if scale_kind == "large":
            q *= np.float32(1e-3)  # keep scores finite and moderate
        bias = causal_bias(batch, s_len, past) if with_bias else None
        out, cache_op = run_op(sess, q, k, v, cache_op, bias)
        ref, cache_ref = kq.attention(q, k, v, cache_ref, scheme, bias)
        assert_cache_equal(cache_op, cache_ref, f"past {past}")
        tol = OUT_ATOL * max(1.0, float(np.abs(v).max()))
        np.testing.assert_allclose(out, ref, rtol=OUT_RTOL, atol=tol)
        past += s_len


@pytest.mark.parametrize("path", ["simd", "scalar"])
@pytest.mark.parametrize("fill", [-np.inf, np.finfo(np.float32).min, -1e9])
@pytest.mark.parametrize("name", ["int8", "kivi4", "kivi2", "int4-res"])
def test_positions_every_row_masks_are_skipped_and_still_cached(name, fill, path, monkeypatch):
    """The kernel neither scores nor sums positions that every query row of a block
    masks (bias <= -1e8 from some position on: the causal part of a prefill, or here
    the last 100 past positions and the new tokens for all rows), in both slices of a
    300-token context: outputs match the reference, and the present cache still holds
    the skipped positions' codes. Their keys are not read: a NaN stored there reaches no
    row (the reference, which adds the bias to every score, makes those rows NaN)."""
    if path == "scalar":
        monkeypatch.setenv("TOOLKIT_KV_SCALAR", "1")
    scheme = SCHEMES[name]
    rng = np.random.default_rng(7)
    sess = make_session(scheme, with_bias=True)
    cache, cache_ref = kq.empty_cache(1, 2, 32, scheme), kq.empty_cache(1, 2, 32, scheme)
    q, k, v = step_inputs(rng, 1, 4, 2, 300, 32)
    bias = causal_bias(1, 300, 0)
    bias[bias < 0] = fill
    out, cache = run_op(sess, q, k, v, cache, bias)
    with np.errstate(invalid="ignore"):
        ref, cache_ref = kq.attention(q, k, v, cache_ref, scheme, bias)
    np.testing.assert_allclose(out, ref, rtol=OUT_RTOL, atol=OUT_ATOL)
    assert_cache_equal(cache, cache_ref, "prefill")

    q, k, v = step_inputs(rng, 1, 4, 2, 4, 32)
    bias = np.zeros((1, 1, 4, 304), np.float32)
    bias[..., 200:] = fill  # every row sees positions 0..199 only
    out, present = run_op(sess, q, k, v, cache, bias)
    ref, present_ref = kq.attention(q, k, v, dict(cache), scheme, bias)
    np.testing.assert_allclose(out, ref, rtol=OUT_RTOL, atol=OUT_ATOL)
    assert_cache_equal(present, present_ref, "masked tail")

    poisoned = k.copy()
    poisoned[0, 1, 2, 5] = np.nan  # a new key, at position 302: masked for every row
    out_nan, _ = run_op(sess, q, poisoned, v, cache, bias)
    with np.errstate(invalid="ignore"):
        ref_nan, _ = kq.attention(q, poisoned, v, dict(cache), scheme, bias)
    assert np.isnan(ref_nan[0, 2:]).all()  # KV head 1's query heads, in the reference
    np.testing.assert_array_equal(out_nan, out)


@pytest.mark.parametrize("path", ["simd", "scalar"])
@pytest.mark.parametrize("name", ["int8", "kivi4"])
def test_a_padding_query_row_still_spreads_over_every_position(name, path, monkeypatch):
    """A left-padding query row masks every position with a finite bias (finfo.min),
    so softmax spreads it evenly over all T positions, as in the reference and eager
    attention. The kernel skips the positions a block of query rows all mask (rows
    0-63 of a 200-token prefill see positions < 64); a block holding such a row must
    keep them all, or the row averages fewer values."""
    if path == "scalar":
        monkeypatch.setenv("TOOLKIT_KV_SCALAR", "1")
    drive(SCHEMES[name], 2, 2, 2, 32, steps=[200, 1], pad=[0, 10])


def test_a_seen_bias_just_above_the_mask_threshold_turns_skipping_off():
    """A seen position with bias -99999992 (the float32 next to -1e8) sits 8 above a
    masked -1e8: with a score 8 higher there, the masked position weighs as much as the
    seen one (the reference: output 6.7e-8 from values +1 / -1). Skipping it gave 1.0;
    a bias in (-1e8, -5e7] turns skipping off for the call (found by an audit)."""
    scheme, d = SCHEMES["int8"], 32
    q = np.zeros((1, 1, 2, d), np.float32)
    q[..., 0] = 4.0
    k = np.zeros((1, 1, 2, d), np.float32)
    k[0, 0, 1, 0] = 8.0 * np.sqrt(d) / 4.0  # score(1) - score(0) = 8 after the 1/sqrt(d) scale
    v = np.zeros((1, 1, 2, d), np.float32)
    v[0, 0, 0], v[0, 0, 1] = 1.0, -1.0
    bias = np.array([[-99999992.0, -1e8]] * 2, np.float32)[None, None]
    out, _ = run_op(make_session(scheme), q, k, v, kq.empty_cache(1, 1, d, scheme), bias)
    ref, _ = kq.attention(q, k, v, kq.empty_cache(1, 1, d, scheme), scheme, bias)
    np.testing.assert_allclose(out, ref, rtol=OUT_RTOL, atol=OUT_ATOL)
