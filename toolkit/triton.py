"""Triton Inference Server model repositories from toolkit bundles.

Writes ``REPO/NAME/config.pbtxt``, ``REPO/NAME/1/model.onnx`` (+ external data)
and ``REPO/NAME/libtoolkit_ops.so``, and validates the result structurally against
Triton's own ``inference.ModelConfig`` protobuf schema (``model_config.proto`` of
triton-inference-server/common, shipped as ``tritonclient/grpc/model_config_pb2.py``).
Nothing here talks to a server: the check is that Triton's text-format parser
accepts the file and that it agrees with the ONNX graph (every input and output,
its type and its rank) and with the files on disk.

Decisions, and why:

* **Platform.** ``platform: "onnxruntime_onnx"`` and ``backend: "onnxruntime"``:
  Triton's ONNX Runtime backend. It registers each ``model_operations {
  op_library_filename }`` entry with ``OrtApi::RegisterCustomOpsLibrary`` before
  creating the session, which ``dlopen``\\ s the string as given. A relative path
  is therefore resolved against the *server process's* working directory (or
  ``LD_LIBRARY_PATH`` for a bare file name), not against the model directory, so
  the config names the library by an **absolute** path: the model directory as the
  server will see it (``served_root``, default: the repository's absolute path
  here) plus ``libtoolkit_ops.so``. A repository mounted elsewhere (``docker run -v
  $PWD/repo:/models``) is written with ``served_root="/models"``; moving it later
  means editing that one line (the relocation note printed by ``toolkit package``).
* **Library location.** Inside the model directory, next to ``config.pbtxt``: the
  config (and so the library) is shared by every version directory, and the
  library travels with the model when the directory is copied.
* **Batching.** The exported decoder is stateless: each request carries its own KV
  cache (``past_key_values.*`` in, ``present.*`` out) and its own
  ``attention_mask``/``position_ids``, whose lengths differ from request to request.
  Triton's dynamic batcher concatenates requests along dimension 0 and only merges
  requests whose other dimensions are identical (same new-token count *and* same
  past length); rows never interact in this model (per-row mask and cache), so such
  a batch is *correct*, but in a real decode workload it rarely forms. The default is
  therefore ``max_batch_size: 0``: every dimension, batch included, is explicit
  (``-1`` when dynamic), no server-side batching, and a client may send a batch it
  assembled itself. ``max_batch_size > 0`` is offered for lock-step workloads (fixed
  prompt length, equal past lengths): the batch dimension becomes implicit and a
  ``dynamic_batching`` block is emitted; it is refused for models with an input or
  output that has no leading dynamic batch dimension (a static ``[1]``). A sampled
  head's ``sampling_seed [seeds]`` takes one seed per row, so batched requests, each
  sending its own seed, become one seed per row and every request draws its own
  stream. The sequence batcher with implicit state (the server keeping the
  cache between requests) would be the efficient design but needs the cache
  tensors' growth handled by the backend, so it is not emitted and not claimed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from toolkit.errors import InvalidModelError, OpLibraryError, ToolkitError

CONFIG_NAME = "config.pbtxt"
VERSION = "1"
MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
# Files from the bundle copied into the version directory for provenance and for
# clients (the tokenizer); Triton ignores files it does not know.
_SIDECARS = ("manifest.json", "parity.json", "passes.json", "tokenizer.json")

# ONNX TensorProto element type -> Triton DataType (model_config.proto).
TRITON_DTYPES: dict[int, str] = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU", "auto": "KIND_AUTO"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class TritonOptions:
    """How to write the model's ``config.pbtxt``.

    Attributes:
        name: Model name; also the directory name under the repository.
        max_batch_size: 0 (default) for explicit batch dimensions and no server-side
            batching; N > 0 for an implicit batch dimension and dynamic batching up
            to N rows.
        max_queue_delay_us: Dynamic batcher's wait for more requests (max_batch_size > 0).
        instance_count: Model instances per device; ``None`` leaves Triton's default.
        instance_kind: ``cpu``, ``gpu`` or ``auto`` (with ``instance_count``).
        served_root: Absolute path under which the server sees the repository
            (``None``: the repository's absolute path on this machine).
    """

    name: str
    max_batch_size: int = 0
    max_queue_delay_us: int = 100
    instance_count: int | None = None
    instance_kind: str = "cpu"
    served_root: str | None = None

    def validate(self) -> None:
        """Raise :class:`ToolkitError` naming the bad option and the fix."""
        if not _NAME.match(self.name):
            raise ToolkitError(f"model name {self.name!r} is not a valid Triton model directory name",
                               hint="use letters, digits, '_', '-' and '.', not starting with '.' (--name NAME)")
        if self.max_batch_size < 0:
            raise ToolkitError(f"--max-batch-size {self.max_batch_size} is negative",
                               hint="use 0 (no server-side batching) or a positive batch size")
        if self.max_queue_delay_us < 0:
            raise ToolkitError(f"--max-queue-delay-us {self.max_queue_delay_us} is negative",
                               hint="use 0 or a positive number of microseconds")
        if self.instance_count is not None and self.instance_count < 1:
            raise ToolkitError(f"--instance-count {self.instance_count} must be at least 1",
                               hint="e.g. --instance-count 2")
        if self.instance_kind not in INSTANCE_KINDS:
            raise ToolkitError(f"--instance-kind {self.instance_kind!r} is not one of {sorted(INSTANCE_KINDS)}",
                               hint="use --instance-kind cpu or --instance-kind gpu")
        if self.served_root is not None and not self.served_root.startswith("/"):
            raise ToolkitError(f"--served-root {self.served_root!r} is not an absolute path",
                               hint="give the repository's path as the server sees it, e.g. --served-root /models")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as Triton sees it.

    Attributes:
        name: Tensor name.
        data_type: Triton type name (``TYPE_FP32``...).
        dims: Full ONNX shape, ``-1`` for a dynamic dimension (batch included).
    """

    name: str
    data_type: str
    dims: tuple[int, ...]


def graph_io(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX model with Triton types and ``-1`` for dynamic dims.

    Raises:
        InvalidModelError: a tensor whose type has no Triton equivalent or whose rank
            is unknown.
    """

    def spec(vi: Any) -> TensorSpec:
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or t.elem_type not in TRITON_DTYPES:
            raise InvalidModelError(f"graph tensor {vi.name!r} has a type Triton cannot carry "
                                    f"(ONNX element type {t.elem_type})",
                                    hint="convert the model with tensor inputs/outputs of a standard type")
        if not t.HasField("shape"):
            raise InvalidModelError(f"graph tensor {vi.name!r} has no shape (unknown rank); Triton needs its dims",
                                    hint="re-export the model; `toolkit convert` records every I/O shape")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(vi.name, TRITON_DTYPES[t.elem_type], dims)

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def render_config(options: TritonOptions, inputs: list[TensorSpec], outputs: list[TensorSpec],
                  op_library: str | None) -> str:
    """``config.pbtxt`` text (protobuf text format of ``inference.ModelConfig``).

    Args:
        options: Name, batching and instances.
        inputs: Graph inputs (full ONNX dims).
        outputs: Graph outputs (full ONNX dims).
        op_library: Absolute path of the op library as the server sees it, or None.

    Raises:
        ToolkitError: ``max_batch_size > 0`` for a model with a tensor lacking a
            leading dynamic batch dimension.
    """
    batched = options.max_batch_size > 0
    if batched:
        unbatched = [t.name for t in inputs + outputs if not t.dims or t.dims[0] != -1]
        if unbatched:
            raise ToolkitError(
                f"--max-batch-size {options.max_batch_size} needs a leading dynamic batch dimension on every "
                f"input and output; {', '.join(unbatched)} has none",
                hint="use --max-batch-size 0 (the default: explicit batch dimension, client-side batching)")

    def tensors(kind: str, specs: list[TensorSpec]) -> list[str]:
        lines = [f"{kind} ["]
        for i, t in enumerate(specs):
            dims = t.dims[1:] if batched else t.dims
            sep = "," if i + 1 < len(specs) else ""
            lines.append(f'  {{ name: "{t.name}" data_type: {t.data_type} '
                         f'dims: [ {", ".join(str(d) for d in dims)} ] }}{sep}')
        lines.append("]")
        return lines

    lines = [
        f"# Written by `toolkit package`: {MODEL_FILE} in version directory {VERSION}/.",
        f'name: "{options.name}"',
        f'platform: "{PLATFORM}"',
        f'backend: "{BACKEND}"',
        f'default_model_filename: "{MODEL_FILE}"',
        f"max_batch_size: {options.max_batch_size}",
    ]
    lines += tensors("input", inputs)
    lines += tensors("output", outputs)
    if batched:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}")
    if options.instance_count is not None:
        lines.append(f"instance_group [ {{ count: {options.instance_count} "
                     f"kind: {INSTANCE_KINDS[options.instance_kind]} }} ]")
    if op_library is not None:
        lines.append("# Absolute path: the ONNX Runtime backend dlopen()s it as written (a relative path would")
        lines.append("# resolve against tritonserver's working directory). Edit it if the repository moves.")
        lines.append(f'model_operations {{ op_library_filename: "{op_library}" }}')
    return "\n".join(lines) + "\n"


def model_config_schema() -> Any:
    """Triton's generated ``model_config_pb2`` module (``inference.ModelConfig``).

    Loaded from the ``tritonclient`` package by file, so ``tritonclient.grpc``'s
    ``__init__`` (which needs ``grpcio``) is not imported: only the schema is used.

    Raises:
        ToolkitError: tritonclient is not installed.
    """
    import sys

    key = "_toolkit_triton_model_config_pb2"
    if key in sys.modules:
        return sys.modules[key]
    found = importlib.util.find_spec("tritonclient")
    path = None if found is None or not found.submodule_search_locations else (
        Path(next(iter(found.submodule_search_locations))) / "grpc" / "model_config_pb2.py")
    if path is None or not path.is_file():
        raise ToolkitError("validating config.pbtxt needs Triton's ModelConfig schema, which ships in the "
                           "tritonclient package (not installed)",
                           hint="pip install 'tritonclient>=2.40' (the base package is enough; no grpcio needed)")
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[key]
        raise
    return module


def parse_config(path: str | Path) -> Any:
    """Parse a ``config.pbtxt`` into Triton's ``inference.ModelConfig`` message.

    Raises:
        ToolkitError: the file is not valid text format for that schema (the
            parser's message names the line and field).
    """
    from google.protobuf import text_format

    pb2 = model_config_schema()
    try:
        return text_format.Parse(Path(path).read_text(), pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ToolkitError(f"{path} is not a valid Triton model configuration: {exc}",
                           hint="fix the named line, or write the repository again with `toolkit package`") from exc


def validate_model_dir(model_dir: str | Path, *, name: str | None = None, served_dir: str | None = None) -> Any:
    """Check a model directory of a Triton repository against its ONNX model.

    Checks: ``config.pbtxt`` parses as ``inference.ModelConfig``; name, platform and
    backend; the version directory holds the model file and its external data; every
    ONNX input and output is declared with the same type and rank (and the same
    static dimensions), and nothing else is; batching settings are consistent; each
    ``op_library_filename`` is absolute and exists (paths under ``served_dir`` are
    looked up in ``model_dir``); a model using non-standard op domains names a library.

    Args:
        model_dir: ``REPO/NAME`` (or a staging directory that will become it).
        name: The expected model name (default: ``model_dir``'s name).
        served_dir: Path under which the server will see ``model_dir`` (default:
            its absolute path here).

    Returns:
        The parsed ``ModelConfig``.

    Raises:
        ToolkitError: listing every problem found.
    """
    import onnx

    model_dir = Path(model_dir)
    name = name or model_dir.name
    served_dir = served_dir or str(model_dir.resolve())
    config = parse_config(model_dir / CONFIG_NAME)
    problems: list[str] = []
    if config.name != name:
        problems.append(f"name {config.name!r} differs from the model directory name {name!r}")
    if (config.platform, config.backend) == ("", "") or config.platform not in ("", PLATFORM) \
            or config.backend not in ("", BACKEND):
        problems.append(f"platform {config.platform!r} / backend {config.backend!r} is not ONNX Runtime")
    model_file = config.default_model_filename or MODEL_FILE
    versions = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        problems.append("no numeric version directory (e.g. 1/)")
    batched = config.max_batch_size > 0
    if config.max_batch_size < 0:
        problems.append(f"max_batch_size {config.max_batch_size} is negative")
    if config.HasField("dynamic_batching") and not batched:
        problems.append("dynamic_batching needs max_batch_size > 0")
    for group in config.instance_group:
        if group.count < 1:
            problems.append(f"instance_group count {group.count} < 1")

    libraries = list(config.model_operations.op_library_filename)
    for lib in libraries:
        if not lib.startswith("/"):
            problems.append(f"op_library_filename {lib!r} is relative: the ONNX Runtime backend resolves it "
                            "against the server's working directory, not the model directory")
            continue
        prefix = served_dir.rstrip("/") + "/"
        local = model_dir / lib[len(prefix):] if lib.startswith(prefix) else Path(lib)
        if not local.is_file():
            problems.append(f"op library {lib!r} does not exist (looked for {local})")

    for version in versions:
        path = version / model_file
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the same finding
            problems.append(f"{path} is not a readable ONNX model: {exc}")
            continue
        for location in sorted({e.value for t in model.graph.initializer for e in t.external_data
                                if e.key == "location"}):
            if not (version / location).is_file():
                problems.append(f"external data {version / location} is missing")
        custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx", "com.microsoft")})
        if custom and not libraries:
            problems.append(f"{path} uses operators of domain(s) {', '.join(custom)} but the config names no "
                            "op library (model_operations { op_library_filename })")
        try:
            inputs, outputs = graph_io(model)
        except InvalidModelError as exc:
            problems.append(str(exc))
            continue
        for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
            problems += _compare_tensors(kind, declared, actual, batched, config)
    if problems:
        raise ToolkitError(f"Triton model directory {model_dir} is not consistent:\n  - " + "\n  - ".join(problems),
                           hint="write it again with `toolkit package BUNDLE --triton REPO`")
    return config


def _compare_tensors(kind: str, declared: Any, actual: list[TensorSpec], batched: bool, config: Any) -> list[str]:
    """Problems between the config's tensors of one kind and the graph's."""
    pb2 = model_config_schema()
    problems = []
    by_name = {t.name: t for t in declared}
    if len(by_name) != len(declared):
        problems.append(f"duplicate {kind} names in the config")
    for t in actual:
        d = by_name.pop(t.name, None)
        if d is None:
            problems.append(f"model {kind} {t.name!r} is not declared in the config")
            continue
        dtype = pb2.DataType.Name(d.data_type)
        if dtype != t.data_type:
            problems.append(f"{kind} {t.name!r}: config type {dtype}, model type {t.data_type}")
        dims = list(d.dims)
        full = [-1] + dims if batched else dims
        if batched and (not t.dims or t.dims[0] != -1):
            problems.append(f"{kind} {t.name!r}: max_batch_size {config.max_batch_size} > 0 but the model's "
                            f"first dimension is {t.dims[0] if t.dims else 'absent (scalar)'}, not a dynamic batch")
        if len(full) != len(t.dims):
            problems.append(f"{kind} {t.name!r}: config rank {len(full)} "
                            f"({'implicit batch + ' if batched else ''}dims {dims}), model rank {len(t.dims)}")
            continue
        for axis, (c, m) in enumerate(zip(full, t.dims)):
            if m != -1 and c != m:
                problems.append(f"{kind} {t.name!r}: dimension {axis} is {c} in the config, {m} in the model")
            elif m == -1 and c != -1 and not (batched and axis == 0):
                problems.append(f"{kind} {t.name!r}: dimension {axis} is dynamic in the model, {c} in the config")
    for extra in by_name:
        problems.append(f"config {kind} {extra!r} is not a model {kind}")
    return problems


def write_repository(bundle_dir: str | Path, repo_dir: str | Path, options: TritonOptions, *,
                     overwrite: bool = False) -> Path:
    """Write ``repo_dir/NAME`` from a bundle, validated, atomically.

    The model directory is assembled in a hidden staging directory inside
    ``repo_dir`` (same file system, so the final rename is atomic), validated with
    :func:`validate_model_dir`, and only then renamed to ``repo_dir/NAME``. Other
    models in the repository are left alone.

    Args:
        bundle_dir: A ``toolkit convert`` output directory.
        repo_dir: The Triton model repository (created if missing).
        options: Name, batching, instances, served path.
        overwrite: Replace an existing ``repo_dir/NAME``.

    Returns:
        The published model directory.

    Raises:
        InvalidModelError: not a bundle, or its model is unreadable.
        OpLibraryError: the bundle's op library is missing or altered.
        OutputExistsError: ``repo_dir/NAME`` exists and ``overwrite`` is False.
        ToolkitError: bad options, or the written directory failed validation.
    """
    import onnx

    from toolkit import bundle
    from toolkit.errors import OutputExistsError
    from toolkit.workspace import check_destination, publish

    options.validate()
    bundle_dir, repo_dir = Path(bundle_dir), Path(repo_dir)
    manifest = bundle.read_manifest(bundle_dir)
    dest = repo_dir / options.name
    if dest.exists() and not overwrite:
        raise OutputExistsError(f"model directory {str(dest)!r} already exists in the repository",
                                hint="pass --overwrite to replace it, or choose another --name")
    # --overwrite replaces a Triton model this wrote (config.pbtxt), never the bundle itself
    check_destination(dest, directory=True, overwrite=overwrite, keep=(bundle_dir,), marker="config.pbtxt")
    model_path = bundle_dir / manifest["model"]
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise InvalidModelError(f"{model_path} is not a readable ONNX model: {exc}",
                                hint="convert the model again with `toolkit convert`") from exc
    lib = manifest.get("op_library")
    if lib:
        lib_path = bundle_dir / lib["file"]
        if not lib_path.is_file():
            raise OpLibraryError(f"the bundle's op library {lib_path} is missing",
                                 hint="copy the whole bundle directory, or convert the model again")
        if bundle.sha256(lib_path) != lib["sha256"]:
            raise OpLibraryError(f"{lib_path} does not match the SHA-256 in {bundle_dir / bundle.MANIFEST}",
                                 hint="restore the bundled library or convert the model again")
    inputs, outputs = graph_io(model)
    served_root = options.served_root or str(repo_dir.resolve())
    served_dir = f"{served_root.rstrip('/')}/{options.name}"
    op_library = f"{served_dir}/{lib['file']}" if lib else None
    text = render_config(options, inputs, outputs, op_library)

    repo_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{options.name}.partial-", dir=repo_dir))
    try:
        version = staging / VERSION
        version.mkdir()
        shutil.copy2(model_path, version / MODEL_FILE)
        for location in sorted({e.value for t in model.graph.initializer for e in t.external_data
                                if e.key == "location"}):
            src = bundle_dir / location
            if not src.is_file():
                raise InvalidModelError(f"external data file {src} named by {model_path} is missing",
                                        hint="copy the whole bundle directory, or convert the model again")
            shutil.copy2(src, version / location)
        for sidecar in _SIDECARS:
            if (bundle_dir / sidecar).is_file():
                shutil.copy2(bundle_dir / sidecar, version / sidecar)
        if lib:
            shutil.copy2(bundle_dir / lib["file"], staging / lib["file"])
        (staging / CONFIG_NAME).write_text(text)
        validate_model_dir(staging, name=options.name, served_dir=served_dir)
        publish(staging, dest, overwrite=overwrite, mode=0o755)  # the server often runs as another user
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest
