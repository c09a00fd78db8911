"""Describe an ONNX model: operators, I/O, custom ops used, KV-cache layout, size.

Backs ``toolkit inspect``; the KV bytes per token reported here are what the
quantized-cache work is measured by.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any

import numpy as np

ORT_TYPE_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

_PAST = re.compile(r"^past_key_values\.(\d+)\.(.+)$")


def _value_info(vi: Any) -> dict[str, Any]:
    import onnx

    t = vi.type.tensor_type
    dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
            for d in t.shape.dim]
    return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            if t.elem_type else "?", "shape": dims}


def describe(path: str | Path, model: Any) -> dict[str, Any]:
    """A JSON-able description of ``model`` loaded from ``path`` (external data not loaded)."""
    import onnx

    path = Path(path)
    ops = collections.Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                     if n.domain not in ("", "ai.onnx", "com.microsoft")})
    inputs = [_value_info(v) for v in model.graph.input]
    outputs = [_value_info(v) for v in model.graph.output]
    files = [path] + sorted({path.parent / e.value for t in model.graph.initializer
                             for e in t.external_data if e.key == "location"})
    size = sum(f.stat().st_size for f in files if f.is_file())
    params = 0
    for t in model.graph.initializer:
        params += int(np.prod(t.dims)) if len(t.dims) else 1
    layers: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for vi in inputs:
        m = _PAST.match(vi["name"])
        if m:
            layers[int(m.group(1))].append(vi)
    per_token = 0
    for tensors in layers.values():
        for vi in tensors:
            # Bytes per cached token: product of the static dims after the sequence axis and
            # head axis, times the element size. Convention: [batch, heads, seq, ...].
            static = [d for i, d in enumerate(vi["shape"]) if i != 0 and i != 2 and isinstance(d, int)]
            per_token += int(np.prod(static)) * np.dtype(vi["dtype"]).itemsize if static else 0
    meta = {p.key: p.value for p in model.metadata_props}
    kv = {
        "layers": len(layers),
        "tensors_per_layer": sorted({vi["name"].split(".", 2)[2] for t in layers.values() for vi in t}),
        "bytes_per_token": per_token,
        "scheme": meta.get("toolkit.kv_cache", "unknown"),
    }
    if "toolkit.kv_quant" in meta:
        # Quantized cache (passes/kv_cache.py): codes + float16 scales/zeros per token,
        # from the scheme (the lengths are dynamic, so the shapes cannot say it); the
        # full-precision residual window is a fixed cost, reported on its own.
        import json

        from toolkit.ops.kv_quant import KVScheme

        info = json.loads(meta["toolkit.kv_quant"])
        scheme = KVScheme(info["bits"], bool(info["key_per_channel"]), info["key_group"], info["value_group"],
                          info["residual"], bool(info["symmetric"]), bool(info.get("quantize_query", 0)))
        n_layers = info["layers"]
        kv["scheme"] = info["scheme"]
        kv["attributes"] = scheme.to_attributes()
        kv["bytes_per_token"] = scheme.bytes_per_token(info["kv_heads"], info["head_dim"]) * n_layers
        kv["fp32_bytes_per_token"] = 2 * info["kv_heads"] * info["head_dim"] * 4 * n_layers
        kv["reduction_vs_fp32"] = kv["fp32_bytes_per_token"] / kv["bytes_per_token"]
        kv["residual_bytes_max"] = scheme.residual_bytes(info["kv_heads"], info["head_dim"]) * n_layers
        kv["capacity"] = info.get("capacity", 0)  # 0: a growing cache
        kv["quantize_query"] = scheme.quantize_query
    if "toolkit.low_rank_kv" in meta:
        # Latent cache (passes/low_rank_kv.py): [batch, seq, rank] tensors; the pass
        # records the bytes per token it keeps and what float32 keys/values would take.
        import json

        info = json.loads(meta["toolkit.low_rank_kv"])
        for key in ("bytes_per_token", "fp32_bytes_per_token", "reduction_vs_fp32"):
            kv[key] = info[key]
    return {
        "path": str(path),
        "size_bytes": size,
        "files": [str(f) for f in files if f.is_file()],
        "parameters": params,
        "opset_imports": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "nodes": len(model.graph.node),
        "ops": dict(ops.most_common()),
        "custom_ops": custom,
        "inputs": inputs,
        "outputs": outputs,
        "kv_cache": kv,
        "metadata": meta,
        "onnx_version": onnx.__version__,
    }
