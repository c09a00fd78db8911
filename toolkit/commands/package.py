"""Package a converted bundle for a model server: a Triton Inference Server model repository.

Writes REPO_DIR/NAME/config.pbtxt (platform onnxruntime_onnx, every graph input and
output with its Triton type and dims, the op library in model_operations),
REPO_DIR/NAME/1/model.onnx (+ external data, manifest, tokenizer) and
REPO_DIR/NAME/libtoolkit_ops.so. The config is parsed with Triton's own ModelConfig
schema (tritonclient package) and checked against the ONNX graph before anything is
published; other models in REPO_DIR are left alone. Batching and path choices are
explained in toolkit/triton.py.
"""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE", help="a `toolkit convert` output directory")
    parser.add_argument("--triton", required=True, metavar="REPO_DIR",
                        help="Triton model repository to write the model into (created if missing)")
    parser.add_argument("--name", default=None,
                        help="model name and directory under REPO_DIR (default: the bundle directory's name)")
    parser.add_argument("--max-batch-size", type=int, default=0, metavar="N",
                        help="0 (default): explicit batch dimension, no server-side batching (each request "
                        "carries its own KV cache and lengths); N > 0: implicit batch dimension + dynamic "
                        "batching, which only merges requests of identical shapes")
    parser.add_argument("--max-queue-delay-us", type=int, default=100, metavar="US",
                        help="dynamic batcher queue delay with --max-batch-size > 0 (default 100)")
    parser.add_argument("--instance-count", type=int, default=None, metavar="N",
                        help="model instances (instance_group); default: Triton's default")
    parser.add_argument("--instance-kind", choices=("cpu", "gpu", "auto"), default="cpu",
                        help="instance_group kind with --instance-count (default cpu: the tested provider)")
    parser.add_argument("--served-root", default=None, metavar="PATH",
                        help="absolute path of REPO_DIR as the server sees it, e.g. /models when it is mounted "
                        "with `docker run -v $PWD/REPO_DIR:/models` (default: REPO_DIR's absolute path here); "
                        "the op library is referenced by absolute path under it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing REPO_DIR/NAME")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toolkit.triton import CONFIG_NAME, TritonOptions, write_repository

    bundle_dir = Path(args.bundle)
    options = TritonOptions(
        name=args.name or bundle_dir.resolve().name, max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us, instance_count=args.instance_count,
        instance_kind=args.instance_kind, served_root=args.served_root)
    dest = write_repository(bundle_dir, args.triton, options, overwrite=args.overwrite)
    served = f"{(args.served_root or str(Path(args.triton).resolve())).rstrip('/')}/{options.name}"
    print(f"wrote {dest}: {CONFIG_NAME}, " + ", ".join(
        sorted(p.name for p in dest.iterdir() if p.name != CONFIG_NAME)) + " (validated against Triton's "
        "ModelConfig schema and the ONNX graph)")
    if (dest / "libtoolkit_ops.so").exists():
        print(f"op library referenced as {served}/libtoolkit_ops.so: the server must see the repository at "
              f"{args.served_root or Path(args.triton).resolve()} (or edit op_library_filename in {CONFIG_NAME}, "
              "or re-run with --served-root)")
    return 0
