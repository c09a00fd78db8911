"""The CUDA kernels, run on the CPU, against the references the GPU tests use.

Most machines this project runs on have no GPU, where the .cu sources would only be
compiled. tests/cuda_sim builds them as host C++ instead: every CUDA thread of a
block is a std::thread, __syncthreads and the warp collectives are barriers, the
device reports 4 SMs (so grids are sized as on a small GPU: long rows split, long
contexts sliced). These tests drive the library's C entries with host arrays
through the GPU tests' scenarios and tolerances. What this checks is the kernels'
logic: indexing and strides, barrier placement, warp exchanges, the merges of split
work, the fixed-capacity cache updated in place. What it cannot check: the GPU's
memory model and math library (expf, logf here are glibc's) and speed; the
gpu-marked tests in the other modules do that on a device.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pathlib

import numpy as np
import pytest
import test_kv_attention as kvt
import test_lowrank_matmul as lrt
import test_softmax_topk as stt

from toolkit.ops import kv_quant as kq
from toolkit.ops import reference

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMS = 4

P = ctypes.c_void_p
I64 = ctypes.c_int64


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("cuda_sim_build", ROOT / "tests" / "cuda_sim" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    # TOOLKIT_CUDA_SIM_SANITIZE=thread builds with ThreadSanitizer, which reports a
    # missing __syncthreads as a data race (run with LD_PRELOAD=libtsan.so.2).
    sanitize = os.environ.get("TOOLKIT_CUDA_SIM_SANITIZE") or None
    lib = ctypes.CDLL(str(build.build(ROOT / "build" / "cuda_sim", sanitize=sanitize)))
    lib.cuda_sim_set_sm_count(SMS)
    return lib


def _ptr(a):
    return None if a is None or a.size == 0 else a.ctypes.data


# ---------------------------------------------------------------- FusedSoftmaxTopK


def _softmax_topk(sim, x, k, normalize, log_probs, temperature=0.9):
    fn = sim.toolkit_softmax_topk_cuda
    fn.restype = ctypes.c_int
    fn.argtypes = [P, ctypes.c_int, I64, I64, I64, ctypes.c_float, ctypes.c_int, ctypes.c_int, P, P, P, P]
    rows, V = x.shape
    values = np.empty((rows, k), x.dtype)
    indices = np.empty((rows, k), np.int64)
    log_norm = np.empty(rows, np.float32)
    err = fn(_ptr(x), int(x.dtype == np.float16), rows, V, k, temperature, normalize, log_probs, _ptr(values),
             _ptr(indices), _ptr(log_norm), None)
    assert err == 0, f"cudaError {err}"
    stt.assert_cuda_outputs(x, k, temperature, normalize, log_probs, values, indices, log_norm)


@pytest.mark.parametrize("normalize,log_probs", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("shape,k", [((4, 7), 3), ((3, 1000), 1000), ((15, 300), 17), ((1, 5000), 2500)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_softmax_topk_row_kernel(sim, dtype, shape, k, normalize, log_probs):
    """One block per row: every data kind, k up to V (k > 2048 sorts in global scratch)."""
    x = stt.make_input(shape, stt.KINDS if shape[0] >= 8 else ["normal", "spiky", "constant"], dtype, seed=11)
    _softmax_topk(sim, x, k, normalize, log_probs)


@pytest.mark.parametrize("log_probs", [0, 1])
@pytest.mark.parametrize("shape,k,kinds", [
    ((1, 65536), 1, ["normal"]),                                 # 8 chunks
    ((2, 40000), 256, ["ascending", "constant"]),                # ties across chunk borders
    ((1, 70000), 50, ["nan"]), ((1, 70000), 50, ["pinf"]),        # poisoned rows
    ((1, 70000), 7, ["ninf_some"]), ((1, 70000), 7, ["ninf_all"]),
    ((2, 50000), 1024, ["spiky", "edge"]),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_softmax_topk_split_rows(sim, dtype, shape, k, kinds, log_probs):
    """Rows long enough for fewer rows than half the SMs: split over blocks, then merged."""
    _softmax_topk(sim, stt.make_input(shape, kinds, dtype, seed=12), k, 0, log_probs)


# ---------------------------------------------------------------- SampleTopKTopP


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("rows,V,k,top_p,min_p", [(6, 1000, 40, 0.9, 0.0), (1, 65536, 50, 0.95, 0.02),
                                                  (3, 3000, 1, 1.0, 0.0), (2, 40000, 300, 0.5, 0.1)])
def test_sample_topk(sim, dtype, rows, V, k, top_p, min_p):
    fn = sim.toolkit_sample_topk_cuda
    fn.restype = ctypes.c_int
    fn.argtypes = [P, ctypes.c_int, I64, I64, I64, ctypes.c_float, ctypes.c_float, ctypes.c_float, I64, P, P, P, P]
    x = (2.0 * np.random.default_rng(V).standard_normal((rows, V))).astype(dtype)
    row_seeds = np.random.default_rng(rows).integers(-2**62, 2**62, rows)
    for seeds in (None, row_seeds):  # one seed for the call, then one per row
        ids = np.empty(rows, np.int64)
        probs = np.empty(rows, np.float32)
        err = fn(_ptr(x), int(dtype == np.float16), rows, V, k, 0.8, top_p, min_p, 42,
                 None if seeds is None else _ptr(seeds), _ptr(ids), _ptr(probs), None)
        assert err == 0, f"cudaError {err}"
        ref_ids, ref_probs = reference.sample_topk_top_p(x, k, 0.8, top_p, min_p, seed=42 if seeds is None else seeds)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-3 if dtype == np.float16 else 2e-5)


# ---------------------------------------------------------------- LowRankMatMul


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("weights", ["f32", "f16", "int8"])
@pytest.mark.parametrize("lead,K,r,N", [((1,), 7, 3, 5), ((3,), 33, 17, 129), ((2, 3), 100, 24, 70),
                                        ((31,), 60, 19, 37)])
def test_lowrank_matmul(sim, lead, K, r, N, weights, with_bias):
    M = int(np.prod(lead))
    y = np.empty((M, N), np.float32)
    if weights == "int8":
        feeds, ref = lrt.make_int8(lead, K, r, N, with_bias, seed=K + r)
        fn = sim.toolkit_lowrank_matmul_cuda_int8
        fn.restype = ctypes.c_int
        fn.argtypes = [P] * 6 + [I64] * 4 + [P, P]
        err = fn(_ptr(feeds["x"]), _ptr(feeds["U"]), _ptr(feeds["V"]), _ptr(feeds["U_scale"]),
                 _ptr(feeds["V_scale"]), _ptr(feeds["bias"]) if with_bias else None, M, K, r, N, _ptr(y), None)
    else:
        dtype = np.float16 if weights == "f16" else np.float32
        feeds, ref = lrt.make(lead, K, r, N, dtype, with_bias, seed=5)
        fn = sim.toolkit_lowrank_matmul_cuda
        fn.restype = ctypes.c_int
        fn.argtypes = [P, P, P, P, ctypes.c_int, I64, I64, I64, I64, P, P]
        err = fn(_ptr(feeds["x"]), _ptr(feeds["U"]), _ptr(feeds["V"]), _ptr(feeds["bias"]) if with_bias else None,
                 int(dtype == np.float16), M, K, r, N, _ptr(y), None)
    assert err == 0, f"cudaError {err}"
    lrt.assert_close(y.reshape(ref.shape), ref)


# ---------------------------------------------------------------- QuantKVAttention


def _entry(sim, name):
    fn = getattr(sim, name)
    fn.restype = ctypes.c_int
    fn.argtypes = [P, P, ctypes.c_float, P, P, P]
    return fn


def _growing_runner(sim):
    """A runner factory for test_kv_attention._drive_cuda: toolkit_quant_kv_attention_cuda on host arrays."""
    fn = _entry(sim, "toolkit_quant_kv_attention_cuda")

    def factory(scheme, with_bias=True, scale=0.0):
        def run(q, k, v, cache, bias):
            n, r = cache["key_q"].shape[2], cache["key_res"].shape[2]
            outs = {name: None if spec is None else np.empty(*spec)
                    for name, spec in kvt.grown_outputs(scheme, q, k, cache).items()}
            dims, attrs, host = kvt.c_entry_args(scheme, q, k, v, cache, bias, n, r)
            err = fn(dims, attrs, scale, (P * 12)(*map(_ptr, host)), (P * 9)(*map(_ptr, outs.values())), None)
            assert err == 0, f"cudaError {err}"
            return outs["output"], {n: t for n, t in outs.items() if n != "output" and t is not None}

        return run

    return factory


@pytest.mark.parametrize("name", list(kvt.SCHEMES))
def test_kv_prefill_then_decode(sim, name):
    kvt._drive_cuda(_growing_runner(sim), kvt.SCHEMES[name], 1, 4, 2, 32, steps=[13] + [1] * 6 + [5, 1])


@pytest.mark.parametrize("name", ["kivi4", "int8"])
def test_kv_causal_default_and_left_padding(sim, name):
    scheme = kvt.SCHEMES[name]
    kvt._drive_cuda(_growing_runner(sim), scheme, 1, 4, 2, 32, steps=[9, 1, 7, 1], with_bias=False)
    kvt._drive_cuda(_growing_runner(sim), scheme, 3, 4, 2, 32, steps=[20, 1, 1, 8], pad=[0, 3, 11], pad_key=1e4,
                    seed=5)


def test_kv_long_context_slices_and_scale(sim):
    # ~360 positions at batch 1, 1 KV head: a decode step takes 6 position slices,
    # merged; the 330-token prefill one slice per row tile (the output written directly).
    kvt._drive_cuda(_growing_runner(sim), kq.KVScheme(4, True, 32, 32, 64), 1, 4, 1, 64, steps=[330, 1, 33, 1])
    kvt._drive_cuda(_growing_runner(sim), kvt.SCHEMES["kivi4"], 1, 2, 2, 32, steps=[17, 1, 1], scale=0.05)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("name", kvt.POISON_SCHEMES)
def test_kv_nan_or_inf_entering_the_cache(sim, name, bad):
    # the CUDA min / max scans keep a NaN as the reference does (see the CPU test)
    kvt._drive_cuda(_growing_runner(sim), kvt.SCHEMES[name], 2, 4, 2, 32, steps=[13] + [1] * 18, poison=bad)


@pytest.mark.parametrize("d", [128, 256])
def test_kv_large_head_dim_and_gqa(sim, d):
    # Real models' head dims with GQA 4 (at 256 the shared memory is past 48 KiB).
    kvt._drive_cuda(_growing_runner(sim), kvt.SCHEMES["kivi4"], 1, 8, 2, d, steps=[37, 1, 9], seed=2)


def _drive_capacity_sim(sim, scheme, batch, hq, hkv, d, steps, capacity, slots=None, in_place=False, seed=0):
    """The fixed-capacity entry against kq.attention_capacity (presents bit for bit,
    unused slots untouched) and against the growing entry's output (bit-identical);
    in_place passes the past's arrays as the presents."""
    fn = _entry(sim, "toolkit_quant_kv_attention_cuda_capacity")
    grow = _growing_runner(sim)(scheme)
    rng = np.random.default_rng(seed)
    cache, lengths = kvt._garbage_capacity(kq.empty_cache(batch, hkv, d, scheme), scheme, capacity, slots)
    cache_grow = kq.empty_cache(batch, hkv, d, scheme)
    past = 0
    for i, s_len in enumerate(steps):
        q, k, v = kvt.step_inputs(rng, batch, hq, hkv, s_len, d)
        bias = kvt.causal_bias(batch, s_len, past, None)
        ref, ref_cache, ref_lengths = kq.attention_capacity(q, k, v, cache, lengths, scheme, bias)
        n, r = int(lengths[0]), int(lengths[1])
        dims, attrs, host = kvt.c_entry_args(scheme, q, k, v, cache, bias, n, r,
                                     (cache["key_q"].shape[2], cache["key_res"].shape[2]))
        names = ["key_q", "key_scale", "key_zero", "key_res", "value_q", "value_scale", "value_zero", "value_res"]
        if in_place:
            host = [host[0], host[1], host[2]] + [cache.get(n) for n in names] + [host[11]]
            present = {n: cache.get(n) for n in names}
        else:
            present = {n: None if cache.get(n) is None else np.empty_like(cache[n]) for n in names}
        out = np.empty(q.shape, np.float32)
        out_lengths = np.zeros(2, np.int64)
        outs = [out, *present.values(), out_lengths]
        err = fn(dims, attrs, 0.0, (P * 12)(*map(_ptr, host)), (P * 10)(*map(_ptr, outs)), None)
        assert err == 0, f"cudaError {err}"
        present = {n: t for n, t in present.items() if t is not None}
        kvt.assert_cache_equal(present, ref_cache, f"call {i}")
        np.testing.assert_array_equal(out_lengths, ref_lengths)
        out_grow, cache_grow = grow(q, k, v, cache_grow, bias)
        np.testing.assert_array_equal(out, out_grow, err_msg=f"call {i}")
        np.testing.assert_allclose(out, ref, rtol=kvt.OUT_RTOL, atol=kvt.OUT_ATOL, err_msg=f"call {i}")
        cache, lengths = present, out_lengths
        past += s_len


@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in-place"])
@pytest.mark.parametrize("name", list(kvt.SCHEMES))
def test_kv_fixed_capacity(sim, name, in_place):
    # 13 + 6 + 7 = 26 tokens into 48 quantized slots: windows fill and flush.
    _drive_capacity_sim(sim, kvt.SCHEMES[name], 2, 4, 2, 32, steps=[13] + [1] * 6 + [5, 1, 1], capacity=48,
                        in_place=in_place)


def test_kv_fixed_capacity_extra_slots(sim):
    scheme = kvt.SCHEMES["int8"]
    _drive_capacity_sim(sim, scheme, 1, 4, 2, 32, steps=[9, 1, 1, 7, 1], capacity=32, slots=scheme.residual + 5,
                        in_place=True)


@pytest.mark.parametrize("name", ["int8", "kivi4"])
@pytest.mark.parametrize("past", [16, 330])  # one slice, and several slices merged
def test_kv_nan_query_makes_its_head_nan(sim, name, past):
    """As on the CPU: a NaN query row makes its head NaN (every score NaN: the slice
    must not look fully masked), the other head is the reference's."""
    scheme = kvt.SCHEMES[name]
    run = _growing_runner(sim)(scheme)
    rng = np.random.default_rng(0)
    cache = kq.empty_cache(1, 1, 32, scheme)
    q, k, v = kvt.step_inputs(rng, 1, 2, 1, past, 32)
    _, cache = kq.attention(q, k, v, cache, scheme, kvt.causal_bias(1, past, 0, None))  # fill the cache
    q, k, v = kvt.step_inputs(rng, 1, 2, 1, 1, 32)
    q[0, 0, 0, 3] = np.nan
    n, r = cache["key_q"].shape[2], cache["key_res"].shape[2]
    bias = kvt.causal_bias(1, 1, n + r, None)
    out, _ = run(q, k, v, cache, bias)
    ref, _ = kq.attention(q, k, v, dict(cache), scheme, bias)
    assert np.isnan(out[0, 0]).all() and np.isnan(ref[0, 0]).all()
    np.testing.assert_allclose(out[0, 1], ref[0, 1], atol=kvt.OUT_ATOL, rtol=kvt.OUT_RTOL)
