"""Benchmarks of the custom operators against ONNX Runtime's own ops.

Protocol (shared/ENVIRONMENT.md): every contender runs in one process,
interleaved (ABAB...) so that frequency scaling and noisy neighbours hit all of
them alike; IOBinding with preallocated outputs; >= 30 warm-ups and >= 300 timed
runs; median and p90; ratio = ORT / ours; a bandwidth floor measured in the same
run. Results are JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
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

    The order rotates by one contender every round, so none always runs right after the
    same other one (whose cache footprint or thread wake-ups it would inherit).

    Args:
        contenders: name -> zero-argument callable (one run of one contender).
        between: called before every timed call and not timed (e.g. evict caches).
    """
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    samples: dict[str, list[int]] = {n: [] for n in names}
    for r in range(runs):
        shift = r % len(names) if names else 0
        for n in names[shift:] + names[:shift]:
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
            "onnxruntime": ort.__version__, "python": platform.python_version(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "toolkit_commit": _commit(), **_library()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def _commit() -> str | None:
    """The toolkit checkout's commit (``+dirty`` with uncommitted changes), or None outside git."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _library() -> dict[str, str | None]:
    """The op library timed: its path and sha256 (None when it cannot be found)."""
    import hashlib

    from toolkit import ops
    from toolkit.errors import OpLibraryError

    try:
        path = ops.library_path()
    except OpLibraryError:
        return {"op_library": None, "op_library_sha256": None}
    with open(path, "rb") as f:
        return {"op_library": str(path), "op_library_sha256": hashlib.sha256(f.read()).hexdigest()}


class CacheFlusher:
    """Touches a buffer larger than the last-level cache, to measure cold-cache runs."""

    def __init__(self, nbytes: int = 64 << 20) -> None:
        self.buf = np.ones(nbytes // 8, dtype=np.float64)

    def __call__(self) -> None:
        self.buf += 1.0


# What session_options sets, for the JSON of the benchmarks that use it (decode-head and
# the end-to-end decode run toolkit's own sessions, with ORT's defaults).
SESSION_SETTINGS = {"graph_optimization_level": "ORT_ENABLE_ALL", "inter_op_threads": 1,
                    "intra_op_allow_spinning": False}


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

