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


# Operator domains of the ONNX standard (and ONNX Runtime's contrib ops): not "custom".
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training", "com.microsoft")


def _bad_metadata(path: Path, key: str, exc: Exception) -> Exception:
    from toolkit.errors import InvalidModelError

    what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyError) else f"no field {exc}"
    return InvalidModelError(f"{str(path)!r}: metadata {key!r} is malformed ({what})",
                             hint="the model was edited after `toolkit convert` wrote it: convert it again, or "
                             "remove that metadata_props entry")


def _metadata_json(path: Path, meta: dict[str, str], key: str) -> dict[str, Any]:
    import json

    try:
        info = json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise _bad_metadata(path, key, exc) from None
    if not isinstance(info, dict):
        raise _bad_metadata(path, key, TypeError(f"a JSON {type(info).__name__}, not an object"))
    return info


def describe(path: str | Path, model: Any) -> dict[str, Any]:
    """A JSON-able description of ``model`` loaded from ``path`` (external data not loaded)."""
    import onnx

    from toolkit.parity import all_graphs

    path = Path(path)
    nodes = [n for g in all_graphs(model) for n in g.node]  # If / Loop bodies too
    ops = collections.Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in nodes)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in STANDARD_DOMAINS})
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
    # Bytes per cached token from the shapes, for the layout the exporter writes:
    # [batch, heads, sequence, head_dim] with heads and head_dim fixed and the sequence
    # symbolic. Any other layout ([batch, seq, heads, dim], symbolic heads, GPTBigCode's
    # fused [batch, seq, 2 * dim]) cannot be read from the shapes alone: None, "unknown".
    # (onnxruntime-genai's GroupQueryAttention models leave the head dim symbolic; the graph gives it)
    from toolkit.parity import DecoderFacts, decoder_facts

    facts = decoder_facts(model) if layers else DecoderFacts({})
    known = facts.cache_dims
    per_token: int | None = 0
    for tensors in layers.values():
        for vi in tensors:
            shape = [known.get(vi["name"], {}).get(axis, d) for axis, d in enumerate(vi["shape"])]
            if not (len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[3], int)
                    and not isinstance(shape[2], int) and vi["dtype"] != "?"):
                per_token = None
                break
            per_token += shape[1] * shape[3] * np.dtype(vi["dtype"]).itemsize
        if per_token is None:
            break
    meta = {p.key: p.value for p in model.metadata_props}
    kv = {
        "layers": len(layers),
        "tensors_per_layer": sorted({vi["name"].split(".", 2)[2] for t in layers.values() for vi in t}),
        "bytes_per_token": per_token,
        "scheme": meta.get("toolkit.kv_cache", "unknown"),
        # GroupQueryAttention reads a batch's rows right-padded (toolkit.load's session
        # refuses left padding for such bundles; generate and parity left-pad)
        "right_padded": facts.right_padded,
    }
    if "toolkit.kv_quant" in meta:
        # Quantized cache (passes/kv_cache.py): codes + float16 scales/zeros per token,
        # from the scheme (the lengths are dynamic, so the shapes cannot say it); the
        # full-precision residual window is a fixed cost, reported on its own.
        from toolkit.ops.kv_quant import KVScheme

        info = _metadata_json(path, meta, "toolkit.kv_quant")
        try:
            scheme = KVScheme(info["bits"], bool(info["key_per_channel"]), info["key_group"], info["value_group"],
                              info["residual"], bool(info["symmetric"]), bool(info.get("quantize_query", 0)))
            n_layers, heads, dim = int(info["layers"]), int(info["kv_heads"]), int(info["head_dim"])
            kv["scheme"] = str(info["scheme"])
            kv["attributes"] = scheme.to_attributes()
            kv["bytes_per_token"] = scheme.bytes_per_token(heads, dim) * n_layers
            kv["fp32_bytes_per_token"] = 2 * heads * dim * 4 * n_layers
            kv["reduction_vs_fp32"] = kv["fp32_bytes_per_token"] / kv["bytes_per_token"]
            kv["residual_bytes_max"] = scheme.residual_bytes(heads, dim) * n_layers
            kv["capacity"] = int(info.get("capacity", 0))  # 0: a growing cache
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise _bad_metadata(path, "toolkit.kv_quant", exc) from None
        kv["quantize_query"] = scheme.quantize_query
    if "toolkit.low_rank_kv" in meta:
        # Latent cache (passes/low_rank_kv.py): [batch, seq, rank] tensors; the pass
        # records the bytes per token it keeps and what float32 keys/values would take.
        info = _metadata_json(path, meta, "toolkit.low_rank_kv")
        try:
            for key in ("bytes_per_token", "fp32_bytes_per_token", "reduction_vs_fp32"):
                kv[key] = float(info[key]) if key == "reduction_vs_fp32" else int(info[key])
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad_metadata(path, "toolkit.low_rank_kv", exc) from None
    notes = _inlined_op_notes(meta, set(ops) | {f"{f.domain}::{f.name}" for f in model.functions})
    if kv["bytes_per_token"] is None:  # neither the shapes nor the toolkit's metadata give it
        kv["layout_note"] = ("the past_key_values.* inputs are not [batch, heads, sequence, head_dim] with fixed "
                             "heads and head_dim, so their bytes per token cannot be read from the shapes")
    return {
        "path": str(path),
        "size_bytes": size,
        "files": [str(f) for f in files if f.is_file()],
        "parameters": params,
        "opset_imports": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "nodes": len(nodes),
        "ops": dict(ops.most_common()),
        "custom_ops": custom,
        "inputs": inputs,
        "outputs": outputs,
        "kv_cache": kv,
        "metadata": meta,
        "notes": notes,
        "onnx_version": onnx.__version__,
    }


# A pass's metadata key, and the com.toolkit ops its output always holds (one suffices).
_PASS_OPS = (("toolkit.kv_quant", "a quantized KV cache", ("QuantKVAttention",)),
             ("toolkit.sampling_head", "a sampling head", ("FusedSoftmaxTopK", "SampleTopKTopP")))


def _inlined_op_notes(meta: dict[str, str], present: set[str]) -> list[str]:
    """Notes for a pass the metadata records whose ops are gone from the graph (and its
    functions): an offline tool inlined the ``--portable`` bodies, so the model runs in
    plain ONNX ops and the fused kernels are never used."""
    notes = []
    for key, what, op_types in _PASS_OPS:
        if key in meta and not any(f"com.toolkit::{op}" in present for op in op_types):
            notes.append(f"the metadata ({key}) records {what}, but no com.toolkit::{' or '.join(op_types)} is left "
                         "in the graph: a tool inlined the --portable function bodies (onnxscript.optimizer.optimize "
                         "does by default, inline=False keeps them; so does ORT's optimizer saving without the op "
                         "library), so the model runs without the fused kernels")
    return notes
