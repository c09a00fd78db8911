"""Parity tests of com.toolkit::FusedSoftmaxTopK (custom_ops/softmax_topk/).

Every output is compared with ONNX Runtime's own subgraph, run in the same test
(Softmax -> TopK, LogSoftmax -> TopK, TopK -> Softmax/LogSoftmax), and with the
NumPy reference toolkit.ops.reference.softmax_topk.

Index comparison:
  * vs the reference: identical (ranking on the exact logits, ties -> lower index).
  * vs ORT, normalize=1: identical (both rank the raw logits).
  * vs ORT, normalize=0: ORT ranks its *rounded* probabilities, which tie where the
    logits do not (exp underflow to 0, fp16 rounding) and orders such ties by index.
    So we require (a) identical indices wherever ORT's values are not tied, and (b)
    that ORT's own probability row gathered at our indices equals ORT's TopK values
    bit for bit, i.e. our selection is a valid TopK of ORT's probability tensor.
    NaN/Inf rows (all-NaN probabilities) must match exactly.

Value tolerances (per dtype, vs ORT and vs the float64 reference):
  float32: rtol 1e-6, atol 1e-7 for probabilities; log-probabilities atol 1e-6
           (ORT rounds (x - m) and log(sum) separately in float32). With
           temperature != 1, rtol 4e-6 vs ORT only: ORT's Div rounds x/T in float32;
           and vs ORT at least 1e-10 * V: ORT's Softmax sums the row in float32
           (1e-5 relative error at V = 128256, where we are within 6e-8 of float64).
  float16: rtol 1e-3 (one fp16 ulp is 2^-10 ~ 9.8e-4 relative), atol 1e-6.
  For fp16 with temperature != 1 the ORT subgraph divides in float32 (Cast -> Div ->
  Softmax -> Cast), because an fp16 Div rounds x/T to 11 bits and would make ORT
  itself off by up to |x/T| * 2^-11 in the exponent.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import toolkit.ops as ops
from toolkit.errors import OpLibraryError
from toolkit.ops.reference import softmax_topk as reference

ort = pytest.importorskip("onnxruntime")

try:
    ops.library_path()
except OpLibraryError as err:  # pragma: no cover - depends on the build
    pytest.skip(f"custom-op library not built: {err}", allow_module_level=True)

DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
TOL = {  # dtype -> (rtol, atol for probabilities, atol for log-probabilities)
    np.float32: (1e-6, 1e-7, 1e-6),
    np.float16: (1e-3, 1e-6, 1e-6),
}
# "wide" spreads logits over about +-100, so that within one block some terms fall
# below the kernel exp's clamp (2^-125) and some do not.
# Rows centred far from 0 (float32; float16 rows use 3e4): "offset" at 1e6; "edge" at
# 1e9, where float32 steps (64) times log2(e) come close to the kernel's exp range, so
# its clamp sits one step below the max; "huge" at -1e30, where no such clamp exists
# and the row takes the exact scalar path.
OFFSETS = {"offset": (1.0e6, 3.0), "edge": (1.0e9, 300.0), "huge": (-1.0e30, 1.0e25)}
KINDS = ["normal", "spiky", "wide", "constant", "ascending", "nan", "pinf", "ninf_some", "ninf_all", *OFFSETS]


# ------------------------------------------------------------------ models


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)]
    )
    model.ir_version = 10
    return model.SerializeToString()


def _options(threads: int = 1):
    options = ops.session_options(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.inter_op_num_threads = 1
    return options


@functools.lru_cache(maxsize=None)
def fused_session(dtype, k, temperature=1.0, normalize=0, log_probs=0, threads=1, with_norm=True):
    elem = DTYPES[dtype]
    outputs = ["values", "indices"] + (["log_normalizer"] if with_norm else [])
    node = helper.make_node(
        "FusedSoftmaxTopK",
        ["logits"],
        outputs,
        domain=ops.DOMAIN,
        k=k,
        temperature=float(temperature),
        normalize=normalize,
        log_probs=log_probs,
    )
    out_info = [
        helper.make_tensor_value_info("values", elem, None),
        helper.make_tensor_value_info("indices", TensorProto.INT64, None),
        helper.make_tensor_value_info("log_normalizer", TensorProto.FLOAT, None),
    ][: len(outputs)]
    graph = helper.make_graph(
        [node], "fused", [helper.make_tensor_value_info("logits", elem, None)], out_info
    )
    return ort.InferenceSession(_model(graph), _options(threads), providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=None)
def ort_session(dtype, k, temperature=1.0, normalize=0, log_probs=0):
    """ORT's unfused subgraph; outputs (values, indices[, full probability row])."""
    elem = DTYPES[dtype]
    softmax = "LogSoftmax" if log_probs else "Softmax"
    nodes = [helper.make_node("Constant", [], ["K"], value=helper.make_tensor("k", TensorProto.INT64, [1], [k]))]
    if temperature != 1.0:
        nodes.append(
            helper.make_node("Constant", [], ["T"], value=helper.make_tensor("t", TensorProto.FLOAT, [], [temperature]))
        )
    upcast = temperature != 1.0 and dtype == np.float16

    def scaled_softmax(src: str, dst: str) -> None:
        if temperature == 1.0:
            nodes.append(helper.make_node(softmax, [src], [dst], axis=-1))
            return
        if upcast:
            nodes.append(helper.make_node("Cast", [src], [src + "_f"], to=TensorProto.FLOAT))
            src = src + "_f"
        nodes.append(helper.make_node("Div", [src, "T"], [src + "_t"]))
        nodes.append(helper.make_node(softmax, [src + "_t"], [dst + "_f" if upcast else dst], axis=-1))
        if upcast:
            nodes.append(helper.make_node("Cast", [dst + "_f"], [dst], to=elem))

    if normalize:
        nodes.append(helper.make_node("TopK", ["logits", "K"], ["kept", "indices"], axis=-1))
        scaled_softmax("kept", "values")
        outputs = ["values", "indices"]
    else:
        scaled_softmax("logits", "probs")
        nodes.append(helper.make_node("TopK", ["probs", "K"], ["values", "indices"], axis=-1))
        outputs = ["values", "indices", "probs"]
    types = {"values": elem, "indices": TensorProto.INT64, "probs": elem}
    graph = helper.make_graph(
        nodes,
        "unfused",
        [helper.make_tensor_value_info("logits", elem, None)],
        [helper.make_tensor_value_info(name, types[name], None) for name in outputs],
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(_model(graph), options, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------ data


def make_row(kind: str, V: int, dtype, rng: np.random.Generator) -> np.ndarray:
    if kind == "constant":
        return np.full(V, 0.5, dtype=dtype)
    if kind == "ascending":  # every element enters a naive min-heap: its worst case
        return np.linspace(-8.0, 8.0, V).astype(dtype)
    if kind == "ninf_all":
        return np.full(V, -np.inf, dtype=dtype)
    row = (rng.standard_normal(V) * 3.0).astype(dtype)
    if kind == "spiky":
        row[rng.integers(V)] = 60.0 if dtype == np.float16 else 200.0
    elif kind == "wide":
        row = (row * 12.0).astype(dtype)
    elif kind == "nan":
        row[rng.integers(V)] = np.nan
    elif kind == "pinf":
        row[rng.integers(V)] = np.inf
    elif kind in OFFSETS:  # far from 0: the exp's offset c = fl(max * log2(e) / T) rounds coarsely
        center, spread = OFFSETS[kind] if dtype == np.float32 else (3.0e4, 3.0)
        row = (center + spread * rng.standard_normal(V)).astype(dtype)
    elif kind == "ninf_some":
        row[rng.random(V) < 0.5] = -np.inf
        row[rng.integers(V)] = 1.0  # at least one finite entry
    return row


def make_input(shape, kinds, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    V = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    data = np.stack([make_row(kinds[r % len(kinds)], V, dtype, rng) for r in range(rows)])
    return data.reshape(shape)


# ------------------------------------------------------------------ checks


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a, b, equal_nan=True)


def check(x, k, temperature=1.0, normalize=0, log_probs=0, threads=1):
    dtype = x.dtype.type
    values, indices, log_norm = fused_session(dtype, k, temperature, normalize, log_probs, threads).run(
        None, {"logits": x}
    )
    ref_v, ref_i, ref_ln = reference(x, k, temperature, normalize, bool(log_probs))
    ort_out = ort_session(dtype, k, temperature, normalize, log_probs).run(None, {"logits": x})
    ort_v, ort_i = ort_out[0], ort_out[1]

    assert values.dtype == x.dtype and values.shape == x.shape[:-1] + (k,)
    assert indices.dtype == np.int64 and indices.shape == x.shape[:-1] + (k,)
    assert log_norm.dtype == np.float32 and log_norm.shape == x.shape[:-1]

    # indices
    np.testing.assert_array_equal(indices, ref_i, err_msg="indices vs NumPy reference")
    if normalize:
        np.testing.assert_array_equal(indices, ort_i, err_msg="indices vs ORT TopK->Softmax")
    else:
        probs = ort_out[2]
        gathered = np.take_along_axis(probs, indices, axis=-1)
        assert _same(gathered, ort_v), "our indices are not a TopK of ORT's probability row"
        tied = np.zeros(ort_v.shape, dtype=bool)
        eq = ort_v[..., 1:] == ort_v[..., :-1]
        tied[..., 1:] |= eq
        tied[..., :-1] |= eq
        # The k-th kept value may tie with values that were not kept (probabilities that
        # underflow to 0 in float32 are all equal for ORT, distinct logits for us).
        tied |= ort_v == ort_v[..., -1:]
        untied = ~tied & ~np.isnan(ort_v)
        np.testing.assert_array_equal(indices[untied], ort_i[untied], err_msg="indices vs ORT where untied")
        all_nan = np.isnan(ort_v).all(axis=-1)
        np.testing.assert_array_equal(indices[all_nan], ort_i[all_nan], err_msg="NaN/Inf rows vs ORT")

    # values
    rtol, atol_p, atol_lp = TOL[dtype]
    atol = atol_lp if log_probs else atol_p
    v64 = values.astype(np.float64)
    # ORT's Div rounds x/T to float before the softmax: an exponent error of up to
    # 2^-24 |x/T|, i.e. a few 1e-7 relative at |x/T| ~ 20; allow for it when T != 1.
    ort_rtol = rtol if temperature == 1.0 or dtype == np.float16 else 4 * rtol
    if temperature != 1.0 and dtype == np.float32:
        # Both the kept logit and the row max carry that rounding: 2 * 2^-24 * max |x/T|
        # (the "wide" rows reach |x/T| ~ 170, i.e. 2e-5).
        finite = np.abs(x[np.isfinite(x)])
        if finite.size:
            ort_rtol = max(ort_rtol, 2 * 2.0**-24 * float(finite.max()) / temperature)
    # ORT's Softmax sums the row in float32: measured 1e-5 relative error against
    # float64 at V = 128256 (ours: 6e-8), so vs ORT the tolerance grows with V.
    if dtype == np.float32:
        ort_rtol = max(ort_rtol, 1e-10 * x.shape[-1])
    np.testing.assert_allclose(v64, ort_v.astype(np.float64), rtol=ort_rtol, atol=atol, err_msg="values vs ORT")
    np.testing.assert_allclose(v64, ref_v.astype(np.float64), rtol=rtol, atol=atol, err_msg="values vs reference")

    # log_normalizer
    np.testing.assert_allclose(log_norm, ref_ln, rtol=1e-6, atol=1e-6, err_msg="log_normalizer vs reference")
    return values, indices, log_norm


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("log_probs", [0, 1])
@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize(
    "V,k", [(2, 1), (2, 2), (7, 3), (100, 1), (100, 100), (1000, 50), (4099, 128), (4099, 129), (4099, 4099)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_mixed_rows(dtype, V, k, normalize, log_probs, temperature):
    """Shape [3, 5, V]: the 15 rows cycle through every data kind (NaN/Inf included)."""
    x = make_input((3, 5, V), KINDS, dtype, seed=V * 7 + k)
    check(x, k, temperature, normalize, log_probs)


@pytest.mark.parametrize("V", [8, 4096, 70000])
@pytest.mark.parametrize("center", [1.490006144e9, 2.1e9, -1.49e9, 3.0e7, 2.0e7, 2.9e6, -2.9e6, 2.91e6, -2.9101e6])
def test_rows_far_from_zero(center, V):
    """Constant and near-constant rows where the sweep's exp offset (the integer c
    nearest max log2(e) / T) passes 2^22 or is off by 1 or more (these take the exact
    path; -2.9101e6 gives an odd c past 2^22, where kRoundShifter - c would round), or
    stays just under 2^22 (|max| 2.9e6: the SIMD sweep). (T = 1: ORT's Div
    by another T rounds x / T at this magnitude and merges the two values.)"""
    x = np.full((2, V), center, dtype=np.float32)
    x[1, V // 3] = np.nextafter(x[1, V // 3], np.float32(np.inf))
    check(x, 1)
    check(x, 5)


@pytest.mark.parametrize("position", [0, 17, 5000])
@pytest.mark.parametrize("payload", [0x7FC00001, 0x7F800101, 0xFFC001FF])
def test_nan_payloads_poison_the_row(payload, position):
    """NaNs with low payload bits set (the exp's exponent add carries into them) are
    still NaNs: the row is poisoned as ORT's is, in any block."""
    x = make_input((2, 8192), ["normal"], np.float32, seed=3)
    x.view(np.uint32)[0, position] = payload
    check(x, 3)
    check(x, 3, normalize=1)


@pytest.mark.parametrize("normalize,log_probs", [(0, 0), (1, 1)])
@pytest.mark.parametrize("shape", [(1,), (2,), (1000,), (1, 2), (1, 1000)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_shapes(dtype, shape, normalize, log_probs):
    for k in sorted({1, shape[-1] // 2 or 1, shape[-1]}):
        check(make_input(shape, ["normal"], dtype, seed=k), k, 1.0, normalize, log_probs)


@pytest.mark.parametrize("normalize,log_probs,temperature", [(0, 0, 1.0), (0, 1, 0.8), (1, 0, 1.3)])
@pytest.mark.parametrize("kind", ["normal", "spiky", "ascending", "constant", "nan"])
@pytest.mark.parametrize("V,k", [(32000, 50), (128256, 50), (150000, 2000), (262144, 1), (262144, 262144)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_long_rows(dtype, V, k, kind, normalize, log_probs, temperature):
    """Batch 1 long rows: the row is split into chunks merged afterwards."""
    x = make_input((1, V), [kind], dtype, seed=V + k)
    check(x, k, temperature, normalize, log_probs)


@pytest.mark.parametrize("V,threads", [(40000, 1), (270000, 2)])  # 270000 on 2 threads: the row is split
@pytest.mark.parametrize("k", [1, 2, 50, 128])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_rising_rows_with_ties(dtype, k, V, threads):
    """Rows whose max rises in every block (sorted; a staircase whose equal values span
    blocks; sorted with a spike early on): k = 1 takes each block's first max, larger k
    a lower bound of the block's k-th largest. Ties must still go to the lower index,
    also across the chunks of a split row."""
    rng = np.random.default_rng(k)
    rows = [np.sort(rng.standard_normal(V) * 3.0),
            np.sort(rng.integers(0, 40, V)).astype(np.float64),
            np.concatenate([[9.0], np.sort(rng.standard_normal(V - 1))])]
    check(np.stack(rows).astype(dtype), k, threads=threads)


@pytest.mark.parametrize("shape,k", [((1, 262144), 50), ((1, 128256), 128256), ((3, 100000), 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_two_threads_match_one(dtype, shape, k):
    x = make_input(shape, ["normal", "ascending", "spiky"], dtype, seed=3)
    one = fused_session(dtype, k, threads=1).run(None, {"logits": x})
    two = fused_session(dtype, k, threads=2).run(None, {"logits": x})
    for a, b in zip(one, two):
        assert _same(a, b)
    check(x, k, threads=2)


def test_optional_log_normalizer_absent():
    x = make_input((4, 300), ["normal"], np.float32)
    values, indices = fused_session(np.float32, 5, with_norm=False).run(None, {"logits": x})
    ref_v, ref_i, _ = reference(x, 5)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(values, ref_v, rtol=1e-6, atol=1e-7)


def test_empty_batch():
    x = np.zeros((0, 10), dtype=np.float32)
    values, indices, log_norm = fused_session(np.float32, 3).run(None, {"logits": x})
    assert values.shape == (0, 3) and indices.shape == (0, 3) and log_norm.shape == (0,)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "shape,k,temperature,expect",
    [
        ((2, 5), 6, 1.0, "1 <= k <= 5"),
        ((2, 5), 0, 1.0, "1 <= k <= 5"),
        ((3,), -1, 1.0, "1 <= k <= 3"),
        ((), 1, 1.0, "rank >= 1"),
        ((2, 0), 1, 1.0, "non-empty last axis"),
    ],
    ids=["k>V", "k=0", "k<0", "rank0", "emptyV"],
)
def test_invalid_input_is_an_error(shape, k, temperature, expect):
    x = np.ones(shape, dtype=np.float32)
    session = fused_session(np.float32, k, temperature)
    with pytest.raises(Exception) as info:
        session.run(None, {"logits": x})
    message = str(info.value)
    shape_text = "[" + ",".join(str(d) for d in shape) + "]"
    assert "logits" in message and shape_text in message and expect in message, message


def _node_session(**attrs):
    node = helper.make_node("FusedSoftmaxTopK", ["logits"], ["v", "i"], domain=ops.DOMAIN, name="head", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("i", TensorProto.INT64, None)])
    return ort.InferenceSession(_model(graph), _options(1), providers=["CPUExecutionProvider"])


def test_attributes_are_read_whatever_their_type():
    """ORT reads attributes by type: `temperature=2` (an int attribute) used to run at the
    default 1.0, and `k=2.0` said k was missing. An int float attribute is now taken as
    its value; a float int attribute and a bad temperature are refused when the session
    is created, naming the node and the attribute."""
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    as_int = _node_session(k=4, temperature=2).run(None, {"logits": x})
    as_float = _node_session(k=4, temperature=2.0).run(None, {"logits": x})
    for a, b in zip(as_int, as_float):
        np.testing.assert_array_equal(a, b)
    p = np.exp(x.astype(np.float64) / 2 - (x / 2).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(as_int[0], -np.sort(-p, -1)[:, :4], rtol=1e-6)  # softmax(x / 2), fp32
    for attrs, fragment in (({"k": 2.0}, "attribute 'k' must be an integer, got the float 2.0"),
                            ({"k": 2, "temperature": 0.0}, "attribute 'temperature' must be finite and > 0"),
                            ({"k": 2, "temperature": -1.0}, "attribute 'temperature' must be finite and > 0"),
                            ({"k": 2, "temperature": float("inf")}, "attribute 'temperature' must be finite"),
                            ({"k": 2, "temperature": 1e-45}, "1/temperature finite")):
        with pytest.raises(Exception) as info:
            _node_session(**attrs)
        assert "node 'head'" in str(info.value) and fragment in str(info.value), str(info.value)


def test_missing_k_attribute_is_an_error():
    node = helper.make_node("FusedSoftmaxTopK", ["logits"], ["v", "i"], domain=ops.DOMAIN)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("i", TensorProto.INT64, None)],
    )
    with pytest.raises(Exception, match="'k'"):
        session = ort.InferenceSession(_model(graph), _options(), providers=["CPUExecutionProvider"])
        session.run(None, {"logits": np.ones((2, 3), np.float32)})


# ------------------------------------------------------------------ library


def test_library_api_version_fits_runtime():
    assert ops.min_ort_api_version() <= ops.ort_api_version(ort.__version__)
    assert ops.min_ort_api_version() == 17
    assert ops.ort_api_version("1.17.3") == 17 and ops.ort_api_version("1.32.0.dev20250101") == 32
    assert ops.library_version()


def test_missing_library_raises(monkeypatch, tmp_path):
    monkeypatch.setenv(ops.LIBRARY_ENV_VAR, str(tmp_path / "nope" / "libtoolkit_ops.so"))
    with pytest.raises(OpLibraryError, match="TOOLKIT_OPS_LIBRARY"):
        ops.session_options()


def test_too_old_runtime_raises(monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.16.3")
    with pytest.raises(OpLibraryError, match=r"onnxruntime>=1\.17"):
        ops.session_options()


# ------------------------------------------------------------------ property


@st.composite
def _cases(draw):
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    lead = draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
    V = draw(st.integers(1, 300))
    k = draw(st.integers(1, V))
    seed = draw(st.integers(0, 2**31))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=4))
    ints = draw(st.booleans())  # small integers: many exact ties
    temperature = draw(st.sampled_from([1.0, 0.5, 2.0, 0.05]))
    normalize = draw(st.integers(0, 1))
    log_probs = draw(st.integers(0, 1))
    x = make_input(lead + (V,), kinds, dtype, seed)
    if ints:
        x = np.round(x / 3.0).astype(dtype)
    return x, k, temperature, normalize, log_probs


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_property_matches_reference(case):
    x, k, temperature, normalize, log_probs = case
    values, indices, log_norm = fused_session(x.dtype.type, k, temperature, normalize, log_probs).run(
        None, {"logits": x}
    )
    ref_v, ref_i, ref_ln = reference(x, k, temperature, normalize, bool(log_probs))
    rtol, atol_p, atol_lp = TOL[x.dtype.type]
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(
        values.astype(np.float64), ref_v.astype(np.float64), rtol=rtol, atol=atol_lp if log_probs else atol_p
    )
    np.testing.assert_allclose(log_norm, ref_ln, rtol=1e-6, atol=1e-6)


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
@pytest.mark.parametrize("normalize,log_probs", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize(
    "shape,k", [((4, 7), 3), ((3, 1000), 1000), ((2, 128256), 50), ((1, 32000), 4096), ((15, 300), 17)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_cuda_kernel_matches_reference(dtype, shape, k, normalize, log_probs):
    x = make_input(shape, KINDS if shape[0] >= 8 else ["normal", "spiky", "constant"], dtype, seed=11)
    _check_cuda(x, k, normalize, log_probs)


# Long rows at small batch take the split path (a row over several blocks, then a
# merge; normalize = 0, k <= 1024): ties across chunk borders, poisoned rows.
@pytest.mark.gpu
@pytest.mark.parametrize("log_probs", [0, 1])
@pytest.mark.parametrize("shape,k,kinds", [
    ((1, 262144), 1, ["normal"]),
    ((2, 128256), 256, ["ascending", "constant"]),
    ((4, 100000), 50, ["nan", "pinf", "ninf_some", "ninf_all"]),
    ((3, 151936), 1024, ["spiky", "wide", "edge"]),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_cuda_split_rows_match_reference(dtype, shape, k, kinds, log_probs):
    _check_cuda(make_input(shape, kinds, dtype, seed=12), k, 0, log_probs)


def _check_cuda(x, k, normalize, log_probs):
    """toolkit_softmax_topk_cuda on x (device copy) against the NumPy reference."""
    torch = _cuda_torch()
    lib = ctypes.CDLL(str(ops.library_path()))
    fn = lib.toolkit_softmax_topk_cuda
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                   ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    dtype = x.dtype.type
    rows, V = x.shape
    tdtype = torch.float16 if dtype == np.float16 else torch.float32
    xt = torch.from_numpy(x).cuda()
    vt = torch.empty((rows, k), dtype=tdtype, device="cuda")
    it = torch.empty((rows, k), dtype=torch.int64, device="cuda")
    lt = torch.empty((rows,), dtype=torch.float32, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    err = fn(xt.data_ptr(), int(dtype == np.float16), rows, V, k, 0.9, normalize, log_probs,
             vt.data_ptr(), it.data_ptr(), lt.data_ptr(), stream)
    torch.cuda.synchronize()
    assert err == 0, f"cudaError {err}"
    assert_cuda_outputs(x, k, 0.9, normalize, log_probs, vt.cpu().numpy(), it.cpu().numpy(), lt.cpu().numpy())


def assert_cuda_outputs(x, k, temperature, normalize, log_probs, values, indices, log_norm):
    """A CUDA kernel's outputs (on the device or under tests/cuda_sim) against the NumPy reference."""
    ref_v, ref_i, ref_ln = reference(x, k, temperature, normalize, bool(log_probs))
    np.testing.assert_array_equal(indices, ref_i)
    rtol = 1e-3 if x.dtype == np.float16 else 2e-5  # GPU expf/logf, float sums
    np.testing.assert_allclose(values.astype(np.float64), ref_v.astype(np.float64), rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(log_norm, ref_ln, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("TOOLKIT_OPS_LIBRARY") is not None, reason="explicit library under test")
def test_library_path_prefers_existing_build():
    assert ops.library_path().name == "libtoolkit_ops.so"
