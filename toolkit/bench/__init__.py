"""Benchmarks of the custom operators against ONNX Runtime's own ops.

Protocol (shared/ENVIRONMENT.md): every contender runs in one process,
interleaved (ABAB...) so that frequency scaling and noisy neighbours hit all of
them alike; IOBinding with preallocated outputs; >= 30 warm-ups and >= 300 timed
runs; median and p90; ratio = ORT / ours; a bandwidth floor measured in the same
run. Results are JSON.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass
class Timing:
    median_us: float
    p90_us: float
    min_us: float
    runs: int


def _stats(samples_ns: list[int]) -> Timing:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return Timing(median_us=float(np.median(a)), p90_us=float(np.percentile(a, 90)), min_us=float(a.min()),
                  runs=len(a))


def interleaved(contenders: dict[str, Callable[[], Any]], warmup: int = 30, runs: int = 300,
                between: Callable[[], Any] | None = None) -> dict[str, Timing]:
    """Time each callable ``runs`` times, round-robin, after ``warmup`` rounds.

    Args:
        contenders: name -> zero-argument callable (one run of one contender).
        between: called before every timed call and not timed (e.g. evict caches).
    """
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    samples: dict[str, list[int]] = {n: [] for n in names}
    for _ in range(runs):
        for n in names:
            if between is not None:
                between()
            t0 = time.perf_counter_ns()
            contenders[n]()
            samples[n].append(time.perf_counter_ns() - t0)
    return {n: _stats(s) for n, s in samples.items()}


def host_info() -> dict[str, Any]:
    import os

    import onnxruntime as ort

    info = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__, "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


class CacheFlusher:
    """Touches a buffer larger than the last-level cache, to measure cold-cache runs."""

    def __init__(self, nbytes: int = 64 << 20) -> None:
        self.buf = np.ones(nbytes // 8, dtype=np.float64)

    def __call__(self) -> None:
        self.buf += 1.0


def session_options(threads: int):
    """Session options of every timed session: the op library, ``threads`` intra-op
    threads, one inter-op thread, full graph optimisation, and **no spinning**.

    Benchmarks interleave several sessions (ABAB); with ORT's default spin-wait, the
    pool of the session that just ran keeps its threads spinning and steals the cores
    of the next one, which made every 2-thread point on a 2-core machine several times
    slower than 1 thread, for ORT's ops and ours alike.
    """
    import onnxruntime as ort

    from toolkit import ops

    so = ops.session_options(threads=threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so

