"""LowRankMatMul: the CPU (and, where a GPU exists, CUDA) kernel vs the NumPy reference.

Tolerances: float32 weights, |y - ref| <= 1e-5 * max|ref| + 1e-5 * |ref| against the
float64 reference: the kernel rounds t = x·U to float32 and accumulates in float32
(fused multiply-adds), an error of a few 1e-7 relative at these sizes, so 1e-5
leaves a wide margin while still catching a wrong index or a dropped term (O(1)).
float16 weights: the same 1e-5. The kernel widens each half to float32 exactly, and
the reference multiplies the very same half values (cast to float64), so storing
weights in half adds no kernel error; only the model's weights are rounded (that
is a fidelity question, measured by the low-rank pass, not an op error).
"""

from __future__ import annotations

import ctypes

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit import ops
from toolkit.ops import reference

WEIGHT_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.int8: TensorProto.INT8}
TOL = 1e-5


def session(weight_dtype=np.float32, with_bias=False, threads=1, constants=None):
    """A one-node model; ``constants`` (name -> array) become initializers instead of inputs
    (the kernel packs constant U / V once, at creation)."""
    constants = constants or {}
    int8 = weight_dtype == np.int8  # int8 U / V come with their column scales (inputs 4, 5)
    inputs = ["x", "U", "V"] + (["bias"] if with_bias else [""] if int8 else []) + (
        ["U_scale", "V_scale"] if int8 else [])
    node = helper.make_node("LowRankMatMul", inputs, ["y"], domain=ops.DOMAIN)
    wt = WEIGHT_TYPES[weight_dtype]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]
    graph_inputs += [helper.make_tensor_value_info(n, wt, None) for n in ("U", "V") if n not in constants]
    if with_bias:
        graph_inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, None))
    if int8:
        graph_inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("U_scale", "V_scale")]
    graph = helper.make_graph([node], "lowrank", graph_inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(a, n) for n, a in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])
    model.ir_version = 10
    so = ops.session_options(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def make(lead, K, r, N, weight_dtype, with_bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, K)).astype(np.float32)
    U = (rng.standard_normal((K, r)) / np.sqrt(K)).astype(weight_dtype)
    V = (rng.standard_normal((r, N)) / np.sqrt(r)).astype(weight_dtype)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    feeds = {"x": x, "U": U, "V": V}
    if with_bias:
        feeds["bias"] = bias
    return feeds, reference.lowrank_matmul(x, U, V, bias)


def assert_close(y, ref):
    assert y.shape == ref.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))


# (leading dims of x, K, r, N): M = 1 decode, odd sizes (tails of the 8-wide vectors
# and the 6x16 tile), batch dims, the few-rows (slab) and many-rows (row-block)
# paths on both sides of their threshold (M = 32), slabs of >1 task (K, r > 128).
SHAPES = [
    ((1,), 1, 1, 1), ((1,), 7, 3, 5), ((1,), 64, 16, 40), ((1,), 1000, 130, 997), ((1,), 4096, 256, 300),
    ((3,), 33, 17, 129), ((2, 3), 100, 24, 70), ((31,), 300, 129, 257), ((32,), 300, 129, 257),
    ((1, 1, 8), 517, 200, 1030), ((5, 13), 64, 48, 33), ((128,), 256, 64, 200), ((2, 50), 129, 9, 17),
    ((2,), 517, 200, 1030),  # two rows: the two-panel kernel (MicroWide2) and a partial last panel
    ((200,), 300, 40, 70),  # 34 register tiles: two row blocks of up to 32 tiles, a partial k-block
]


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("weight_dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("lead,K,r,N", SHAPES)
def test_matches_reference(lead, K, r, N, weight_dtype, with_bias):
    feeds, ref = make(lead, K, r, N, weight_dtype, with_bias, seed=K * 7 + r + N)
    assert_close(session(weight_dtype, with_bias).run(None, feeds)[0], ref)


@pytest.mark.parametrize("lead,K,r,N", [((1,), 1000, 130, 997), ((8,), 4096, 256, 300), ((64,), 300, 129, 257),
                                        ((3, 7), 517, 200, 1030), ((2,), 1000, 130, 997), ((200,), 300, 40, 70)])
@pytest.mark.parametrize("weight_dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_two_threads_match_one_bit_for_bit(lead, K, r, N, weight_dtype):
    """The blocking depends on the shapes only (lowrank_matmul_cpu.cc), never on the threads."""
    feeds, ref = make(lead, K, r, N, weight_dtype, True, seed=3)
    one = session(weight_dtype, True, threads=1).run(None, feeds)[0]
    two = session(weight_dtype, True, threads=2).run(None, feeds)[0]
    np.testing.assert_array_equal(one, two)
    assert_close(two, ref)


@pytest.mark.parametrize("lead,K,r,N", [((1,), 1000, 130, 997), ((7,), 300, 129, 257), ((64,), 517, 200, 1030),
                                        ((2, 3), 33, 17, 40)])
@pytest.mark.parametrize("weight_dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("which", ["U", "V", "UV"])
def test_constant_weights_packed_at_creation_give_the_same_bits(lead, K, r, N, weight_dtype, which):
    """Constant U / V are packed once when the kernel is created; weights fed as inputs are
    packed every call. Both feed the same FMA chains: identical outputs, and the reference."""
    feeds, ref = make(lead, K, r, N, weight_dtype, True, seed=11)
    constants = {n: feeds[n] for n in which}
    fed = session(weight_dtype, True).run(None, feeds)[0]
    packed = session(weight_dtype, True, threads=2, constants=constants).run(
        None, {n: a for n, a in feeds.items() if n not in constants})[0]
    np.testing.assert_array_equal(packed, fed)
    assert_close(packed, ref)


def make_int8(lead, K, r, N, with_bias, seed):
    feeds, _ = make(lead, K, r, N, np.float32, with_bias, seed)
    feeds["U"], feeds["U_scale"] = reference.quantize_columns(feeds["U"])
    feeds["V"], feeds["V_scale"] = reference.quantize_columns(feeds["V"])
    ref = reference.lowrank_matmul(feeds["x"], feeds["U"], feeds["V"], feeds.get("bias"),
                                   feeds["U_scale"], feeds["V_scale"])
    return feeds, ref


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("lead,K,r,N", SHAPES)
def test_int8_weights_match_reference(lead, K, r, N, with_bias):
    feeds, ref = make_int8(lead, K, r, N, with_bias, seed=K + 5 * r + N)
    assert_close(session(np.int8, with_bias).run(None, feeds)[0], ref)


@pytest.mark.parametrize("lead,K,r,N", [((1,), 1000, 130, 997), ((2,), 517, 200, 1030), ((64,), 517, 200, 1030)])
def test_int8_weights_threads_and_packing_give_the_same_bits(lead, K, r, N):
    feeds, ref = make_int8(lead, K, r, N, True, seed=5)
    fed = session(np.int8, True).run(None, feeds)[0]
    constants = {n: feeds[n] for n in ("U", "V")}
    packed = session(np.int8, True, threads=2, constants=constants).run(
        None, {n: a for n, a in feeds.items() if n not in constants})[0]
    np.testing.assert_array_equal(packed, fed)
    assert_close(fed, ref)


def test_int8_weights_approximate_the_float_layer():
    """Quantizing U and V per column costs about 1% relative error (127 levels), no more."""
    feeds, ref = make((4,), 512, 64, 256, np.float32, False, seed=2)
    q, _ = make_int8((4,), 512, 64, 256, False, seed=2)
    y = session(np.int8, False).run(None, q)[0]
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel < 0.02, rel


def test_column_scales_are_checked():
    feeds, _ = make_int8((2,), 8, 4, 6, False, seed=0)
    bad = dict(feeds, V_scale=np.ones(5, np.float32))
    with pytest.raises(Exception, match=r"LowRankMatMul: input 'V_scale' has shape \[5\]; expected \[6\]"):
        session(np.int8, False).run(None, bad)
    # scales with float weights are rejected, not ignored
    f, _ = make((2,), 8, 4, 6, np.float32, False, seed=0)
    node = helper.make_node("LowRankMatMul", ["x", "U", "V", "", "s"], ["y"], domain=ops.DOMAIN)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                            for n in ("x", "U", "V", "s")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), ops.session_options(1), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="input 'U_scale' is only for int8 weights"):
        sess.run(None, dict(f, s=np.ones(4, np.float32)))


def test_quantize_columns_bounds():
    w = np.random.default_rng(0).standard_normal((50, 7))
    w[:, 3] = 0.0
    q, scale = reference.quantize_columns(w)
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and scale[3] == 1.0 and not q[:, 3].any()
    assert np.abs(q * scale.astype(np.float64) - w).max() <= scale.max() / 2 + 1e-12


@pytest.mark.parametrize("lead,K,r,N", [((1,), 1000, 130, 997), ((2,), 517, 200, 1030), ((8,), 300, 129, 257),
                                        ((64,), 517, 40, 70)])
@pytest.mark.parametrize("weight_dtype", [np.float32, np.float16, np.int8], ids=["f32", "f16", "i8"])
def test_avx2_and_portable_paths_give_the_same_bits(lead, K, r, N, weight_dtype, monkeypatch):
    """Both paths compute each output as one FMA chain in ascending k (std::fma in the
    portable one): equal bits, so the portable path is checked on every machine."""
    if weight_dtype == np.int8:
        feeds, _ = make_int8(lead, K, r, N, True, seed=8)
    else:
        feeds, _ = make(lead, K, r, N, weight_dtype, True, seed=8)
    sess = session(weight_dtype, True, threads=2)
    fast = sess.run(None, feeds)[0]
    monkeypatch.setenv("TOOLKIT_LOWRANK_SCALAR", "1")
    portable = sess.run(None, feeds)[0]
    np.testing.assert_array_equal(portable, fast)


def test_rank_one_bias_only_structure():
    """x = e_0, U = first column of ones: y = V[0] + bias exactly (no accumulation error)."""
    K, N = 10, 12
    x = np.zeros((1, K), np.float32)
    x[0, 0] = 1.0
    U = np.zeros((K, 1), np.float32)
    U[0, 0] = 1.0
    V = np.arange(N, dtype=np.float32)[None, :]
    bias = np.full(N, 0.5, np.float32)
    y = session(np.float32, True).run(None, {"x": x, "U": U, "V": V, "bias": bias})[0]
    np.testing.assert_array_equal(y, (V + bias))


def test_empty_rows_give_empty_output():
    feeds = {"x": np.zeros((0, 8), np.float32), "U": np.ones((8, 2), np.float32), "V": np.ones((2, 3), np.float32)}
    y = session().run(None, feeds)[0]
    assert y.shape == (0, 3)


@pytest.mark.parametrize("x_shape,u_shape,v_shape,b_shape,message", [
    ((), (4, 2), (2, 3), None, r"input 'x' has shape \[\]; expected rank >= 1"),
    ((2, 0), (0, 2), (2, 3), None, r"input 'x' has shape \[2,0\]; expected a non-empty last axis"),
    ((2, 4), (4,), (2, 3), None, r"input 'U' has shape \[4\]; expected rank 2"),
    ((2, 4), (5, 2), (2, 3), None, r"input 'U' has shape \[5,2\]; expected \[K, r\] with K = 4 .*got K = 5"),
    ((2, 4), (4, 0), (0, 3), None, r"input 'U' has shape \[4,0\]; expected rank r >= 1"),
    ((2, 4), (4, 2), (2, 3, 1), None, r"input 'V' has shape \[2,3,1\]; expected rank 2"),
    ((2, 4), (4, 2), (3, 3), None, r"input 'V' has shape \[3,3\]; expected \[r, N\] with r = 2 .*got r = 3"),
    ((2, 4), (4, 2), (2, 0), None, r"input 'V' has shape \[2,0\]; expected a non-empty output axis"),
    ((2, 4), (4, 2), (2, 3), (4,), r"input 'bias' has shape \[4\]; expected \[N\] with N = 3"),
    ((2, 4), (4, 2), (2, 3), (1, 3), r"input 'bias' has shape \[1,3\]; expected \[N\] with N = 3"),
])
def test_invalid_inputs_name_the_input(x_shape, u_shape, v_shape, b_shape, message):
    feeds = {"x": np.zeros(x_shape, np.float32), "U": np.zeros(u_shape, np.float32),
             "V": np.zeros(v_shape, np.float32)}
    if b_shape is not None:
        feeds["bias"] = np.zeros(b_shape, np.float32)
    with pytest.raises(Exception, match="LowRankMatMul: " + message):
        session(np.float32, b_shape is not None).run(None, feeds)


def test_reference_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="U must be"):
        reference.lowrank_matmul(np.zeros((1, 4)), np.zeros((5, 2)), np.zeros((2, 3)))


# ------------------------------------------------------------------ CUDA


def _cuda_torch():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed: no CUDA harness")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device available")
    if not ops.has_cuda():
        pytest.skip("libtoolkit_ops.so was built without CUDA kernels")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("weight_dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("lead,K,r,N", SHAPES)
def test_cuda_kernel_matches_reference(lead, K, r, N, weight_dtype, with_bias):
    torch = _cuda_torch()
    lib = ctypes.CDLL(str(ops.library_path()))
    fn = lib.toolkit_lowrank_matmul_cuda
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    feeds, ref = make(lead, K, r, N, weight_dtype, with_bias, seed=5)
    M = int(np.prod(lead))
    dev = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in feeds.items()}
    y = torch.empty((M, N), dtype=torch.float32, device="cuda")
    err = fn(dev["x"].data_ptr(), dev["U"].data_ptr(), dev["V"].data_ptr(),
             dev["bias"].data_ptr() if with_bias else None, int(weight_dtype == np.float16), M, K, r, N,
             y.data_ptr(), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert err == 0, f"cudaError {err}"
    assert_close(y.cpu().numpy().reshape(ref.shape), ref)


def _cuda_int8_entry():
    """ctypes binding of toolkit_lowrank_matmul_cuda_int8 (device pointers)."""
    fn = ctypes.CDLL(str(ops.library_path())).toolkit_lowrank_matmul_cuda_int8
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_void_p]
    return fn


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("lead,K,r,N", SHAPES)
def test_cuda_int8_kernel_matches_reference(lead, K, r, N, with_bias):
    """int8 weights on the GPU: codes times column scales, the same 1e-5 bound."""
    torch = _cuda_torch()
    fn = _cuda_int8_entry()
    feeds, ref = make_int8(lead, K, r, N, with_bias, seed=K + r)
    M = int(np.prod(lead))
    dev = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in feeds.items()}
    y = torch.empty((M, N), dtype=torch.float32, device="cuda")
    err = fn(dev["x"].data_ptr(), dev["U"].data_ptr(), dev["V"].data_ptr(), dev["U_scale"].data_ptr(),
             dev["V_scale"].data_ptr(), dev["bias"].data_ptr() if with_bias else None, M, K, r, N,
             y.data_ptr(), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert err == 0, f"cudaError {err}"
    assert_close(y.cpu().numpy().reshape(ref.shape), ref)


@pytest.mark.gpu
def test_cuda_int8_kernel_rejects_missing_scales():
    torch = _cuda_torch()
    fn = _cuda_int8_entry()
    feeds, _ = make_int8((2,), 8, 4, 6, False, seed=0)
    dev = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in feeds.items()}
    y = torch.empty((2, 6), dtype=torch.float32, device="cuda")
    err = fn(dev["x"].data_ptr(), dev["U"].data_ptr(), dev["V"].data_ptr(), None, None, None, 2, 8, 4, 6,
             y.data_ptr(), torch.cuda.current_stream().cuda_stream)
    assert err != 0  # cudaErrorInvalidValue, not a read through a null pointer
