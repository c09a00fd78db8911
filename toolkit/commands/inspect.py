"""Describe an ONNX model: ops, I/O, custom ops used, KV-cache layout and size."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", metavar="MODEL.onnx", help="an ONNX file, or a `toolkit convert` output directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a summary")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from toolkit.model_info import describe
    from toolkit.parity import load_onnx, model_file

    path = model_file(args.onnx)
    info = describe(str(path), load_onnx(path))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Names, shapes and notes come from the model: printed as text, not as rich markup
    # (a note's "[batch, heads, sequence, head_dim]" was read as a style tag and vanished).
    c = Console(width=None if sys.stdout.isatty() else 150)  # piped: long paths and tables unwrapped
    c.print(f"[bold]{escape(info['path'])}[/]  {info['size_bytes'] / 1e6:.2f} MB, {info['parameters']:,} parameters, "
            f"{info['nodes']} nodes, opsets " + ", ".join(f"{d} {v}" for d, v in info["opset_imports"].items()))
    kv = info["kv_cache"]
    per_token = "unknown bytes per token" if kv["bytes_per_token"] is None else f"{kv['bytes_per_token']:,} bytes per token"
    c.print(escape(f"KV cache: {kv['layers']} layers x {', '.join(kv['tensors_per_layer'])}, scheme {kv['scheme']}, "
            f"{per_token}"))
    if kv.get("layout_note"):
        c.print(escape(f"  ({kv['layout_note']})"))
    if "reduction_vs_fp32" in kv:  # a quantized or a latent (low-rank-kv) cache
        residual = ("" if "residual_bytes_max" not in kv else
                    f"; plus at most {kv['residual_bytes_max']:,} bytes of full-precision residual window")
        c.print(f"  {kv['reduction_vs_fp32']:.2f}x smaller than float32 ({kv['fp32_bytes_per_token']:,} bytes per "
                f"token){residual}")
    if kv.get("capacity"):
        c.print(f"  fixed capacity: {kv['capacity']:,} quantized tokens per sequence, updated in place "
                f"({int(kv['capacity'] * kv['bytes_per_token']):,} bytes + the residual window allocated per sequence)")
    if kv.get("quantize_query"):
        c.print("  int8 query (quantize_query=1): integer QK dot products on CPU, the rounded query on CUDA")
    c.print(escape(f"custom ops: {', '.join(info['custom_ops']) or 'none'}"))
    for note in info["notes"]:
        c.print(escape(f"note: {note}"))
    io = Table(title="inputs / outputs")
    for col in ("kind", "name", "dtype", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            io.add_row(kind[:-1], escape(v["name"]), v["dtype"], escape(str(v["shape"])))
    c.print(io)
    ops = Table(title="operators")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(escape(op), str(n))
    c.print(ops)
    return 0
