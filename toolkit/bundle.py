"""Self-describing output directories: what ``toolkit convert`` ships.

A bundle is ``model.onnx`` (+ external data), ``manifest.json``, ``parity.json``,
``passes.json``, the tokenizer when the source has one and — when the model uses
operators of domain ``com.toolkit`` — the op library it was validated with
(``libtoolkit_ops.so``). The manifest records what a host needs to check before
running it: the op domain and version, the oldest ONNX Runtime C API the library
needs, the library's SHA-256, the model's I/O and KV-cache layout, the passes
applied and the parity verdict. :func:`load` opens a session after those checks. When
onnxruntime-genai can drive the model, the bundle also holds its `genai_config.json`
(:mod:`toolkit.genai`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

from toolkit.errors import InvalidModelError, OpLibraryError, ParityFailedWarning, ParityFailure, ToolkitError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
LIBRARY_NAME = "libtoolkit_ops.so"


# The oldest ONNX Runtime release that reads a model of (IR version, ai.onnx opset), from
# ONNX Runtime's docs/Versioning.md (the ONNX release each ORT release ships): ORT 1.17
# reads ONNX 1.15 models (IR 9, opset 20), 1.18 ONNX 1.16 (IR 10, opset 21), 1.20
# ONNX 1.17 (opset 22), 1.22 ONNX 1.18 (IR 11, opset 23). Older rows are below our op
# library's floor (C API 17 = ORT 1.17), so 1.17 is the first row.
_ORT_READS = ((9, 20, "1.17"), (10, 21, "1.18"), (10, 22, "1.20"), (11, 23, "1.22"))
# The portable body of SampleTopKTopP draws with uint64 Add / Mul / Sub, which ONNX
# Runtime's CPU provider implements from 1.21 (audit: 1.17-1.20 fail "Could not find an
# implementation for Add(14)" on uint64; 1.21-1.28 run it).
_UINT64_ARITHMETIC_ORT = "1.21"


def _version_tuple(version: str) -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def runtime_requirements(ir_version: int, opset: int, *, op_library: bool, portable_ops: list[str]) -> dict[str, Any]:
    """The oldest ONNX Runtime a bundle runs on: with its op library (the model's IR /
    opset, and the library's C API 17), and, for a portable bundle, without it."""
    reads = next((ort for ir, op, ort in _ORT_READS if ir_version <= ir and opset <= op), None)
    out: dict[str, Any] = {"ir_version": ir_version, "opset": opset, "min_onnxruntime": reads}
    if reads is None:
        out["note"] = (f"IR {ir_version} / opset {opset} is newer than this toolkit's table: an ONNX Runtime "
                       "that reads it")
    if op_library:
        out["min_onnxruntime_without_op_library"] = None
        if portable_ops:
            uint64 = "SampleTopKTopP" in portable_ops
            out["min_onnxruntime_without_op_library"] = (
                max(reads, _UINT64_ARITHMETIC_ORT, key=_version_tuple) if uint64 and reads else reads)
    return out


def library_requirements(path: Path) -> dict[str, str]:
    """The newest GNU C / C++ runtime symbol versions an ELF library references
    (``GLIBC_2.34``, ``GLIBCXX_3.4.29``): the oldest glibc / libstdc++ a target system
    needs to load it. Read from the version-requirement names in the file's string
    table, as ``objdump -T`` lists them."""
    import re

    data = Path(path).read_bytes()
    out = {}
    for key, prefix in (("glibc", b"GLIBC_"), ("glibcxx", b"GLIBCXX_"), ("cxxabi", b"CXXABI_")):
        found = {tuple(int(x) for x in m.split(b".")) for m in re.findall(re.escape(prefix) + rb"(\d+(?:\.\d+)+)", data)}
        if found:
            out[key] = ".".join(str(x) for x in max(found))
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write(staging: Path, model: Any, pipeline_report: dict[str, Any], parity_passed: bool | None) -> dict[str, Any]:
    """Write ``manifest.json`` (and copy the op library when needed) into ``staging``.

    Also writes onnxruntime-genai's ``genai_config.json`` (and ``tokenizer_config.json``)
    when genai can drive the model; ``manifest["genai"]`` says which, or why not
    (:mod:`toolkit.genai`).
    """
    from toolkit import __version__, ops
    from toolkit.model_info import describe
    from toolkit.parity import uses_custom_ops

    info = describe(staging / "model.onnx", model)
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "toolkit_version": __version__,
        "model": "model.onnx",
        "source": info["metadata"].get("toolkit.source"),
        "opset_imports": info["opset_imports"],
        "inputs": info["inputs"],
        "outputs": info["outputs"],
        "kv_cache": info["kv_cache"],
        "custom_ops": info["custom_ops"],
        # every custom op has a standard-ONNX body: runs without the library too
        "portable": bool(info["custom_ops"]) and {f.name for f in model.functions} >= {
            op.split("::")[1] for op in info["custom_ops"]},
        "passes": pipeline_report.get("passes", []),
        "parity": {"passed": parity_passed, "report": "parity.json" if parity_passed is not None else None,
                   "html": "parity.html" if parity_passed is not None else None},
        "op_library": None,
        # the model and its external data as converted: load refuses a model file that
        # was replaced afterwards (parity.json would no longer describe it)
        "files": {Path(f).resolve().relative_to(staging.resolve()).as_posix():
                  {"bytes": Path(f).stat().st_size, "sha256": sha256(Path(f))} for f in info["files"]},
    }
    portable_ops = sorted(op.split("::")[1] for op in info["custom_ops"]) if manifest["portable"] else []
    manifest["runtime"] = runtime_requirements(
        int(info["ir_version"]), int(info["opset_imports"].get("ai.onnx", 0)),
        op_library=bool(info["custom_ops"]), portable_ops=portable_ops)
    if uses_custom_ops(model):
        lib = ops.library_path()
        shutil.copy2(lib, staging / LIBRARY_NAME)
        manifest["op_library"] = {
            "file": LIBRARY_NAME,
            "sha256": sha256(staging / LIBRARY_NAME),
            "domain": ops.DOMAIN,
            "domain_version": ops.OPSET_VERSION,
            "min_ort_api_version": ops.min_ort_api_version(),
            "cuda_kernels": ops.has_cuda(),
            "providers": ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if ops.has_cuda() else []),
            # the oldest GNU C / C++ runtimes a target needs (the build machine's symbol versions)
            "requires": library_requirements(staging / LIBRARY_NAME),
        }
    # onnxruntime-genai's genai_config.json (+ tokenizer_config.json), or why it cannot drive the model
    from toolkit import genai

    manifest["genai"] = genai.write(staging, info, LIBRARY_NAME if manifest["op_library"] else None)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The bundle's manifest, checked: a JSON object of this toolkit's version whose
    ``model`` names a file and whose ``op_library`` (or null) has its file, SHA-256 and
    C API version. Anything else is an :class:`InvalidModelError` naming the field."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        raise InvalidModelError(f"bundle directory {str(directory)!r} does not exist",
                                hint="point at a directory written by `toolkit convert`")
    if directory.is_file():
        raise InvalidModelError(f"{str(directory)!r} is a file; a bundle is the directory `toolkit convert` writes",
                                hint=f"pass its directory ({str(directory.parent)!r} if this is a bundle's "
                                "model.onnx); for a bare ONNX file use toolkit.parity.make_session(path)")
    if not path.is_file():
        raise InvalidModelError(f"{str(directory)!r} has no {MANIFEST}",
                                hint="point at a directory written by `toolkit convert`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModelError(f"{path} is not valid JSON: {exc}", hint="re-run `toolkit convert`") from exc
    if not isinstance(manifest, dict):
        raise InvalidModelError(f"{path} holds a JSON {type(manifest).__name__}, not an object",
                                hint="re-run `toolkit convert`")
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise InvalidModelError(
            f"{path} has manifest version {manifest.get('manifest_version')!r}; this toolkit reads "
            f"version {MANIFEST_VERSION}",
            hint="convert the model again with this toolkit version",
        )

    def bad(field: str, want: str, value: Any) -> InvalidModelError:
        return InvalidModelError(f"{path}: field {field!r} must be {want}, got {value!r}",
                                 hint="the manifest was edited or truncated: re-run `toolkit convert`")

    if not isinstance(manifest.get("model"), str) or not manifest["model"]:
        raise bad("model", "the model file's name", manifest.get("model"))
    lib = manifest.get("op_library")
    if lib is not None:
        if not isinstance(lib, dict):
            raise bad("op_library", "an object or null", lib)
        for field, kind, want in (("file", str, "a file name"), ("sha256", str, "a hex digest"),
                                  ("min_ort_api_version", int, "an integer")):
            if not isinstance(lib.get(field), kind) or isinstance(lib.get(field), bool):
                raise bad(f"op_library.{field}", want, lib.get(field))
        providers = lib.get("providers", [])
        if not isinstance(providers, list) or not all(isinstance(x, str) for x in providers):
            raise bad("op_library.providers", "a list of provider names", providers)
    parity = manifest.get("parity")
    if parity is not None and not (isinstance(parity, dict) and any(parity.get("passed") is v for v in (True, False, None))):
        raise bad("parity", "an object whose 'passed' is true, false or null", parity)
    files = manifest.get("files", {})  # (bundles written before the record have none)
    if not isinstance(files, dict):
        raise bad("files", "an object of file records", files)
    for name, record in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise bad("files", "names inside the bundle directory", name)
        if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
                and not isinstance(record.get("bytes"), bool) and isinstance(record.get("sha256"), str)):
            raise bad(f"files.{name}", "{bytes: integer, sha256: hex digest}", record)
    return manifest


def _check_runtime_reads(manifest: dict[str, Any], directory: Path, have: str) -> None:
    """Refuses, by name, an ONNX Runtime older than the bundle's model needs (its IR
    version / opset, recorded by :func:`write`); a manifest without the record passes."""
    runtime = manifest.get("runtime")
    need = runtime.get("min_onnxruntime") if isinstance(runtime, dict) else None
    if not isinstance(need, str) or _version_tuple(have) >= _version_tuple(need):
        return
    raise InvalidModelError(
        f"{directory / manifest['model']} is ONNX IR {runtime.get('ir_version')} / opset {runtime.get('opset')}, "
        f"which ONNX Runtime reads from {need}; this is onnxruntime {have}",
        hint=f"pip install 'onnxruntime>={need}'" + (
            ", or convert the model with --opset 20 (IR 9), which ONNX Runtime 1.17 reads"
            if int(runtime.get("opset") or 0) > 20 else ""))


# Op libraries this process registered, by the path string given to the loader -> SHA-256.
_REGISTERED: dict[str, str] = {}


def _open_under(name: str) -> bool:
    """Whether the dynamic loader already has a library open that ``dlopen(name)``
    would return (RTLD_NOLOAD: nothing is loaded)."""
    import _ctypes
    import ctypes
    import os

    try:
        handle = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)._handle
    except OSError:
        return False
    _ctypes.dlclose(handle)  # (the reference RTLD_NOLOAD took)
    return True


def _registration_path(path: Path, digest: str) -> Path:
    """The path to register ``path`` (whose SHA-256 is ``digest``) from.

    The dynamic loader hands back a library already open under the same path name
    without reading the file again. A server that swaps a bundle in place (renames
    directories or flips a ``current`` symlink, loads the new one, then drops the old
    sessions) and whose library changed in between got a session running the *old*
    library, although the hash check had read the new file (an audit). So when a
    library is still open under this name and this process did not register these
    bytes from it, the library is registered from a copy named after its hash (one per
    user in the temporary directory), which the loader opens as a new library. Once
    the old sessions are gone the loader has closed it, and the path is used as is.
    """
    import os
    import tempfile

    name = os.path.abspath(path)  # (not resolved: the loader matches the name it was given)
    if not _open_under(name) or _REGISTERED.get(name) == digest:
        _REGISTERED[name] = digest
        return Path(name)
    base = Path(tempfile.gettempdir()) / f"toolkit-ops-{os.getuid()}"
    copy = base / digest / LIBRARY_NAME
    tmp = None
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        if base.is_symlink() or base.stat().st_uid != os.getuid():
            raise PermissionError(f"{base} is not this user's directory")
        if not (copy.is_file() and sha256(copy) == digest):
            copy.parent.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=copy.parent, prefix=".partial-")
            written = hashlib.sha256()  # (the bytes copied, hashed as they are written)
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    written.update(block)
                    out.write(block)
            if written.hexdigest() != digest:
                raise OpLibraryError(f"{path} changed while it was being loaded",
                                     hint="load the bundle again once it is completely written")
            os.replace(tmp, copy)
            tmp = None
    except OSError as exc:
        raise OpLibraryError(
            f"{path} differs from the op library this process still has open under that path (from a bundle "
            f"that was there before), and a copy of it could not be staged in {base} to load it beside the "
            f"old one: {exc}",
            hint="set TMPDIR to a writable directory of this user's, or release the sessions of the previous "
            "bundle (the loader then closes its library) before loading this one") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    _REGISTERED[str(copy)] = digest
    return copy


def _check_model_files(manifest: dict[str, Any], directory: Path, model_path: Path) -> None:
    """The model file must have the SHA-256 and its external data files the sizes
    recorded at conversion (bundles written before the record are not checked). A file
    that no longer parses gets the bare-file diagnosis (toolkit.parity.load_onnx)."""
    from toolkit.parity import load_onnx

    for name, want in manifest.get("files", {}).items():  # (checked by read_manifest)
        path = directory / name
        size = path.stat().st_size if path.is_file() else None
        changed = size != want["bytes"] or (path == model_path and sha256(path) != want["sha256"])
        if not changed:
            continue
        load_onnx(model_path)  # a missing, truncated or invalid file is named as such first
        what = "is missing" if size is None else (
            f"has {size:,} bytes, not the {want['bytes']:,} recorded" if size != want["bytes"] else
            "does not match its recorded SHA-256")
        raise InvalidModelError(
            f"{path} {what} in {directory / MANIFEST}: the model was changed after conversion, so the parity "
            "report no longer describes it",
            hint="restore the converted files or convert the model again; a model changed on purpose (e.g. "
            "onnxruntime.quantization) is a new model: check it with `toolkit parity SOURCE MODEL.onnx` and run "
            "the file itself (toolkit.parity.make_session)")


@functools.cache
def _session_class() -> type:
    """The class of the sessions :func:`load` returns: an ``onnxruntime.InferenceSession``
    whose :meth:`run` first refuses inputs ONNX Runtime fails on with a kernel's message
    (an empty ``input_ids`` through a sampling head: :func:`toolkit.generate.check_input_ids`)
    or reads wrong without a word (a left-padded ``attention_mask`` through onnxruntime-genai's
    GroupQueryAttention, which takes rows right-padded: :func:`toolkit.generate.check_right_padding`).
    Defined on first use (onnxruntime is imported lazily)."""
    import onnxruntime as ort

    from toolkit.generate import check_input_ids, check_right_padding, head_options

    class BundleSession(ort.InferenceSession):
        __doc__ = _session_class.__doc__

        def __init__(self, *args: Any, right_padded: bool = False, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._sampling_head = head_options(self) is not None
            self._right_padded = right_padded  # the manifest's kv_cache.right_padded, recorded at conversion

        def run(self, output_names: Any, input_feed: dict[str, Any], run_options: Any = None) -> Any:
            if self._sampling_head and isinstance(input_feed, dict) and "input_ids" in input_feed:
                check_input_ids(input_feed["input_ids"])
            if self._right_padded and isinstance(input_feed, dict) and "attention_mask" in input_feed:
                check_right_padding(input_feed["attention_mask"])
            return super().run(output_names, input_feed, run_options)

    return BundleSession


def load(directory: str | Path, providers: list[str] | None = None, threads: int | None = None,
         session_options: Any | None = None, require_parity: bool = False) -> Any:
    """An ONNX Runtime session for a bundle, after checking its manifest.

    Checks the op library's SHA-256 against the manifest and that the running ONNX
    Runtime provides the C API version the library needs; picks
    CUDAExecutionProvider when both the runtime and the bundled library have it.
    ``session_options``: an ``onnxruntime.SessionOptions`` of the caller's (e.g. with
    ``enable_cpu_mem_arena = False``, so the memory of one large request goes back to
    the system), used for this one session: the library is registered into it and
    ``threads`` sets its intra-op threads, so pass a new object to each call.
    ``require_parity``: refuse a bundle whose manifest does not record a passing parity
    check (kept with ``--keep-failed``, or converted with ``--no-parity``); without it
    a failed one loads with a :class:`ParityFailedWarning`.

    The session is an ``onnxruntime.InferenceSession`` (a subclass) whose ``run``
    refuses with a ToolkitError naming the input a zero-length ``input_ids`` through a
    sampling head (ONNX Runtime failed in the head's Gather) and, for a model that keeps
    onnxruntime-genai's GroupQueryAttention, an ``attention_mask`` padded before a kept
    position (read wrong without an error).

    Raises:
        InvalidModelError: missing/unreadable manifest or model.
        OpLibraryError: the library is missing, altered, or too new for this runtime.
    """
    import onnxruntime as ort

    from toolkit import ops

    directory = Path(directory)
    if providers is not None and (isinstance(providers, str) or not all(isinstance(p, str) for p in providers)):
        raise ToolkitError(f"providers must be a list of provider names, got {providers!r}",
                           hint='e.g. providers=["CPUExecutionProvider"]')
    manifest = read_manifest(directory)
    _check_runtime_reads(manifest, directory, ort.__version__)
    passed = (manifest.get("parity") or {}).get("passed")  # null: converted with --no-parity
    if require_parity and passed is not True:
        raise ParityFailure(f"{str(directory)!r} has no passing parity check (manifest.json: parity.passed is "
                            f"{json.dumps(passed)}; {'kept with --keep-failed' if passed is False else 'not checked'})"
                            " and require_parity=True",
                            hint="convert the model again without --keep-failed / --no-parity, or load it without "
                                 "require_parity")
    if passed is False:
        warnings.warn(f"{str(directory)!r} failed its parity check at conversion (manifest.json: parity.passed is "
                      f"false; it was kept with --keep-failed): see {directory / 'parity.json'}",
                      ParityFailedWarning, stacklevel=2)
    if session_options is not None and not isinstance(session_options, ort.SessionOptions):
        raise ToolkitError(f"session_options must be an onnxruntime.SessionOptions, got "
                           f"{type(session_options).__name__}", hint="so = onnxruntime.SessionOptions(); ...")
    so = ort.SessionOptions() if session_options is None else session_options
    if threads is not None:
        so.intra_op_num_threads = ops.checked_threads(threads)
    lib = manifest.get("op_library")
    available = ort.get_available_providers()
    if lib:
        path = directory / lib["file"]
        if not path.is_file():
            raise OpLibraryError(f"the bundle's op library {path} is missing",
                                 hint="copy the whole bundle directory, or convert the model again")
        if sha256(path) != lib["sha256"]:
            raise OpLibraryError(
                f"{path} does not match the SHA-256 in {directory / MANIFEST}: the library was replaced "
                "after conversion, so the parity report no longer describes it",
                hint="restore the bundled library or convert the model again",
            )
        have = ops.ort_api_version()
        if have < lib["min_ort_api_version"]:
            raise OpLibraryError(
                f"onnxruntime {ort.__version__} (C API {have}) is too old for {path}, which needs C API >= "
                f"{lib['min_ort_api_version']}",
                hint=f"pip install 'onnxruntime>=1.{lib['min_ort_api_version']}'",
            )
        registered = _registration_path(path, lib["sha256"])
        try:
            so.register_custom_ops_library(str(registered))
        except Exception as exc:
            raise OpLibraryError(f"onnxruntime could not register {path}: {exc}",
                                 hint="the library was built for another platform; convert on this one") from exc
        wanted = lib.get("providers", ["CPUExecutionProvider"])
    else:
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if providers is None:
        providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    model_path = directory / manifest["model"]
    _check_model_files(manifest, directory, model_path)
    try:
        kv = manifest.get("kv_cache")
        return _session_class()(str(model_path), so, providers=providers,
                                right_padded=isinstance(kv, dict) and kv.get("right_padded") is True)
    except Exception as exc:
        # The same diagnosis as a bare .onnx file (corrupt, truncated, invalid graph);
        # else ORT's own reason, named.
        from toolkit.errors import InvalidModelError
        from toolkit.parity import load_onnx

        load_onnx(model_path)
        # ORT's message starts with the model's path, which can be long: keep its reason
        reason = " ".join(str(exc).replace(str(model_path), "the model").split())
        if session_options is not None and "already set in registry" in reason:
            raise ToolkitError(
                f"the session_options passed to load({str(directory)!r}) already hold a registered op library "
                "(from an earlier load): ONNX Runtime registers one per SessionOptions object",
                hint="pass a new onnxruntime.SessionOptions to each load") from exc
        reason = reason if len(reason) <= 600 else reason[:300] + " ... " + reason[-290:]
        newer = "ir version" in reason.lower() or "opset" in reason.lower()
        raise InvalidModelError(
            f"onnxruntime {ort.__version__} could not load {model_path}: {reason}",
            hint=("the model is newer than this onnxruntime reads: upgrade onnxruntime, or convert with an older "
                  "--opset (20 for ONNX Runtime 1.17)") if newer else
            "convert the model again; check `toolkit inspect` on it") from exc
