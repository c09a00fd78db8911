"""``toolkit bench topk``: FusedSoftmaxTopK vs ONNX Runtime's Softmax→TopK and TopK.

Contenders, interleaved in one process on the same input:

* ``fused``: our ``com.toolkit::FusedSoftmaxTopK`` (one pass over the row);
* ``ort_softmax_topk``: ONNX Runtime's Softmax(axis=-1) → TopK, the exported form;
* ``ort_topk``: ONNX Runtime's TopK alone (no softmax at all: a lower bound ORT sets);
* ``ort_reducemax`` and ``numpy_max``: one vectorised read of the logits each; the
  faster of the two is ``floor_us``, the single-read floor measured in the same run
  (on some hosts NumPy's is 2x faster than ORT's).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from toolkit.bench import SESSION_SETTINGS, CacheFlusher, host_info, interleaved, session_options

DEFAULT_VOCABS = (32000, 128256, 151936)
DEFAULT_BATCHES = (1, 8, 64)
DEFAULT_KS = (1, 50)
DEFAULT_THREADS = (1, 2)
TARGET_RATIO = 5.0          # >= 5x faster than ORT Softmax->TopK at V >= 128k
TARGET_FLOOR_FACTOR = 3.0   # within 3x of the single-read floor


def _models(vocab: int, batch: int, k: int) -> dict[str, Any]:
    from onnx import TensorProto, helper

    from toolkit.ops import DOMAIN, OPSET_VERSION

    x = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, vocab])
    vals = helper.make_tensor_value_info("values", TensorProto.FLOAT, [batch, k])
    idx = helper.make_tensor_value_info("indices", TensorProto.INT64, [batch, k])
    kconst = helper.make_tensor("k", TensorProto.INT64, [1], [k])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)]

    def model(nodes, outputs, inits=()):
        g = helper.make_graph(nodes, "bench", [x], outputs, initializer=list(inits))
        m = helper.make_model(g, opset_imports=opsets)
        m.ir_version = 10
        return m.SerializeToString()

    red = helper.make_tensor_value_info("max", TensorProto.FLOAT, [batch])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
    return {
        "fused": model([helper.make_node("FusedSoftmaxTopK", ["logits"], ["values", "indices"], domain=DOMAIN,
                                         k=k)], [vals, idx]),
        "ort_softmax_topk": model([helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
                                   helper.make_node("TopK", ["p", "k"], ["values", "indices"], axis=-1)],
                                  [vals, idx], [kconst]),
        "ort_topk": model([helper.make_node("TopK", ["logits", "k"], ["values", "indices"], axis=-1)],
                          [vals, idx], [kconst]),
        "ort_reducemax": model([helper.make_node("ReduceMax", ["logits", "axes"], ["max"], keepdims=0)], [red], [axes]),
    }


def _bound_runner(session: Any, x: np.ndarray) -> Any:
    import onnxruntime as ort

    binding = session.io_binding()
    binding.bind_ortvalue_input("logits", ort.OrtValue.ortvalue_from_numpy(x))
    keep = []
    for out in session.get_outputs():
        shape = [d if isinstance(d, int) else 1 for d in out.shape]
        dtype = np.int64 if out.type == "tensor(int64)" else np.float32
        ov = ort.OrtValue.ortvalue_from_numpy(np.empty(shape, dtype))
        keep.append(ov)
        binding.bind_ortvalue_output(out.name, ov)
    binding.synchronize_inputs()

    def run() -> None:
        session.run_with_iobinding(binding)

    run.keep = keep  # outputs must outlive the binding
    return run


DATA = {
    "normal": "i.i.d. N(0, 2^2) logits",
    "peaked": "LM-like: -1.1 log(Zipf rank) over a random permutation of the vocabulary, plus N(0, 0.5^2)",
    "ascending": "each row sorted ascending: the running maximum rises in every block (the kernel's worst case)",
    "large": "N(0, 2^2) x 1e7: exponents out of the fast path's range, the exact scalar path",
}


def make_logits(rng: np.random.Generator, batch: int, vocab: int, data: str = "normal") -> np.ndarray:
    """Logits of one benchmark point, by the distribution ``data`` (see DATA)."""
    x = 2.0 * rng.standard_normal((batch, vocab))
    if data == "peaked":
        ranks = np.argsort(rng.random((batch, vocab)), axis=1) + 1.0
        x = -1.1 * np.log(ranks) + 0.5 * rng.standard_normal((batch, vocab))
    elif data == "ascending":
        x = np.sort(x, axis=1)
    elif data == "large":
        x = x * 1e7
    elif data != "normal":
        raise ValueError(f"unknown data {data!r}: one of {', '.join(DATA)}")
    return x.astype(np.float32)


def run(vocabs=DEFAULT_VOCABS, batches=DEFAULT_BATCHES, ks=DEFAULT_KS, threads=DEFAULT_THREADS,
        warmup: int = 30, runs: int = 300, cold: bool = False, seed: int = 0, progress=None,
        data: str = "normal") -> dict[str, Any]:
    """Run the grid and return a JSON-able result."""
    import onnxruntime as ort

    from toolkit.ops.reference import softmax_topk

    rng = np.random.default_rng(seed)
    flusher = CacheFlusher() if cold else None
    results = []
    grid = list(itertools.product(vocabs, batches, ks, threads))
    for i, (vocab, batch, k, nthreads) in enumerate(grid):
        x = make_logits(rng, batch, vocab, data)
        contenders = {}
        sessions = {}
        for name, blob in _models(vocab, batch, k).items():
            sessions[name] = ort.InferenceSession(blob, session_options(nthreads), providers=["CPUExecutionProvider"])
            contenders[name] = _bound_runner(sessions[name], x)
        contenders["numpy_max"] = lambda x=x: x.max(axis=-1)
        # Correctness guard: a fast wrong kernel must not produce a number. Against the
        # float64 reference (ORT's float32 Softmax is itself up to ~2e-5 off on peaked rows).
        got = sessions["fused"].run(None, {"logits": x})
        ref_v, ref_i, _ = softmax_topk(x, k)
        if not np.array_equal(got[1], ref_i) or not np.allclose(got[0], ref_v, rtol=1e-5, atol=1e-7):
            raise AssertionError(f"FusedSoftmaxTopK disagrees with the reference at V={vocab} B={batch} k={k}")
        t = interleaved(contenders, warmup=warmup, runs=runs, between=flusher)
        fused = t["fused"].median_us
        floor = min(t["ort_reducemax"].median_us, t["numpy_max"].median_us)
        row = {
            "vocab": vocab, "batch": batch, "k": k, "threads": nthreads,
            "bytes_read": 4 * vocab * batch,
            **{name: dataclasses.asdict(tm) for name, tm in t.items()},
            "speedup_vs_ort_softmax_topk": t["ort_softmax_topk"].median_us / fused,
            "speedup_vs_ort_topk": t["ort_topk"].median_us / fused,
            "floor_us": floor,
            "fused_over_floor": fused / floor,
            "floor_gbps": 4 * vocab * batch / (floor * 1e3),
        }
        if vocab >= 128000:
            row["meets_target"] = bool(row["speedup_vs_ort_softmax_topk"] >= TARGET_RATIO
                                       and row["fused_over_floor"] <= TARGET_FLOOR_FACTOR)
        results.append(row)
        if progress:
            progress(i + 1, len(grid), row)
    return {
        "benchmark": "topk",
        "host": host_info(),
        "data": {"name": data, "logits": DATA[data]},
        "protocol": {"interleaved": True, "session": SESSION_SETTINGS, "iobinding": True, "warmup": warmup, "runs": runs,
                     "cache": "cold (64 MiB touched before each run)" if cold else "hot",
                     "statistic": "median and p90 of per-call wall time, includes ORT Run() overhead",
                     "floor_us": "min(ort_reducemax, numpy_max): one read of the logits over the last axis"},
        "targets": {"speedup_vs_ort_softmax_topk_min": TARGET_RATIO, "fused_over_floor_max": TARGET_FLOOR_FACTOR,
                    "applies_to": "vocab >= 128000"},
        "results": results,
    }
