"""One session run from several threads, and several sessions at once, give the
results of single-threaded runs: the kernels keep no shared mutable state."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from toolkit import ops


def _session(op: str, k: int, threads: int = 1, **attrs):
    outputs = ["a", "b"]
    node = helper.make_node(op, ["logits"], outputs, domain=ops.DOMAIN, k=k, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [helper.make_empty_tensor_value_info(o) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), ops.session_options(threads),
                                providers=["CPUExecutionProvider"])


def _inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    # batch 1 long rows (the row-split path) and batches of short rows
    return [(3 * rng.standard_normal((1 if i % 2 else 7, 70000 if i % 2 else 3000))).astype(np.float32)
            for i in range(n)]


def test_one_session_many_threads_matches_serial():
    xs = _inputs(24)
    for op, attrs in (("FusedSoftmaxTopK", {}), ("SampleTopKTopP", {"top_p": 0.9, "seed": 3})):
        sess = _session(op, 40, threads=2, **attrs)
        serial = [sess.run(None, {"logits": x}) for x in xs]
        with ThreadPoolExecutor(max_workers=6) as pool:
            for _ in range(3):
                parallel = list(pool.map(lambda x: sess.run(None, {"logits": x}), xs))
                for want, got in zip(serial, parallel):
                    for a, b in zip(want, got):
                        np.testing.assert_array_equal(a, b)


def test_several_sessions_at_once_match_serial():
    xs = _inputs(12)
    sessions = [_session("FusedSoftmaxTopK", k, threads=1) for k in (1, 17, 64)]
    serial = {(i, j): s.run(None, {"logits": x}) for i, s in enumerate(sessions) for j, x in enumerate(xs)}
    jobs = [(i, j) for i in range(len(sessions)) for j in range(len(xs))] * 2
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda ij: (ij, sessions[ij[0]].run(None, {"logits": xs[ij[1]]})), jobs))
    for ij, got in results:
        for a, b in zip(serial[ij], got):
            np.testing.assert_array_equal(a, b)
