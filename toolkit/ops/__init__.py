"""Custom ONNX operators of the toolkit (domain ``com.toolkit``) and how to load them.

The kernels live in the C++/CUDA library ``libtoolkit_ops.so`` built from
``custom_ops/`` (see ``custom_ops/CMakeLists.txt``); this module finds that library,
checks that it fits the installed ONNX Runtime and registers it on a
``SessionOptions``. ``toolkit.ops.reference`` holds NumPy references of every op.

onnxruntime is imported inside the functions only, so importing ``toolkit`` (and
``toolkit --help``) stays instant.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import sys
import sysconfig
from typing import TYPE_CHECKING

from toolkit.errors import OpLibraryError

if TYPE_CHECKING:
    import onnxruntime

DOMAIN = "com.toolkit"
OPSET_VERSION = 1
# The attributes each op's kernels read (custom_ops/*/*_cpu.cc ReadAttributes). ORT
# hands a custom op only the attributes it asks for by name, so a misspelt one
# (`temprature=2`) would run silently at the default; load_onnx refuses it.
OP_ATTRIBUTES: dict[str, frozenset[str]] = {
    "FusedSoftmaxTopK": frozenset({"k", "temperature", "normalize", "log_probs"}),
    "SampleTopKTopP": frozenset({"k", "temperature", "normalize", "log_probs", "top_p", "min_p", "seed"}),
    "QuantKVAttention": frozenset({"bits", "key_per_channel", "key_group", "value_group", "residual", "symmetric",
                                   "quantize_query", "scale"}),
    "LowRankMatMul": frozenset(),
}
# Ops that take float32 only (FusedSoftmaxTopK also reads float16 logits): a float16
# conversion of a model keeps them in float32 (onnxruntime.transformers.float16's
# op_block_list).
FLOAT32_ONLY_OPS = ("QuantKVAttention", "LowRankMatMul", "SampleTopKTopP")
LIBRARY_ENV_VAR = "TOOLKIT_OPS_LIBRARY"
_LIBRARY_NAME = "libtoolkit_ops.so"
_BUILD_HINT = (
    "build it with `pip install -e .` (or `make build`), or by hand with "
    "`cmake -S custom_ops -B build/ops -G Ninja && cmake --build build/ops -j2`; "
    f"or point {LIBRARY_ENV_VAR} at an existing {_LIBRARY_NAME}"
)


def _candidate_paths() -> list[tuple[str, pathlib.Path]]:
    package_dir = pathlib.Path(__file__).resolve().parent.parent  # toolkit/
    repo_root = package_dir.parent
    package_dirs = [package_dir]
    # Editable installs (scikit-build-core "redirect" mode) put built files in
    # site-packages/toolkit/ while the sources stay in the checkout.
    toolkit_module = sys.modules.get("toolkit")
    for entry in list(getattr(toolkit_module, "__path__", [])) + [
        os.path.join(sysconfig.get_paths()[key], "toolkit") for key in ("platlib", "purelib")
    ]:
        path = pathlib.Path(entry).resolve()
        if path not in package_dirs:
            package_dirs.append(path)
    candidates = [("package", d / "_lib" / _LIBRARY_NAME) for d in package_dirs]
    candidates.append(("development build", repo_root / "build" / "ops" / _LIBRARY_NAME))
    return candidates


def library_path() -> pathlib.Path:
    """Returns the path of ``libtoolkit_ops.so``.

    Looks, in order, at the ``TOOLKIT_OPS_LIBRARY`` environment variable, the
    installed package (``toolkit/_lib/``) and a development build in
    ``<repo>/build/ops/``.

    Raises:
        OpLibraryError: if the environment variable names a missing file, or no
            library is found.
    """
    env = os.environ.get(LIBRARY_ENV_VAR)
    if env:
        path = pathlib.Path(env).expanduser()
        if not path.is_file():
            raise OpLibraryError(
                f"{LIBRARY_ENV_VAR}={env} does not name an existing file",
                hint=f"unset {LIBRARY_ENV_VAR} or set it to the path of {_LIBRARY_NAME}; " + _BUILD_HINT,
            )
        return path
    searched = []
    for _, path in _candidate_paths():
        if path.is_file():
            return path
        searched.append(str(path))
    raise OpLibraryError(
        f"custom-op library {_LIBRARY_NAME} not found (looked at ${LIBRARY_ENV_VAR} (unset), "
        + ", ".join(searched)
        + ")",
        hint=_BUILD_HINT,
    )


@functools.lru_cache(maxsize=None)
def _load(path: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(path)
    except OSError as err:
        raise OpLibraryError(
            f"cannot load the custom-op library {path}: {err}",
            hint="rebuild it for this machine; " + _BUILD_HINT,
        ) from err
    lib.toolkit_ops_min_ort_api_version.restype = ctypes.c_int
    lib.toolkit_ops_has_cuda.restype = ctypes.c_int
    lib.toolkit_ops_version.restype = ctypes.c_char_p
    return lib


def _library() -> ctypes.CDLL:
    return _load(str(library_path()))


def min_ort_api_version() -> int:
    """The oldest ONNX Runtime C API version the library needs (API N = ORT 1.N)."""
    return int(_library().toolkit_ops_min_ort_api_version())


def has_cuda() -> bool:
    """Whether the library was built with its CUDA kernels."""
    return bool(_library().toolkit_ops_has_cuda())


def library_version() -> str:
    """Version string of the loaded library."""
    return _library().toolkit_ops_version().decode()


def ort_api_version(version: str | None = None) -> int:
    """ONNX Runtime's C API version: release 1.N provides API N."""
    if version is None:
        import onnxruntime

        version = onnxruntime.__version__
    parts = version.split(".")
    try:
        major, minor = int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()))
    except (IndexError, ValueError) as err:
        raise OpLibraryError(f"cannot parse the onnxruntime version {version!r}") from err
    if major != 1:
        raise OpLibraryError(
            f"onnxruntime {version} is not a 1.x release; the custom-op library targets the 1.x C API"
        )
    return minor


def checked_threads(threads: int) -> int:
    """An intra-op thread count ORT can use (>= 1), else a :class:`ToolkitError`
    (ORT itself reads 0 as its default and fails on negative counts)."""
    from toolkit.errors import ToolkitError

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ToolkitError(f"threads must be an integer >= 1, got {threads!r}",
                           hint="pass a positive count, or None for ONNX Runtime's default")
    return threads


def session_options(threads: int | None = None) -> onnxruntime.SessionOptions:
    """A ``SessionOptions`` with the toolkit's custom-op library registered.

    Args:
        threads: intra-op thread count (``None`` keeps ONNX Runtime's default).

    Raises:
        OpLibraryError: if the library is missing, too new for the installed
            onnxruntime, or ONNX Runtime refuses to register it.
    """
    import onnxruntime

    path = library_path()
    needed = min_ort_api_version()
    have = ort_api_version(onnxruntime.__version__)
    if have < needed:
        raise OpLibraryError(
            f"onnxruntime {onnxruntime.__version__} (C API {have}) is too old for the custom-op "
            f"library {path}, which needs C API >= {needed} (onnxruntime >= 1.{needed})",
            hint=f"pip install 'onnxruntime>=1.{needed}'",
        )
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = checked_threads(threads)
    try:
        options.register_custom_ops_library(str(path))
    except Exception as err:  # onnxruntime raises its own (pybind) exception types
        raise OpLibraryError(
            f"onnxruntime {onnxruntime.__version__} could not register the custom-op library {path}: {err}",
            hint="rebuild the library against this onnxruntime; " + _BUILD_HINT,
        ) from err
    return options


__all__ = [
    "DOMAIN",
    "OPSET_VERSION",
    "has_cuda",
    "library_path",
    "library_version",
    "min_ort_api_version",
    "ort_api_version",
    "session_options",
]
