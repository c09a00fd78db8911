"""Export a PyTorch model to ONNX with a flat KV cache (no passes).

MODEL is a built-in model name (llama, gpt2, llama-stdlib), hf:<arch> for a
random-weight Hugging Face model (gpt2, llama, qwen2, mistral, phi3, mixtral),
or a local model directory.
"""

from __future__ import annotations

import argparse

from toolkit.commands._common import add_model_args, resolve_model


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file")
    parser.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_model_args(parser)


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from toolkit.export import export
    from toolkit.workspace import Interrupts, check_destination, publish

    out = Path(args.output)
    check_destination(out, directory=False, overwrite=args.overwrite, keep=(args.model,))
    src = resolve_model(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    # SIGTERM too unwinds, so the staging directory (a partial .data file of a large
    # model) goes; it was left behind
    with Interrupts() as guard, tempfile.TemporaryDirectory(prefix=".toolkit-export-", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        export(src, staged, opset=args.opset)
        guard.check()
        publish(Path(tmp), out, files=True, overwrite=args.overwrite)
    print(f"exported {src.spec} ({src.family}, {src.num_layers} layers) -> {out}")
    return 0
