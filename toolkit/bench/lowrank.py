"""``toolkit bench lowrank``: LowRankMatMul vs ONNX Runtime's dense and factored MatMuls.

Contenders, interleaved (ABAB...) in one process on the same input ``x [M, K]``:

* ``ours``: ``com.toolkit::LowRankMatMul(x, U, V)`` with ``U [K, r]``, ``V [r, N]``;
* ``ort_two_matmul``: ONNX Runtime ``MatMul(MatMul(x, U), V)`` with the same weights
  (what the ``low-rank`` pass would emit without the op library);
* ``ort_dense``: ONNX Runtime ``MatMul(x, W)``, ``W [K, N]``: the unfactored layer.

Weights are constant initializers (so ONNX Runtime may pre-pack them, as it does in
a deployed model), and each contender cycles through several independent weight
sets totalling at least ``rotate_bytes`` (default 96 MiB, above the 32 MiB L3 of the
machines used here): every call reads its weights from DRAM, as a decode step does
for a layer whose weights were evicted by the other layers. Outputs are bound
with IOBinding to preallocated buffers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

from toolkit.bench import SESSION_SETTINGS, host_info, interleaved
from toolkit.bench import session_options as bench_session_options

DEFAULT_SHAPES = ((4096, 4096), (4096, 11008))
# At most this many weight sets (one ORT session each) per contender: small layers
# would need thousands to fill rotate_bytes (64x64 at rank 8: about 20,000 sessions,
# minutes and gigabytes). A capped point holds fewer bytes than rotate_bytes, so its
# weights may stay in cache; its row says so ("weights_cold": false).
MAX_WEIGHT_SETS = 64
DEFAULT_RANKS = (512, 1024, 2048)
DEFAULT_ROWS = (1, 8, 128)
DEFAULT_THREADS = (1, 2)
BIG_ROWS = 128            # points with M >= this use the reduced run counts below
TARGET_VS_DENSE_M1 = 1.8  # at r = d/4 and M = 1: ours >= 1.8x faster than ORT dense
TARGET_VS_TWO_MATMUL = 1.0  # and never slower than ORT's two MatMuls


def _model(nodes: list, weights: dict[str, np.ndarray], M: int, K: int, N: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    from toolkit.ops import DOMAIN, OPSET_VERSION

    graph = helper.make_graph(
        nodes, "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
        initializer=[numpy_helper.from_array(w, name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    model.ir_version = 10
    return model.SerializeToString()


def _contender_models(U: np.ndarray, V: np.ndarray, W: np.ndarray | None, M: int) -> dict[str, bytes]:
    from onnx import helper

    from toolkit.ops import DOMAIN

    K, N = U.shape[0], V.shape[1]
    models = {
        "ours": _model([helper.make_node("LowRankMatMul", ["x", "U", "V"], ["y"], domain=DOMAIN)],
                       {"U": U, "V": V}, M, K, N),
        "ort_two_matmul": _model([helper.make_node("MatMul", ["x", "U"], ["t"]),
                                  helper.make_node("MatMul", ["t", "V"], ["y"])], {"U": U, "V": V}, M, K, N),
    }
    if W is not None:
        models["ort_dense"] = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": W}, M, K, N)
    return models


def _int8_models(U: np.ndarray, V: np.ndarray, M: int) -> dict[str, bytes]:
    """int8 factors (per-column scales): our op, and ONNX Runtime's own int8-weight path
    (DequantizeLinear -> MatMul, which its optimizer turns into MatMulNBits)."""
    from onnx import helper

    from toolkit.ops import DOMAIN
    from toolkit.ops.reference import quantize_columns

    (uq, us), (vq, vs) = quantize_columns(U), quantize_columns(V)
    w = {"U": uq, "V": vq, "us": us, "vs": vs}
    K, N = U.shape[0], V.shape[1]
    return {
        "ours_int8": _model([helper.make_node("LowRankMatMul", ["x", "U", "V", "", "us", "vs"], ["y"],
                                              domain=DOMAIN)], w, M, K, N),
        "ort_int8_two_matmul": _model([helper.make_node("DequantizeLinear", ["U", "us"], ["u"], axis=1),
                                       helper.make_node("DequantizeLinear", ["V", "vs"], ["v"], axis=1),
                                       helper.make_node("MatMul", ["x", "u"], ["t"]),
                                       helper.make_node("MatMul", ["t", "v"], ["y"])], w, M, K, N),
    }


def _bound(session: Any, x: np.ndarray, N: int) -> tuple[Any, Any]:
    import onnxruntime as ort

    binding = session.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x))
    out = ort.OrtValue.ortvalue_from_numpy(np.empty((x.shape[0], N), np.float32))
    binding.bind_ortvalue_output("y", out)
    binding.synchronize_inputs()
    return binding, out


def _rotating_runner(sessions: list, bindings: list) -> Any:
    state = {"i": 0}

    def run() -> None:
        i = state["i"]
        state["i"] = (i + 1) % len(sessions)
        sessions[i].run_with_iobinding(bindings[i][0])

    return run


def run(shapes=DEFAULT_SHAPES, ranks=DEFAULT_RANKS, rows=DEFAULT_ROWS, threads=DEFAULT_THREADS,
        warmup: int = 30, runs: int = 300, warmup_big: int = 5, runs_big: int = 30,
        rotate_bytes: int = 96 << 20, seed: int = 0, int8: bool = False, progress=None) -> dict[str, Any]:
    """Run the grid and return a JSON-able result.

    Args:
        shapes: ``(K, N)`` of the dense layer.
        ranks: factorisation ranks r.
        rows: M, the rows of x (1 = one decode token).
        threads: ONNX Runtime intra-op thread counts.
        warmup, runs: rounds for points with M < BIG_ROWS.
        warmup_big, runs_big: rounds for M >= BIG_ROWS (each call is 10-500 ms on 2 cores).
        rotate_bytes: minimum bytes of weight sets each contender cycles through.
        int8: also time int8 factors: ours vs ORT's DequantizeLinear->MatMul (MatMulNBits).
    """
    import onnxruntime as ort


    rng = np.random.default_rng(seed)
    results = []
    grid = list(itertools.product(shapes, ranks, rows, threads))
    for i, ((K, N), r, M, nthreads) in enumerate(grid):
        dense_bytes, factored_bytes = 4 * K * N, 4 * r * (K + N)
        sets = min(MAX_WEIGHT_SETS, max(2, math.ceil(rotate_bytes / factored_bytes)))
        dense_sets = min(MAX_WEIGHT_SETS, max(2, math.ceil(rotate_bytes / dense_bytes)))
        x = rng.standard_normal((M, K)).astype(np.float32)
        sessions: dict[str, list] = {"ours": [], "ort_two_matmul": [], "ort_dense": []}
        int8_bytes = r * (K + N) + 4 * (r + N)
        sets8 = min(MAX_WEIGHT_SETS, max(2, math.ceil(rotate_bytes / int8_bytes))) if int8 else 0
        if int8:
            sessions.update(ours_int8=[], ort_int8_two_matmul=[])
        for s in range(max(sets, sets8)):
            U = (rng.standard_normal((K, r)) / math.sqrt(K)).astype(np.float32)
            V = (rng.standard_normal((r, N)) / math.sqrt(r)).astype(np.float32)
            models = {}
            if s < sets:
                # The dense contender needs fewer sets (its weights are bigger); W = U V of
                # the first sets keeps the correctness check below meaningful.
                W = (U @ V).astype(np.float32) if s < dense_sets else None
                models.update(_contender_models(U, V, W, M))
                del W
            if s < sets8:  # int8 weights are 4x smaller: more sets
                models.update(_int8_models(U, V, M))
            for name, blob in models.items():
                sessions[name].append(ort.InferenceSession(blob, bench_session_options(nthreads),
                                                           providers=["CPUExecutionProvider"]))
            del U, V, models
        # Correctness guard on set 0: a fast wrong kernel must not produce a number.
        got = sessions["ours"][0].run(None, {"x": x})[0]
        ref = sessions["ort_two_matmul"][0].run(None, {"x": x})[0]
        dense = sessions["ort_dense"][0].run(None, {"x": x})[0]
        scale = float(np.abs(ref).max())
        if not (np.allclose(got, ref, rtol=1e-4, atol=1e-4 * scale) and np.allclose(got, dense, rtol=1e-3,
                                                                                        atol=1e-3 * scale)):
            raise AssertionError(f"LowRankMatMul disagrees with ORT at K={K} N={N} r={r} M={M}")
        if int8:  # int8 factors: within the quantization error of the float ones (ORT's MatMulNBits
            # at its default accuracy level also quantizes x, hence the looser bound there)
            for name, bound in (("ours_int8", 0.02), ("ort_int8_two_matmul", 0.05)):
                y8 = sessions[name][0].run(None, {"x": x})[0]
                rel = float(np.linalg.norm(y8 - ref) / np.linalg.norm(ref))
                if not rel < bound:
                    raise AssertionError(f"{name} is {rel:.3g} away from the float factors at K={K} N={N} r={r}")
        contenders = {}
        bindings = {}
        for name, sess in sessions.items():
            bindings[name] = [_bound(s, x, N) for s in sess]
            contenders[name] = _rotating_runner(sess, bindings[name])
        big = M >= BIG_ROWS
        t = interleaved(contenders, warmup=warmup_big if big else warmup, runs=runs_big if big else runs)
        ours = t["ours"].median_us
        row = {
            "K": K, "N": N, "r": r, "M": M, "threads": nthreads,
            "r_over_d": r / min(K, N),
            "weight_sets": {"factored": sets, "dense": dense_sets},
            "weights_cold": sets * factored_bytes >= rotate_bytes and dense_sets * dense_bytes >= rotate_bytes
            and (not int8 or sets8 * int8_bytes >= rotate_bytes),
            "weight_bytes": {"dense": dense_bytes, "factored": factored_bytes},
            "flops": {"dense": 2 * M * K * N, "factored": 2 * M * r * (K + N)},
            "warmup": warmup_big if big else warmup, "runs": runs_big if big else runs,
            **{name: dataclasses.asdict(tm) for name, tm in t.items()},
            "speedup_vs_ort_dense": t["ort_dense"].median_us / ours,
            "speedup_vs_ort_two_matmul": t["ort_two_matmul"].median_us / ours,
            "ours_weight_gbps": factored_bytes / (ours * 1e3),
        }
        if int8:
            row["weight_sets"]["int8"] = sets8
            row["int8_speedup_vs_ort_int8_two_matmul"] = t["ort_int8_two_matmul"].median_us / t["ours_int8"].median_us
            row["int8_speedup_vs_ort_dense"] = t["ort_dense"].median_us / t["ours_int8"].median_us
            # ORT's int8 path (MatMulNBits) is slower than its float32 MatMul -> MatMul at large M:
            # the fastest way ORT applies the same factors, whatever their storage
            fastest = min(("ort_int8_two_matmul", "ort_two_matmul"), key=lambda n: t[n].median_us)
            row["int8_fastest_ort_factors"] = fastest
            row["int8_speedup_vs_fastest_ort_factors"] = t[fastest].median_us / t["ours_int8"].median_us
        if r * 4 == min(K, N):
            checks = {"not_slower_than_two_matmul": bool(row["speedup_vs_ort_two_matmul"] >= TARGET_VS_TWO_MATMUL)}
            if M == 1:
                checks["vs_dense_m1"] = bool(row["speedup_vs_ort_dense"] >= TARGET_VS_DENSE_M1)
            row["meets_target"] = all(checks.values())
            row["target_checks"] = checks
        results.append(row)
        del sessions, contenders, bindings
        if progress:
            progress(i + 1, len(grid), row)
    return {
        "benchmark": "lowrank",
        "host": host_info(),
        "protocol": {
            "interleaved": True, "session": SESSION_SETTINGS, "iobinding": True,
            "warmup": warmup, "runs": runs,
            "warmup_big": warmup_big, "runs_big": runs_big,
            "big_points": f"M >= {BIG_ROWS} use warmup_big/runs_big (each call takes 10-500 ms on this host)",
            "cache": (f"weights cold: each contender cycles through >= 2 weight sets of >= {rotate_bytes >> 20} "
                      f"MiB in total (constant initializers, one session per set), at most {MAX_WEIGHT_SETS} sets: "
                      "a point whose layers are too small for that says weights_cold false; x hot"),
            "statistic": "median and p90 of per-call wall time, includes ORT Run() overhead",
            "pinning": "none (OS scheduling); ORT intra-op threads as listed, inter-op 1",
        },
        "targets": {"speedup_vs_ort_dense_min_at_M1": TARGET_VS_DENSE_M1,
                    "speedup_vs_ort_two_matmul_min": TARGET_VS_TWO_MATMUL,
                    "applies_to": "r = min(K, N) / 4"},
        "results": results,
    }
