"""Builds the CUDA simulation library: this project's .cu kernels compiled as host C++.

The sources are copied with two mechanical rewrites that C++ cannot express with
macros: ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
``cuda_sim::Launch(grid, block, smem, stream)(kernel, args)``, and
``extern __shared__ T name[];`` becomes a pointer to the block's dynamic shared
memory. Everything else (``__syncthreads``, warp shuffles, ballots, atomics, the
runtime calls) comes from the stand-in headers in ``include/``.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
SIM = pathlib.Path(__file__).resolve().parent
SOURCES = sorted((ROOT / "custom_ops").glob("*/*.cu"))
LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:<[^<>();]*>)?)<<<(.*?)>>>\(")
DYNAMIC_SMEM = re.compile(r"extern __shared__ (\w+) (\w+)\[\];")


def rewrite(text: str) -> str:
    text = LAUNCH.sub(lambda m: f"cuda_sim::Launch({m.group(2)})({m.group(1)}, ", text)
    return DYNAMIC_SMEM.sub(lambda m: f"{m.group(1)}* {m.group(2)} = cuda_sim::DynamicSmem<{m.group(1)}>();", text)


def ort_include() -> pathlib.Path:
    """The ONNX Runtime C headers the op library was built with (its CMake cache first)."""
    candidates = []
    for cache in sorted((ROOT / "build").glob("*/CMakeCache.txt")):
        for line in cache.read_text(errors="replace").splitlines():
            if line.startswith("ORT_INCLUDE_DIR:"):
                candidates.append(pathlib.Path(line.split("=", 1)[1]))
    if os.environ.get("ORT_INCLUDE_DIR"):
        candidates.append(pathlib.Path(os.environ["ORT_INCLUDE_DIR"]))
    cache_root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    candidates += sorted(cache_root.glob("toolkit/ort-headers/*/include/onnxruntime"), reverse=True)
    candidates.append(pathlib.Path("/usr/include/onnxruntime"))
    for c in candidates:
        if (c / "onnxruntime_c_api.h").is_file():
            return c
    raise FileNotFoundError("ONNX Runtime C headers not found (build the op library first: make build)")


def build(out_dir: pathlib.Path, sanitize: str | None = None) -> pathlib.Path:
    """Compiles (or reuses) the library; returns its path."""
    # every header the kernels include counts: a reused build of an edited sample_math.h
    # ran the old draw rule
    headers = sorted(p for ext in ("*.h", "*.cuh") for p in (ROOT / "custom_ops").rglob(ext))
    inputs = [*SOURCES, *headers, *sorted(SIM.glob("include/*.h")), SIM / "runtime.cc", pathlib.Path(__file__)]
    digest = hashlib.sha256()
    for p in inputs:
        digest.update(p.read_bytes())
    digest.update(str(sanitize).encode())
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"libcuda_sim_{digest.hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    src_dir = out_dir / f"src-{os.getpid()}"  # per process: concurrent builds do not share files
    src_dir.mkdir(exist_ok=True)
    units = [SIM / "runtime.cc"]
    for src in SOURCES:
        dst = src_dir / f"{src.parent.name}_{src.stem}.cc"
        dst.write_text(rewrite(src.read_text()))
        units.append(dst)
    ort = ort_include()
    cmd = ["g++", "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-w",
           f"-I{SIM / 'include'}", f"-I{ROOT / 'custom_ops'}", f"-I{ort}", f"-I{ort.parent}"]
    if sanitize:
        cmd.append(f"-fsanitize={sanitize}")
    tmp = lib.with_suffix(f".{os.getpid()}.tmp.so")
    done = subprocess.run([*cmd, *map(str, units), "-o", str(tmp)], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the CUDA simulation failed:\n{' '.join(cmd)}\n{done.stderr[-8000:]}")
    tmp.replace(lib)  # atomic: a concurrent build never sees a half-written library
    return lib


if __name__ == "__main__":
    import sys

    print(build(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "build/cuda_sim")))
