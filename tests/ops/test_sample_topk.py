"""SampleTopKTopP: the CPU kernel vs the NumPy reference, and the draw's statistics.

Token ids must equal the reference's exactly (same counter-based random numbers,
same filtering); probabilities within 1e-6 relative for float32 (1e-3 for float16,
whose probabilities are rounded to half precision). The distribution test compares
empirical frequencies with the filtered softmax over many independent rows.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from toolkit import ops
from toolkit.ops import reference

DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
RTOL = {np.float32: 1e-6, np.float16: 1e-3}


def session(dtype, k, temperature=1.0, top_p=1.0, min_p=0.0, seed=0, with_seed_input=False, threads=1):
    inputs = ["logits", "seed"] if with_seed_input else ["logits"]
    node = helper.make_node("SampleTopKTopP", inputs, ["token_ids", "token_probs"], domain=ops.DOMAIN, k=k,
                            temperature=float(temperature), top_p=float(top_p), min_p=float(min_p), seed=seed)
    graph_inputs = [helper.make_tensor_value_info("logits", DTYPES[dtype], None)]
    if with_seed_input:
        graph_inputs.append(helper.make_tensor_value_info("seed", TensorProto.INT64, None))
    graph = helper.make_graph([node], "sample", graph_inputs, [
        helper.make_tensor_value_info("token_ids", TensorProto.INT64, None),
        helper.make_tensor_value_info("token_probs", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])
    model.ir_version = 10
    so = ops.session_options(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("V,k", [(50, 50), (1000, 40), (32000, 50), (128256, 20)])
@pytest.mark.parametrize("temperature,top_p,min_p", [(1.0, 1.0, 0.0), (0.7, 0.9, 0.0), (1.3, 0.8, 0.05)])
def test_matches_reference(dtype, V, k, temperature, top_p, min_p):
    rng = np.random.default_rng(V + k)
    x = (2.0 * rng.standard_normal((16, V))).astype(dtype)
    ids, probs = session(dtype, k, temperature, top_p, min_p, seed=1234).run(None, {"logits": x})
    ref_ids, ref_probs = reference.sample_topk_top_p(x, k, temperature, top_p, min_p, seed=1234)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(probs, ref_probs, rtol=RTOL[dtype], atol=1e-7)
    assert ids.shape == (16,) and ids.dtype == np.int64


def test_batch_shape_is_kept():
    x = np.random.default_rng(0).standard_normal((2, 3, 100)).astype(np.float32)
    ids, probs = session(np.float32, 10).run(None, {"logits": x})
    assert ids.shape == (2, 3) and probs.shape == (2, 3)


@pytest.mark.parametrize("kwargs", [dict(k=1), dict(k=50, top_p=1e-6), dict(k=50, min_p=0.999)])
def test_degenerate_settings_are_greedy(kwargs):
    x = np.random.default_rng(1).standard_normal((64, 5000)).astype(np.float32)
    ids, _ = session(np.float32, **kwargs).run(None, {"logits": x})
    np.testing.assert_array_equal(ids, x.argmax(-1))


def test_seed_input_overrides_attribute_and_is_deterministic():
    x = np.random.default_rng(2).standard_normal((256, 300)).astype(np.float32)
    sess = session(np.float32, 300, with_seed_input=True, seed=99)
    a = sess.run(None, {"logits": x, "seed": np.array([7], np.int64)})[0]
    b = sess.run(None, {"logits": x, "seed": np.array([7], np.int64)})[0]
    c = sess.run(None, {"logits": x, "seed": np.array([8], np.int64)})[0]
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.5  # near-uniform logits over 300 tokens: new seed, new draws
    np.testing.assert_array_equal(a, reference.sample_topk_top_p(x, 300, seed=7)[0])


def test_two_threads_match_one():
    x = np.random.default_rng(3).standard_normal((1, 262144)).astype(np.float32)
    x = np.repeat(x, 3, axis=0)
    one = session(np.float32, 64, 0.8, 0.9, seed=5, threads=1).run(None, {"logits": x})
    two = session(np.float32, 64, 0.8, 0.9, seed=5, threads=2).run(None, {"logits": x})
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_empirical_distribution_follows_the_filtered_softmax():
    """40000 rows of the same logits: each row is an independent draw."""
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -6.0], np.float32)
    rows = 40000
    x = np.tile(logits, (rows, 1))
    top_p = 0.8
    ids, _ = session(np.float32, 6, top_p=top_p, seed=11).run(None, {"logits": x})
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    # top-k=6, then the shortest prefix with renormalised mass >= 0.8
    kept = p[:6] / p[:6].sum()
    n = int(np.searchsorted(np.cumsum(kept), top_p) + 1)
    expected = np.zeros_like(p)
    expected[:n] = p[:n] / p[:n].sum()
    freq = np.bincount(ids, minlength=len(p)) / rows
    assert np.all(freq[n:] == 0), "tokens outside the nucleus were drawn"
    # binomial standard error <= 0.0025 at 40000 draws: 5 sigma
    np.testing.assert_allclose(freq, expected, atol=0.0125)


@pytest.mark.parametrize("attrs,message", [
    (dict(k=0), "k"), (dict(k=5, top_p=0.0), "top_p"), (dict(k=5, min_p=1.0), "min_p")])
def test_bad_attributes_are_errors(attrs, message):
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(Exception, match=message):
        session(np.float32, **attrs).run(None, {"logits": x})


def test_k_larger_than_vocab_names_the_input():
    with pytest.raises(Exception, match=r"SampleTopKTopP: input 'logits' has shape \[2,4\]"):
        session(np.float32, 5).run(None, {"logits": np.zeros((2, 4), np.float32)})


def test_bad_seed_input_names_it():
    sess = session(np.float32, 2, with_seed_input=True)
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(Exception, match=r"input .seed. has shape \[3\].*one per row of logits \(2\)"):
        sess.run(None, {"logits": x, "seed": np.array([1, 2, 3], np.int64)})


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_a_seed_per_row_draws_each_row_as_alone(dtype, threads):
    """A server batching requests passes one seed per row: row r then draws what it draws
    alone in a call with seed[r] (uniform(seed[r], 0)), whatever its slot; one seed for
    the whole call (uniform(seed, r)) moves a request's draw when its slot changes."""
    sess = session(dtype, 40, temperature=1.3, top_p=0.9, with_seed_input=True, threads=threads)
    rng = np.random.default_rng(11)
    x = (2 * rng.standard_normal((64, 500))).astype(dtype)
    x[:] = x[0]  # every row the same logits: only the seed can tell the rows' draws apart
    seeds = rng.integers(-2**62, 2**62, 64)
    ids, probs = sess.run(None, {"logits": x, "seed": seeds})
    alone = [sess.run(None, {"logits": x[r:r + 1], "seed": seeds[r:r + 1]})[0][0] for r in range(64)]
    np.testing.assert_array_equal(ids, alone)
    ref_ids, ref_probs = reference.sample_topk_top_p(x, 40, 1.3, 0.9, 0.0, seeds)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(probs, ref_probs, rtol=RTOL[dtype])
    shuffled = rng.permutation(64)  # a request's token follows its seed, not its slot
    np.testing.assert_array_equal(sess.run(None, {"logits": x, "seed": seeds[shuffled]})[0], ids[shuffled])
    one_seed = sess.run(None, {"logits": x, "seed": seeds[:1]})[0]
    assert len(set(one_seed.tolist())) > 1 and one_seed[0] == ids[0]  # row r of one seed: uniform(seed, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("V,k,top_p,min_p", [(1000, 40, 0.9, 0.0), (128256, 50, 0.95, 0.02), (32000, 1, 1.0, 0.0)])
def test_cuda_kernel_matches_reference(dtype, V, k, top_p, min_p):
    import ctypes

    from test_softmax_topk import _cuda_torch

    torch = _cuda_torch()
    fn = ctypes.CDLL(str(ops.library_path())).toolkit_sample_topk_cuda
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                   ctypes.c_float, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p]
    rows = 32
    x = (2.0 * np.random.default_rng(V).standard_normal((rows, V))).astype(dtype)
    xt = torch.from_numpy(x).cuda()
    ids = torch.empty(rows, dtype=torch.int64, device="cuda")
    probs = torch.empty(rows, dtype=torch.float32, device="cuda")
    row_seeds = np.random.default_rng(V).integers(-2**62, 2**62, rows)
    for seeds in (None, row_seeds):  # one seed for the call, then one per row (host memory)
        err = fn(xt.data_ptr(), int(dtype == np.float16), rows, V, k, 0.8, top_p, min_p, 42,
                 None if seeds is None else seeds.ctypes.data, ids.data_ptr(), probs.data_ptr(),
                 torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        assert err == 0, f"cudaError {err}"
        ref_ids, ref_probs = reference.sample_topk_top_p(x, k, 0.8, top_p, min_p, seed=42 if seeds is None else seeds)
        np.testing.assert_array_equal(ids.cpu().numpy(), ref_ids)
        np.testing.assert_allclose(probs.cpu().numpy(), ref_probs, rtol=1e-3 if dtype == np.float16 else 2e-5)


@st.composite
def _sampling_cases(draw):
    V = draw(st.integers(1, 400))
    rows = draw(st.integers(1, 6))
    k = draw(st.integers(1, V))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 30.0]))  # flat to very peaked distributions
    x = (scale * np.random.default_rng(draw(st.integers(0, 2**31))).standard_normal((rows, V))).astype(np.float32)
    if draw(st.booleans()):
        x = np.round(x)  # exact ties between logits
    special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf]))
    if special is not None:  # non-finite entries at random places (NaN/+inf poison a row, -inf is p = 0)
        spots = np.random.default_rng(V + rows).random(x.shape) < 0.1
        x = np.where(spots, np.float32(special), x).astype(np.float32)
    return (x, k, draw(st.sampled_from([0.3, 1.0, 1.7])), draw(st.sampled_from([0.05, 0.5, 0.9, 1.0])),
            draw(st.sampled_from([0.0, 0.01, 0.3])), draw(st.integers(-2**40, 2**40)))


_SESSIONS: dict = {}


# Kernel and reference round probabilities differently by ~1 ulp, so a draw landing
# within ~1e-7 of a cumulative-probability boundary may pick the neighbour (about
# 1e-4 per row at V = 400): a mismatch under TOOLKIT_HYPOTHESIS=explore needs that
# check before it is called a bug. CI's fixed example set (tests/conftest.py) passes.
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_sampling_cases())
def test_property_matches_reference(case):
    x, k, temperature, top_p, min_p, seed = case
    key = (k, temperature, top_p, min_p)
    if key not in _SESSIONS:
        _SESSIONS[key] = session(np.float32, k, temperature, top_p, min_p, with_seed_input=True)
    ids, probs = _SESSIONS[key].run(None, {"logits": x, "seed": np.array([seed], np.int64)})
    ref_ids, ref_probs = reference.sample_topk_top_p(x, k, temperature, top_p, min_p, seed=seed)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-6, atol=1e-7)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 12), st.floats(0.3, 1.0), st.sampled_from([0.0, 0.05, 0.2]), st.floats(0.0, 0.999),
       st.integers(0, 2**31))
def test_draw_margin_bounds_the_perturbation_a_draw_survives(k, top_p, min_p, u, seed):
    """draw_margin (parity's tolerance for sampled tokens): moving every probability by
    less than a fraction of the margin leaves sample_position's choice unchanged."""
    rng = np.random.default_rng(seed)
    p = np.sort(rng.dirichlet(np.ones(k) * 0.5))[::-1]
    top_p, min_p = float(np.float32(top_p)), float(np.float32(min_p))
    margin = reference.draw_margin(p, top_p, min_p, u)
    assert margin >= 0
    j = reference.sample_position(p, top_p, min_p, u)
    if not np.isfinite(margin) or margin < 1e-9:
        return
    # cumulative sums move by at most k * eps: keep that under the margin
    eps = 0.4 * margin / (k + 1)
    for _ in range(5):
        q = np.sort(np.clip(p + rng.uniform(-eps, eps, k), 0, None))[::-1]
        assert reference.sample_position(q, top_p, min_p, u) == j


def test_runs_with_nearby_seeds_draw_unrelated_streams():
    """The per-call seeds of runs with base seeds -8..7 over 64 calls are all different
    (so no two calls draw the same uniforms): with seed + call, run s's call i + 1 was run
    s + 1's call i, and runs with consecutive seeds were shifted copies of one stream.
    Every call seed is an int64, as the op's sampling_seed input. The C++ host's rule
    (CallSeed in sample_math.h) is checked against this one by tests/test_cpp_host.py."""
    seeds = [reference.call_seed(s, i) for s in range(-8, 8) for i in range(64)]
    assert len(set(seeds)) == len(seeds)
    assert all(-(1 << 63) <= v < 1 << 63 for v in seeds)


def test_parity_forgives_a_sampled_flip_only_near_a_boundary():
    """A sampled head over a quantized cache failed parity on one of six draws whose
    probabilities moved by 1e-5: the draw sat on a boundary. Flips whose draw lay within
    the profile's probability tolerance of a boundary are ties; others still count."""
    from toolkit import parity

    opts = {"k": 4, "temperature": 1.0, "top_p": 1.0, "min_p": 0.0, "sample": True}
    seed = 3
    u = reference.uniform(seed, 0)
    # reference probabilities [a, 1 - a, ~0, ~0]: the draw picks token 1 when u > a
    for gap, forgiven in ((1e-3, True), (0.2, False)):  # a stays above 1 - a: token 0 is sorted first
        a = u - gap  # u sits just above the first boundary: token 1, flips to 0 if a grows by gap
        logits = np.log(np.array([[a, 1 - a, 1e-9, 1e-9]], np.float64))[:, None, :].astype(np.float32)
        head = parity.HeadCheck(opts)
        ref_ids, ref_p = reference.sample_topk_top_p(logits[:, -1], 4, seed=seed)
        assert ref_ids[0] == 1
        head.add(logits, {"next_token": np.array([0]), "next_token_prob": ref_p}, seed)
        rec = head.record("decode")
        parity.apply_thresholds(rec, parity.THRESHOLDS["kv-int4"])  # 5e-2 in probability
        assert rec.top1_agreement == 0.0 and rec.passed == forgiven, (gap, rec.top1_flip_margins, rec.failures)
        if not forgiven:
            assert "sampled token agreement 0.0000" in rec.failures[0]


def test_filters_keep_the_tokens_transformers_keeps():
    """top-k, top-p and min-p together keep the tokens transformers' logits warpers keep
    (TopK, then TopP, then MinP: the order of its generation config, also vLLM's and
    llama.cpp's). The op applied min-p before top-p, which differs when both are set:
    probabilities [.5, .3, .2], top_p 0.6, min_p 0.5 drew only token 0, transformers
    keeps 0 and 1 (an audit). The kept set is where a draw with u just below 1 lands."""
    import torch
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    def kept_by_us(logits, k, top_p, min_p):
        values, _ = reference.softmax_topk(logits[None], k, 1.0, 0, False)[:2]
        return reference.sample_position(values[0], top_p, min_p, 1.0 - 1e-12) + 1  # a prefix of the top k

    def kept_by_transformers(logits, k, top_p, min_p):
        scores = torch.from_numpy(logits)[None]
        for warper in (TopKLogitsWarper(k), TopPLogitsWarper(top_p), MinPLogitsWarper(min_p)):
            scores = warper(None, scores)
        return int(torch.isfinite(scores).sum())

    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    assert kept_by_us(logits, 3, 0.6, 0.5) == kept_by_transformers(logits, 3, 0.6, 0.5) == 2
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(400):
        V = int(rng.integers(2, 300))
        logits = (rng.normal(size=V) * rng.uniform(0.3, 4.0)).astype(np.float32)
        k = int(rng.integers(1, V + 1))
        top_p, min_p = float(np.float32(rng.uniform(0.05, 1.0))), float(np.float32(rng.uniform(0.0, 0.6)))
        probs = np.sort(reference.softmax_topk(logits[None], k, 1.0, 0, False)[0][0].astype(np.float64))[::-1]
        cum = np.cumsum(probs) / probs.sum()
        if np.abs(cum - top_p).min() < 1e-5 or np.abs(probs - min_p * probs[0]).min() < 1e-6:
            continue  # a cut within float32 rounding: the two sides may round it differently
        assert kept_by_us(logits, k, top_p, min_p) == kept_by_transformers(logits, k, top_p, min_p), (V, k, top_p, min_p)
        checked += 1
    assert checked > 300
