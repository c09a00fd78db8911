"""Calibration runs shared by the passes that fit to activations (``low-rank``, ``low-rank-kv``).

A pass that needs activations declares its options as a subclass of
:class:`CalibrationOptions` (``calibration_data``, ``calibration_samples``,
``calibration_seq_len``, ``seed``), builds inputs with :func:`feeds` and runs the
graph with some intermediate values exposed as outputs with :func:`run_exposed`.

Inputs are filled by name: ``input_ids`` from ``calibration_data`` (an ``.npy`` of
int64 token ids ``[B, S]``, unpadded) or random tokens below the vocabulary size,
``attention_mask`` with ones, ``position_ids`` with ``0..S-1`` (sequences cut to a fixed-capacity cache), ``token_type_ids``
(BERT-style encoders) with zeros, ``past_key_values.*`` empty (a prefill),
``sampling_seed`` (a sampled head) with zero, other float inputs with standard-normal
values. Anything else is an error naming the input.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from passes.registry import PassOptions
from toolkit.errors import PassError

DOMAIN = "com.toolkit"


@dataclasses.dataclass(frozen=True)
class CalibrationOptions(PassOptions):
    """Options of the calibration inputs; subclasses add their own and call :meth:`validate_calibration`."""

    calibration_data: str = dataclasses.field(
        default="", metadata={"help": ".npy of int64 token ids [B, S] for calibration ('' = random tokens)"})
    calibration_samples: int = dataclasses.field(
        default=4, metadata={"help": "sequences of random calibration tokens (without calibration_data)"})
    calibration_seq_len: int = dataclasses.field(
        default=64, metadata={"help": "length of random calibration sequences"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of random calibration inputs"})

    def validate_calibration(self, pass_name: str, extra: tuple[str, ...] = ()) -> None:
        """Positive counts (``calibration_samples``, ``calibration_seq_len`` and ``extra``)."""
        for name in ("calibration_samples", "calibration_seq_len") + extra:
            if getattr(self, name) < 1:
                raise PassError(f"{pass_name} option {name} must be >= 1, got {getattr(self, name)!r}",
                                hint=f"e.g. --pass-option {pass_name}.{name}=8")
        if self.calibration_data:  # read now: before the (slow) export, not after it
            read_tokens(self.calibration_data, pass_name)


def read_tokens(path: str, pass_name: str) -> np.ndarray:
    """The token ids [B, S] of a calibration ``.npy`` file, checked: one integer array
    (or integral floats) of non-negative ids, 1-D (one sequence) or 2-D. Anything else,
    an empty, truncated, pickled or ``.npz`` file included, is a PassError naming it."""
    hint = "save one 2-D int64 array of token ids: np.save(path, ids) with ids of shape [B, S]"
    where = f"{pass_name}: calibration_data {path!r}"
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001  (EOFError, ValueError, OSError, UnpicklingError: all "unreadable")
        raise PassError(f"{where} cannot be read as an .npy array ({type(err).__name__}: {err})", hint=hint) from None
    if not isinstance(loaded, np.ndarray):  # np.savez wrote an archive
        loaded.close()
        raise PassError(f"{where} is an .npz archive of several arrays, not one .npy array", hint=hint)
    if loaded.dtype.kind in "f" and np.all(np.isfinite(loaded)) and np.all(loaded == np.round(loaded)):
        loaded = loaded.astype(np.int64)  # integral floats
    if loaded.dtype.kind not in "iu":
        raise PassError(f"{where} holds {loaded.dtype} values, not integer token ids", hint=hint)
    tokens = loaded.astype(np.int64)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.size == 0:
        raise PassError(f"{where} has shape {list(loaded.shape)}, expected token ids [B, S]",
                        hint="save a 2-D int64 array, e.g. np.save(path, ids[None])")
    if tokens.min() < 0:
        raise PassError(f"{where} holds a negative token id ({int(tokens.min())}); Gather would wrap it around "
                        "the vocabulary", hint=hint)
    return tokens


def vocab_size(proto: Any, pass_name: str) -> int:
    """The vocabulary size: the last dim of a ``logits`` output, else the embedding's rows."""
    for out in proto.graph.output:
        if out.name == "logits":
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 3 and dims[2].HasField("dim_value"):
                return int(dims[2].dim_value)
    for init in proto.graph.initializer:
        if "embed" in init.name and len(init.dims) == 2:
            return int(init.dims[0])
    raise PassError(f"{pass_name}: cannot tell the vocabulary size for random calibration tokens",
                    hint="pass calibration_data=<.npy of token ids>")


def _tokens(proto: Any, options: CalibrationOptions, pass_name: str, rng: np.random.Generator) -> np.ndarray | None:
    if options.calibration_data:
        tokens = read_tokens(options.calibration_data, pass_name)
        if any(i.name == "input_ids" for i in proto.graph.input):
            try:
                vocab = vocab_size(proto, pass_name)
            except PassError:
                vocab = None
            if vocab is not None and tokens.max() >= vocab:
                raise PassError(f"{pass_name}: calibration_data {options.calibration_data!r} holds token id "
                                f"{int(tokens.max())}, not below the model's vocabulary of {vocab}",
                                hint="tokenize the calibration text with this model's tokenizer")
        return tokens
    if any(i.name == "input_ids" for i in proto.graph.input):
        vocab = vocab_size(proto, pass_name)
        return rng.integers(0, vocab, size=(options.calibration_samples, options.calibration_seq_len),
                            dtype=np.int64)
    return None


def _cache_room(proto: Any) -> int | None:
    """Tokens a prefill can put in a fixed-capacity quantized cache (its quantized slots
    plus the residual ones, as the kv-cache pass recorded them), or None."""
    import json

    for prop in proto.metadata_props:
        if prop.key == "toolkit.kv_quant":
            info = json.loads(prop.value)
            if info.get("capacity"):
                return int(info["capacity"]) + int(info.get("residual_slots", 0))
    return None


def feeds(proto: Any, options: CalibrationOptions, pass_name: str) -> dict[str, np.ndarray]:
    """Inputs of one calibration run of ``proto`` (a ``ModelProto``); see the module doc."""
    from onnx import helper

    rng = np.random.default_rng(options.seed)
    tokens = _tokens(proto, options, pass_name, rng)
    limit = _cache_room(proto)
    if tokens is not None and limit is not None and tokens.shape[1] > limit:
        tokens = tokens[:, :limit]  # a prefill longer than a fixed-capacity cache would not fit it
    batch, seq = tokens.shape if tokens is not None else (options.calibration_samples, options.calibration_seq_len)
    init_names = {i.name for i in proto.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for info in proto.graph.input:
        name = info.name
        if name in init_names:
            continue
        t = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        np_dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if name == "input_ids":
            out[name] = tokens
        elif name == "attention_mask":
            out[name] = np.ones((batch, seq), np_dtype)
        elif name == "position_ids":
            out[name] = np.broadcast_to(np.arange(seq, dtype=np_dtype), (batch, seq)).copy()
        elif name == "token_type_ids":  # BERT-style encoders: one segment per calibration sequence
            out[name] = np.zeros((batch, seq), np_dtype)
        elif name.startswith("past_key_values"):
            # An empty cache for the prefill, as OnnxDecoder.empty_past builds it: dynamic
            # dims (the past length) 0, static ones kept (heads, head dim, and a fixed
            # capacity, whose slots the zero lengths mark empty), dim 0 the batch; a
            # fixed-capacity cache's lengths input ([2]) is all zeros.
            shape = [d if d is not None else 0 for d in dims]
            if len(shape) > 1:
                shape[0] = batch
            out[name] = np.zeros(shape, np_dtype)
        elif name == "sampling_seed":  # a sampled head's draw does not matter here
            out[name] = np.zeros([1], np_dtype)
        elif np.issubdtype(np_dtype, np.floating):
            shape = [d if d is not None else (batch if i == 0 else seq) for i, d in enumerate(dims)]
            out[name] = rng.standard_normal(shape).astype(np_dtype)
        else:
            raise PassError(f"{pass_name}: cannot build a calibration value for graph input {name!r} ({np_dtype})",
                            hint="calibration fills decoders (input_ids, attention_mask, position_ids, past), "
                            "encoders (input_ids, attention_mask, token_type_ids) and graphs with float inputs")
    return out


# Calibration sequences run in batches of at most this many tokens: a whole [64, 1024]
# file in one run needed 2 GiB for one layer's attention scores alone (ORT's arena,
# on top of the exposed activations) and failed; the values are the same either way.
CHUNK_TOKENS = 4096
_BATCH_FIRST = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def _batch_chunks(inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``inputs`` split along the batch into runs of at most CHUNK_TOKENS tokens (one run
    when it fits, or for graphs without token ids). Batch-first inputs are sliced: the
    token inputs and the empty past (not a fixed-capacity cache's ``lengths``)."""
    ids = inputs.get("input_ids")
    if ids is None or ids.ndim != 2:
        return [inputs]
    batch, seq = ids.shape
    rows = max(1, CHUNK_TOKENS // max(seq, 1))
    if batch <= rows:
        return [inputs]

    def sliced(name: str, value: np.ndarray, a: int, b: int) -> np.ndarray:
        batch_first = name in _BATCH_FIRST or (name.startswith("past_key_values") and not name.endswith(".lengths"))
        return value[a:b] if batch_first and value.ndim >= 1 and value.shape[0] == batch else value

    return [{n: sliced(n, v, a, min(a + rows, batch)) for n, v in inputs.items()} for a in range(0, batch, rows)]


_SCRATCH: contextvars.ContextVar[str | None] = contextvars.ContextVar("calibration_scratch", default=None)


@contextlib.contextmanager
def scratch_directory(path: str | Path) -> Iterator[None]:
    """``with scratch_directory(DIR):`` the temporary copy of a model past 2 GiB that a
    calibration run writes (:func:`_session`: the whole model with its weights) goes
    under ``DIR`` instead of the system temp directory. ``toolkit convert`` passes its
    staging directory, beside the output: ``$TMPDIR`` is often a small tmpfs (RAM)
    where a multi-GB copy failed or crowded out memory, while the output's file system
    has room for the model by construction. Without it (the passes called from Python)
    the system temp directory is used."""
    token = _SCRATCH.set(str(path))
    try:
        yield
    finally:
        _SCRATCH.reset(token)


def _session(proto: Any, so: Any) -> Any:
    """An ORT session of ``proto`` (a copy the caller gives up): from its bytes, or past
    protobuf's 2 GiB limit from a temporary file with external data (ORT has read or
    mapped the weights when the session exists, so the file can go), in a temporary
    directory under :func:`scratch_directory`'s (else the system temp directory),
    removed on success and error alike."""
    import onnxruntime as ort

    from toolkit.checker import too_large_to_serialize

    if not too_large_to_serialize(proto):
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="toolkit-calibration-", dir=_SCRATCH.get()) as tmp:
        path = f"{tmp}/model.onnx"
        # (onnx refuses a location that exists relative to the current directory, not
        # to the model's: a name of the directory's own, which no other file has)
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{Path(tmp).name}.data", size_threshold=1024)
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_exposed(model: ir.Model, names: list[str], options: CalibrationOptions, pass_name: str,
                threads: int | None = None,
                per_batch: Callable[[dict[str, np.ndarray], int], None] | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` (unchanged) on calibration inputs; return the float32 values ``names``.

    The values are exposed as extra graph outputs of a serialized copy; graph
    optimisations are off so every named value still exists. Custom ops of ours are
    run with the op library. With ``per_batch``, each batch's values are handed to it
    (with the number of batches) as they come and nothing is returned (``{}``), so a
    caller that keeps statistics never holds every activation at once.
    """
    import onnxruntime as ort
    from onnx import helper

    proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    for name in dict.fromkeys(names):
        if name not in existing:
            proto.graph.output.append(helper.make_tensor_value_info(name, 1, None))  # float32
            existing.add(name)
    inputs = feeds(proto, options, pass_name)
    if any(n.domain == DOMAIN for n in proto.graph.node):
        from toolkit import ops

        so = ops.session_options(threads)
    else:
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Errors only: ORT warns once per initializer the graph under rewrite no longer uses
    # ("Removing initializer ..."), dozens of lines in the middle of the progress bars;
    # the passes' cleanup removes them from the written model.
    so.log_severity_level = 3
    wanted = list(dict.fromkeys(names))

    def failure(err: Exception) -> PassError:
        tokens = inputs["input_ids"].shape if "input_ids" in inputs else None
        memory = any(w in str(err).lower() for w in ("allocate", "memory", "bad_alloc"))
        hint = (f"the {'x'.join(map(str, tokens)) if tokens else 'whole'} calibration input runs in batches of "
                f"{CHUNK_TOKENS} tokens: use fewer or shorter calibration sequences" if memory else
                "check calibration_data (token ids within the vocabulary) or use random tokens")
        return PassError(f"{pass_name}: the calibration run of the graph failed: {err}", hint=hint)

    try:
        session = _session(proto, so)
    except Exception as err:  # ORT raises its own pybind exception types
        raise failure(err) from err
    batches = _batch_chunks(inputs)
    parts = []
    for batch in batches:
        try:
            values = session.run(wanted, batch)
        except Exception as err:  # (only ORT's errors: the caller's own are not relabelled)
            raise failure(err) from err
        if per_batch is not None:
            per_batch(dict(zip(wanted, values)), len(batches))
        else:
            parts.append(values)
    if per_batch is not None:
        return {}
    if len(parts) == 1:
        return dict(zip(wanted, parts[0]))
    return {name: np.concatenate([p[i] for p in parts], axis=0) for i, name in enumerate(wanted)}
