"""portable: the standard-ONNX bodies of every toolkit op run without the op library
and give what the fused kernels give (ORT with the library prefers the kernel).

Each body is checked against the op's NumPy reference on ORT without the library,
on ORT with it (the kernel) and, where the body has no overload, on onnx.reference.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from passes import run_pipeline
from toolkit import ops
from toolkit.errors import PassError
from toolkit.ops.kv_quant import CACHE_TENSORS, PRESETS, attention, empty_cache, scheme_for, single_op_model
from toolkit.ops.reference import lowrank_matmul, sample_topk_top_p, softmax_topk


def _fused_model(op="FusedSoftmaxTopK", outputs=("v", "i"), **attrs):
    node = helper.make_node(op, ["x"], list(outputs), domain="com.toolkit", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 50])],
                              [helper.make_tensor_value_info(o, TensorProto.INT64 if o == "i" else TensorProto.FLOAT,
                                                             [3, "k"]) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.toolkit", 1)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("normalize,log_probs,temperature", [(0, 0, 1.0), (0, 1, 0.7), (1, 0, 1.3), (1, 1, 1.0)])
def test_portable_body_matches_kernel_and_reference(normalize, log_probs, temperature):
    model = _fused_model(k=4, normalize=normalize, log_probs=log_probs, temperature=temperature)
    out, report = run_pipeline(model, ["portable", "cleanup"])
    assert report.counts["portable"] == 1
    assert [(f.domain, f.name) for f in out.functions] == [("com.toolkit", "FusedSoftmaxTopK")]
    onnx.checker.check_model(out)
    x = (2 * np.random.default_rng(0).standard_normal((3, 50))).astype(np.float32)
    without = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    kernel = ort.InferenceSession(out.SerializeToString(), ops.session_options(),
                                  providers=["CPUExecutionProvider"]).run(None, {"x": x})
    reference = ReferenceEvaluator(out).run(None, {"x": x})
    ref_v, ref_i, _ = softmax_topk(x, 4, temperature, normalize, bool(log_probs))
    for values, indices in (without, kernel, reference):
        np.testing.assert_array_equal(indices, ref_i)
        # fp32: ORT's Div then Softmax vs the kernel's fused (x - m) / T
        np.testing.assert_allclose(values, ref_v, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("temperature", [0.7, 1e-8, 1e-20])
def test_float16_body_scales_in_float32(temperature, normalize):
    """float16 logits: the body divides by the temperature in float32, as the kernel does.
    Cast to float16, a temperature below ~3e-8 was 0 and every value NaN (audit)."""
    model = _fused_model(k=4, normalize=normalize, temperature=temperature)
    for io in (*model.graph.input, model.graph.output[0]):
        io.type.tensor_type.elem_type = TensorProto.FLOAT16
    out, _ = run_pipeline(model, ["portable", "cleanup"])
    x = (2 * np.random.default_rng(3).standard_normal((3, 50))).astype(np.float16)
    body = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    kernel = ort.InferenceSession(out.SerializeToString(), ops.session_options(),
                                  providers=["CPUExecutionProvider"]).run(None, {"x": x})
    ref_v, ref_i, _ = softmax_topk(x, 4, temperature, normalize)
    for values, indices in (body, kernel):
        assert values.dtype == np.float16 and np.isfinite(values).all()
        # at a tiny temperature all but the top probability are 0: tied, so any order of
        # those indices is Softmax -> TopK's (README); the top one is fixed
        np.testing.assert_array_equal(indices if temperature > 0.1 else indices[:, :1],
                                      ref_i if temperature > 0.1 else ref_i[:, :1])
        np.testing.assert_allclose(values.astype(np.float32), ref_v, rtol=1e-3, atol=1e-4)  # float16 rounding


def test_defaults_apply_when_attributes_are_omitted():
    out, _ = run_pipeline(_fused_model(k=3), ["portable"])
    x = np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32)
    values, indices = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    ref_v, ref_i, _ = softmax_topk(x, 3)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(values, ref_v, rtol=1e-6)


def test_log_normalizer_output_is_refused():
    with pytest.raises(PassError, match="log_normalizer"):
        run_pipeline(_fused_model(outputs=("v", "i", "n"), k=3), ["portable"])


def _sample_model(with_seed=True, **attrs):
    inputs = ["x", "seed"] if with_seed else ["x"]
    node = helper.make_node("SampleTopKTopP", inputs, ["t", "p"], domain="com.toolkit", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "v"])]
        + ([helper.make_tensor_value_info("seed", TensorProto.INT64, [1])] if with_seed else []),
        [helper.make_tensor_value_info("t", TensorProto.INT64, ["b"]),
         helper.make_tensor_value_info("p", TensorProto.FLOAT, ["b"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.toolkit", 1)])
    model.ir_version = 10
    return model


def _three_runtimes(model, feeds, reference=True):
    """Outputs of ORT without the library (the body), ORT with it (the kernel), onnx.reference (the body)."""
    blob = model.SerializeToString()
    runs = [ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, feeds),
            ort.InferenceSession(blob, ops.session_options(1), providers=["CPUExecutionProvider"]).run(None, feeds)]
    if reference:
        runs.append(ReferenceEvaluator(model).run(None, feeds))
    return runs


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 64), top_p=st.sampled_from([1.0, 0.95, 0.5, 0.05]), min_p=st.sampled_from([0.0, 0.05, 0.3]),
       temperature=st.sampled_from([0.5, 1.0, 1.7]), seed=st.integers(-2**62, 2**62), data_seed=st.integers(0, 2**31))
def test_sampling_body_draws_the_kernels_token(k, top_p, min_p, temperature, seed, data_seed):
    """Same seed, same token: the body reproduces the kernel's draw (sample_math.h) exactly."""
    model, report = run_pipeline(_sample_model(k=k, top_p=top_p, min_p=min_p, temperature=temperature),
                                 ["portable"])
    assert report.counts["portable"] == 1
    rng = np.random.default_rng(data_seed)
    x = (3 * rng.standard_normal((8, 300))).astype(np.float32)
    x[0, :5] = 4.0  # ties at the top
    feeds = {"x": x, "seed": np.array([seed], np.int64)}
    ref_ids, ref_p = sample_topk_top_p(x, k, temperature, top_p, min_p, seed)
    for ids, probs in _three_runtimes(model, feeds):
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(probs, ref_p, rtol=2e-6, atol=1e-7)  # fp32 softmax, another summation order


def test_sampling_body_takes_a_seed_per_row():
    """One seed per row (a server's batch of requests): the body draws the kernel's tokens."""
    model = _sample_model(k=30, top_p=0.9, temperature=1.2)
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "seeds"
    model, _ = run_pipeline(model, ["portable"])
    rng = np.random.default_rng(9)
    x = np.tile((2 * rng.standard_normal((1, 300))).astype(np.float32), (7, 1))
    seeds = rng.integers(-2**62, 2**62, 7)
    ref_ids, _ = sample_topk_top_p(x, 30, 1.2, 0.9, 0.0, seeds)
    assert len(set(ref_ids.tolist())) > 1  # same logits on every row: the seeds draw different tokens
    for ids, _ in _three_runtimes(model, {"x": x, "seed": seeds}):
        np.testing.assert_array_equal(ids, ref_ids)


def test_sampling_body_names_a_wrong_seed_count():
    """Neither one seed nor one per row: the body has no Assert, so the node that fails is
    named for the fix (the kernel's own error says the same)."""
    model = _sample_model(k=30)
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "seeds"
    model, _ = run_pipeline(model, ["portable"])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros((7, 50), np.float32)
    for count in (0, 3):
        with pytest.raises(Exception, match="seed_must_have_1_element_or_1_per_row_of_logits"):
            session.run(None, {"x": x, "seed": np.arange(count, dtype=np.int64)})


def test_sampling_body_without_seed_input_uses_the_attribute():
    model, _ = run_pipeline(_sample_model(with_seed=False, k=20, seed=1234), ["portable"])
    x = np.random.default_rng(5).standard_normal((6, 100)).astype(np.float32)
    ref_ids, _ = sample_topk_top_p(x, 20, seed=1234)
    for ids, _ in _three_runtimes(model, {"x": x}):
        np.testing.assert_array_equal(ids, ref_ids)


def _lowrank_model(inputs, weights):
    """x [2, 3, 24] -> LowRankMatMul(inputs) -> y [2, 3, 10], weights as initializers."""
    node = helper.make_node("LowRankMatMul", inputs, ["y"], domain="com.toolkit")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 24])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 10])],
                              [numpy_helper.from_array(a, n) for n, a in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.toolkit", 1)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weight_type", [np.float32, np.float16])
def test_lowrank_body(with_bias, weight_type):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 24)).astype(np.float32)
    u = rng.standard_normal((24, 6)).astype(weight_type)
    v = rng.standard_normal((6, 10)).astype(weight_type)
    bias = rng.standard_normal(10).astype(np.float32)
    weights = {"U": u, "V": v, **({"b": bias} if with_bias else {})}
    out, _ = run_pipeline(_lowrank_model(["x", "U", "V"] + (["b"] if with_bias else []), weights), ["portable"])
    assert [f.overload for f in out.functions] == (["bias"] if with_bias else [""])
    ref = lowrank_matmul(x, u, v, bias if with_bias else None)
    # onnx.reference (1.23) does not resolve function overloads: the bias variant is ORT-only
    for (y,) in _three_runtimes(out, {"x": x}, reference=not with_bias):
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)  # fp32 products, another summation order


@pytest.mark.parametrize("with_bias", [False, True])
def test_lowrank_int8_body(with_bias):
    from toolkit.ops.reference import quantize_columns

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 24)).astype(np.float32)
    (u, us), (v, vs) = quantize_columns(rng.standard_normal((24, 6))), quantize_columns(rng.standard_normal((6, 10)))
    bias = rng.standard_normal(10).astype(np.float32)
    weights = {"U": u, "V": v, "us": us, "vs": vs, **({"b": bias} if with_bias else {})}
    out, _ = run_pipeline(_lowrank_model(["x", "U", "V", "b" if with_bias else "", "us", "vs"], weights),
                          ["portable"])
    # without a bias the node gets a zero one: one body (int8_bias) serves both
    assert [f.overload for f in out.functions] == ["int8_bias"]
    ref = lowrank_matmul(x, u, v, bias if with_bias else None, us, vs)
    blob = out.SerializeToString()
    # The body dequantizes as float(codes) * scale, not DequantizeLinear: ORT's default
    # optimisations turned DequantizeLinear(int8, per column) -> MatMul into MatMulNBits
    # at accuracy level 4, which also rounds the activations to int8 (1% off, flipped
    # tokens on llama-stdlib). Under the defaults, with and without the library, and
    # with graph optimisations off, the body gives the kernel's float32 result.
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    body = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    unoptimised = ort.InferenceSession(blob, plain, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    kernel = ort.InferenceSession(blob, ops.session_options(1), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for y in (body, unoptimised, kernel):
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _kv_feeds(q, k, v, cache, bias):
    feeds = {"query": q, "key": k, "value": v, **{f"past_{n}": cache[n] for n in CACHE_TENSORS if n in cache}}
    if bias is not None:
        feeds["attn_bias"] = bias
    return feeds


@pytest.mark.parametrize("poison", [None, np.nan, np.inf])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_kv_attention_body_reproduces_the_cache_bit_for_bit(preset, with_bias, poison):
    """Decode through several residual flushes (and left padding with a bias): the body's
    codes/scales/zeros/residual equal the reference's exactly, outputs within 2e-6. With
    ``poison`` in one key and one value element: a NaN group keeps a NaN scale (and zero)
    and an inf quotient the lowest code, as in the reference and the kernels."""
    scheme = scheme_for(preset, 16, group=8, residual=8)
    out, _ = run_pipeline(single_op_model(scheme, with_bias=with_bias), ["portable"])
    overloads = [f.overload for f in out.functions]
    assert len(overloads) == 1 and overloads[0].endswith("bias" if with_bias else "causal")
    blob = out.SerializeToString()
    body = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    kernel = ort.InferenceSession(blob, ops.session_options(1), providers=["CPUExecutionProvider"])
    names = [o.name for o in body.get_outputs()]
    rng = np.random.default_rng(7)
    b, hq, hkv, d = 2, 4, 2, 16
    ref_cache = empty_cache(b, hkv, d, scheme)
    caches = [dict(ref_cache), dict(ref_cache)]
    for step, s in enumerate((5, 1, 1, 1, 3, 9, 1)):
        q = rng.standard_normal((b, hq, s, d)).astype(np.float32)
        k, v = (rng.standard_normal((b, hkv, s, d)).astype(np.float32) for _ in range(2))
        if poison is not None and step == 1:  # a decode step: every query row attends to it
            k[0, 1, 0, 2] = v[1, 0, 0, 7] = poison
        bias = None
        if with_bias:
            n = ref_cache["key_q"].shape[2] + ref_cache["key_res"].shape[2]
            visible = np.arange(n + s)[None] <= (n + np.arange(s))[:, None]
            bias = np.repeat(np.where(visible, 0.0, -3.4e38).astype(np.float32)[None, None], b, 0)
            bias[1, ..., :2] = -3.4e38  # two padding positions in row 1
        with np.errstate(invalid="ignore", over="ignore"):
            ref_out, ref_cache = attention(q, k, v, ref_cache, scheme, bias)
        for i, session in enumerate((body, kernel)):
            got = dict(zip(names, session.run(None, _kv_feeds(q, k, v, caches[i], bias))))
            out, ref = got["output"], ref_out
            if poison is not None and np.isinf(poison) and session is kernel:
                # the kernel's factored score of an inf-scale key can be -inf where the
                # dequantized key is inf * 0 = NaN (README): compared where both are finite
                finite = np.isfinite(out) & np.isfinite(ref)
                out, ref = out[finite], ref[finite]
            np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)  # fp32 vs the fp64 reference; NaN where it is
            caches[i] = {n: got[f"present_{n}"] for n in CACHE_TENSORS if n in ref_cache}
            for n in caches[i]:
                np.testing.assert_array_equal(caches[i][n], ref_cache[n], err_msg=f"present_{n} ({session is body})")


@pytest.mark.parametrize("preset", PRESETS)
def test_kv_attention_body_survives_onnxscript_optimizer(preset):
    """Olive-style pipelines run onnxscript's optimizer (inline, fold constants) on the
    model: it must not fail on the body (a constant for the outputs a symmetric scheme
    leaves unbound did), and the optimized graph must compute the same cache and output."""
    import onnxscript.optimizer

    scheme = scheme_for(preset, 16, group=8, residual=8)
    out, _ = run_pipeline(single_op_model(scheme, with_bias=False), ["portable"])
    optimized = onnxscript.optimizer.optimize(out)
    assert not optimized.functions  # inlined
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (out, optimized)]
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    rng = np.random.default_rng(11)
    caches = [empty_cache(2, 2, 16, scheme)] * 2
    for s in (5, 1, 3, 9, 1):
        q = rng.standard_normal((2, 4, s, 16)).astype(np.float32)
        k, v = (rng.standard_normal((2, 2, s, 16)).astype(np.float32) for _ in range(2))
        got = [dict(zip(n, sess.run(None, _kv_feeds(q, k, v, c, None))))
               for n, sess, c in zip(names, sessions, caches)]
        np.testing.assert_allclose(got[1]["output"], got[0]["output"], rtol=0, atol=1e-6)
        caches = [{n: g[f"present_{n}"] for n in CACHE_TENSORS if n in caches[0]} for g in got]
        for n in caches[0]:
            np.testing.assert_array_equal(caches[1][n], caches[0][n], err_msg=n)


def test_fixed_capacity_kv_cache_is_refused(exported):
    _, path = exported("llama")
    model, _ = run_pipeline(onnx.load(str(path)), ["kv-cache"],
                            {"kv-cache": {"scheme": "int8", "capacity": "64"}})
    with pytest.raises(PassError, match="fixed-capacity cache") as err:
        run_pipeline(model, ["portable"])
    assert "without --kv-capacity" in err.value.hint


def test_portable_decoder_with_every_op_runs_without_the_library(exported):
    """llama with a KIVI cache, low-rank projections and a sampled head: the bodies decode
    like the kernels (same sampled tokens, logits within 1e-4)."""
    from toolkit.parity import OnnxDecoder

    _, path = exported("llama")
    model, report = run_pipeline(
        onnx.load(str(path)), ["kv-cache", "low-rank", "sampling-head", "portable", "cleanup"],
        {"kv-cache": {"scheme": "kivi4", "group": "8", "residual": "8"}, "low-rank": {"rank_ratio": "0.5"},
         "sampling-head": {"k": "20", "sample": "true"}})
    assert report.counts["portable"] >= 3
    blob = model.SerializeToString()
    decoders = [OnnxDecoder(ort.InferenceSession(blob, providers=["CPUExecutionProvider"])),
                OnnxDecoder(ort.InferenceSession(blob, ops.session_options(1), providers=["CPUExecutionProvider"]))]
    ids = np.random.default_rng(3).integers(3, 200, (2, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(7)[None].repeat(2, 0)
    pasts = [dec.empty_past(2) for dec in decoders]
    for _ in range(12):  # past the residual window: blocks get quantized by both
        outs = []
        for i, dec in enumerate(decoders):
            logits, pasts[i], heads = dec.step(ids, mask, pos, pasts[i])
            outs.append((logits, heads))
        np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=0, atol=1e-4)
        np.testing.assert_array_equal(outs[0][1]["next_token"], outs[1][1]["next_token"])
        ids = outs[0][1]["next_token"][:, None]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1


def test_portable_mixtral_runs_without_the_library(exported):
    src, path = exported("hf:mixtral")
    model, report = run_pipeline(onnx.load(str(path)), ["fuse-softmax-topk", "portable", "cleanup"])
    assert report.counts["fuse-softmax-topk"] == src.num_layers and report.counts["portable"] == 1
    from toolkit.export import example_inputs, input_names

    feeds = dict(zip(input_names(src.num_layers), [a.numpy() for a in example_inputs(src, seed=3)]))
    blob = model.SerializeToString()
    plain = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, feeds)
    fused = ort.InferenceSession(blob, ops.session_options(), providers=["CPUExecutionProvider"]).run(None, feeds)
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b, c in zip(plain, fused, original):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b, c, rtol=0, atol=1e-5)
