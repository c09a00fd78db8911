"""PyTorch → ONNX export with a flat key/value cache (torch.onnx dynamo exporter).

The exported graph has the I/O layout used by onnxruntime-genai and Optimum:

* inputs ``input_ids [B, S]``, ``attention_mask [B, P+S]``, ``position_ids [B, S]``,
  ``past_key_values.{i}.key/value [B, kv_heads, P, head_dim]``;
* outputs ``logits [B, S, V]``, ``present.{i}.key/value [B, kv_heads, P+S, head_dim]``.

Batch, sequence and past length are dynamic. A prefill step feeds P = 0 (empty
past tensors). The exporter needs eager attention and a ``*past`` argument whose
``dynamic_shapes`` entry is a tuple (see shared/ENVIRONMENT.md).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from toolkit.errors import ExportError
from toolkit.sources import SourceModel

DEFAULT_OPSET = 21
# The dynamo exporter's own opset; lower ones would need a down-conversion it does not do.
MIN_OPSET = 18
# Protobuf cannot hold more than 2 GiB; leave head-room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def _flat_module(src: SourceModel):
    import torch

    class FlatKV(torch.nn.Module):
        """Adapts ``SourceModel.forward`` to flat positional tensors for the exporter."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = src.module

        def forward(self, input_ids, attention_mask, position_ids, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            logits, presents = src.forward(input_ids, attention_mask, position_ids, pairs)
            flat = [t for kv in presents for t in kv]
            return (logits, *flat)

    return FlatKV().eval()


def example_inputs(src: SourceModel, batch: int = 2, seq: int = 3, past: int = 5, seed: int = 0):
    """Example inputs with every dynamic axis > 1 and distinct (avoids 0/1 specialisation)."""
    import torch

    from models import position_ids_from_mask

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, src.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = position_ids_from_mask(mask, seq)
    kv_shape = (batch, src.num_kv_heads, past, src.head_dim)
    flat = []
    for _ in range(src.num_layers):
        flat += [torch.randn(kv_shape, generator=gen), torch.randn(kv_shape, generator=gen)]
    return (ids, mask, pos, *flat)


def _data_dependent_branch(exc: BaseException) -> str | None:
    """``file:line in function`` of the model code that branched on a tensor value, when
    the export failed on a data-dependent guard (torch.export cannot trace that)."""
    import traceback

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ == "GuardOnDataDependentSymNode":
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
            if frames:
                f = frames[-1]
                where = f.filename.split("site-packages/")[-1]
                code = f" (`{f.line.strip()}`)" if f.line else ""
                return f"{where}:{f.lineno} in {f.name}{code}"
            return "the model's forward"
        exc = exc.__cause__ or exc.__context__
    return None


def _explain_export_failure(exc: BaseException) -> str:
    """Pull the unsupported op / module out of an exporter exception, if named."""
    text = str(exc)
    for pattern in (r"(aten::[\w.]+)", r"(torch\.ops\.[\w.]+)", r"node[^\n]*'([^']+)'"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return ""


@contextlib.contextmanager
def _quiet_exporter():
    """Mute what torch.onnx prints on every export that concerns no user: a warning per
    torchvision op it skips registering (torchvision is not a dependency) and pytree's
    LeafSpec deprecation. Export failures still raise, with their own messages."""
    import logging
    import warnings

    # symbolic_shapes: a failed guard logs the whole traced graph (~500 lines) before the
    # exception that export() turns into a named error
    loggers = [logging.getLogger(name) for name in ("torch.onnx._internal.exporter._registration",
                                                    "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    stderr = sys.stderr
    sys.stderr = _DropGraphDumps(stderr)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
            yield
    finally:
        sys.stderr = stderr
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _DropGraphDumps:
    """sys.stderr without the traced graph torch.export prints (``print(e.partial_fx_graph)``,
    hundreds of lines) when tracing fails; everything else goes through."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if "def forward(self" in text and "# File:" in text:
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def export(src: SourceModel, out_path: Path, opset: int = DEFAULT_OPSET) -> Any:
    """Export ``src`` to ``out_path`` (ONNX, external data when over 2 GB).

    Returns:
        The exported ``onnx.ModelProto`` (weights loaded).

    Raises:
        ExportError: naming the failing op or module and what to try.
    """
    import onnx
    import torch

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset} is not supported: the exporter writes opsets {MIN_OPSET} to {newest}",
                          hint=f"pass --opset between {MIN_OPSET} and {newest} (default {DEFAULT_OPSET})")
    module = _flat_module(src)
    args = example_inputs(src)
    dyn = torch.export.Dim.DYNAMIC
    dynamic_shapes = (
        {0: dyn, 1: dyn},
        {0: dyn, 1: dyn},
        {0: dyn, 1: dyn},
        tuple({0: dyn, 2: dyn} for _ in range(2 * src.num_layers)),
    )
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset,
                input_names=input_names(src.num_layers),
                output_names=output_names(src.num_layers),
                dynamic_shapes=dynamic_shapes, optimize=True, verify=False, report=False, verbose=False,
            )
    except Exception as exc:  # the exporter raises a zoo of types; normalise them
        branch = _data_dependent_branch(exc)
        if branch is not None:
            raise ExportError(
                f"torch.onnx export of {src.spec!r} ({src.family}) failed: the model branches on a tensor value at "
                f"{branch}, which torch.export cannot trace into a graph for every input",
                hint="a config option that changes behaviour at run time (e.g. rope_type 'dynamic', which grows "
                "its RoPE table with the sequence) has no static graph: use a static variant (rope_type 'linear' or "
                "'yarn') or open an issue with the model config") from exc
        culprit = _explain_export_failure(exc)
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporter colours its messages
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ExportError(
            f"torch.onnx export of {src.spec!r} ({src.family}) failed"
            + (f" at {culprit}" if culprit else "") + f": {first}",
            hint="use eager attention (no SDPA/flash), avoid data-dependent control flow in forward, "
            "or open an issue with the model config",
        ) from exc
    model = program.model_proto
    got = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), None)
    if got != opset:  # the exporter falls back to its own opset when conversion fails
        raise ExportError(f"torch.onnx wrote opset {got} for {src.spec!r} instead of the requested {opset}",
                          hint=f"pass --opset {got}, or another opset the version converter handles")
    _name_dynamic_dims(model)
    _drop_source_paths(model)
    model.ir_version = minimal_ir_version(model)
    _set_metadata(model, src, opset)
    save_model(model, out_path)
    return model


def minimal_ir_version(model: Any) -> int:
    """The oldest ONNX IR version that can hold ``model``: the one its standard opset
    needs (opset 18: IR 8, 19-20: IR 9, 21-22: IR 10, ...), or IR 10 where a model-local
    function is an overload (an IR 10 feature; the portable pass writes them).

    The exporter stamps IR 10 whatever the opset, and ONNX Runtime refuses a model whose
    IR is newer than it reads: ORT 1.17 reads IR 9, so an opset-20 export it could run
    was refused by its IR stamp alone.
    """
    import onnx

    ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if any(getattr(f, "overload", "") for f in model.functions):
        ir_version = max(ir_version, 10)
    return max(ir_version, 8)  # (model-local functions need IR 8; opset 18 is the oldest we write)


def _drop_source_paths(model: Any) -> None:
    """Drops the exporter's per-node Python stack traces (``pkg.torch.onnx.stack_trace``).

    They hold absolute paths of the exporting machine (its checkout, its virtualenv), so
    the same conversion on two machines gave two model hashes, and they were about 30% of
    a small model's file. The module scopes and FX node names stay (no paths in them).
    """
    from toolkit.parity import all_graphs

    for node in [n for g in all_graphs(model) for n in g.node] + [n for f in model.functions for n in f.node]:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def _drop_ir10_metadata(model: Any) -> None:
    """Removes graph, node and function ``metadata_props`` (fields of ONNX IR 10) from
    a model stamped with an older IR version (opset <= 20), where they do not exist;
    the model-level metadata (``toolkit.*``) is older and stays."""
    from toolkit.parity import all_graphs

    for holder in [*all_graphs(model), *model.functions]:
        del holder.metadata_props[:]
        for node in holder.node:
            del node.metadata_props[:]


def _name_dynamic_dims(model: Any) -> None:
    """Replace the exporter's symbols (``s10``...) by the names genai runtimes use.

    The symbols are read off the inputs whose layout is fixed by the export
    convention, then renamed everywhere in the graph's I/O and value_info.
    """
    wanted = {("input_ids", 0): "batch_size", ("input_ids", 1): "sequence_length",
              ("attention_mask", 0): "batch_size", ("attention_mask", 1): "total_sequence_length",
              ("position_ids", 0): "batch_size", ("position_ids", 1): "sequence_length"}
    rename: dict[str, str] = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        keys = [(vi.name, i) for i in range(len(dims))]
        if vi.name.startswith("past_key_values.") and len(dims) == 4:
            keys = [("input_ids", 0), None, ("past", 2), None]
        for i, key in enumerate(keys):
            name = wanted.get(key) if key != ("past", 2) else "past_sequence_length"
            if name and dims[i].dim_param and dims[i].dim_param not in rename:
                rename[dims[i].dim_param] = name
    symbol = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:  # also inside expressions such as "s69 + s70"
                d.dim_param = symbol.sub(lambda m: rename.get(m.group(0), m.group(0)), d.dim_param)


def _generation_metadata(meta: dict[str, str]) -> dict[str, str]:
    """What a host needs to stop decoding where the source does: the context length
    (positions the model was built for) and the end-of-sequence ids, where the source's
    config states them (``toolkit generate`` reads them; a bundle need not keep its
    source around)."""
    from toolkit.errors import ToolkitError
    from toolkit.genai import source_config

    try:
        config = source_config(meta)
    except ToolkitError:
        return {}
    out = {}
    if config.get("context_length"):
        out["toolkit.context_length"] = str(int(config["context_length"]))
    eos = config.get("eos_token_id")
    if eos is not None:
        out["toolkit.eos_token_ids"] = json.dumps(sorted({int(e) for e in (eos if isinstance(eos, list) else [eos])}))
    return out


def _set_metadata(model: Any, src: SourceModel, opset: int) -> None:
    import onnx

    meta = {
        "toolkit.source": src.spec,
        "toolkit.family": src.family,
        "toolkit.num_layers": str(src.num_layers),
        "toolkit.num_kv_heads": str(src.num_kv_heads),
        "toolkit.head_dim": str(src.head_dim),
        "toolkit.vocab_size": str(src.vocab_size),
        "toolkit.opset": str(opset),
        "toolkit.kv_cache": "fp32",
        "toolkit.preset": src.preset or "",
        "toolkit.seed": str(src.seed),
        "toolkit.config_overrides": json.dumps(src.overrides, sort_keys=True),
    }
    meta.update(_generation_metadata(meta))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def save_model(model: Any, out_path: Path, keep_weights: bool = True) -> None:
    """Save an ONNX model, with weights as external data when the model is large.

    The caller is responsible for atomicity (write into a temporary directory and
    rename); this function writes ``out_path`` and, for large models,
    ``out_path.name + ".data"`` beside it. ``model`` keeps its weights in memory either
    way, unless ``keep_weights`` is false: a large model's tensors then only name the
    ``.data`` file (a caller that only reads the graph saves a copy of the weights).
    """
    import onnx

    out_path = Path(out_path)
    if model.ir_version < 10:
        _drop_ir10_metadata(model)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        from onnx.external_data_helper import set_external_data

        from toolkit.parity import all_graphs

        # The tensors are marked here rather than by onnx.save_model(location=...), which
        # refuses a location that exists relative to the current directory, not to the
        # model's: `export -o m.onnx --overwrite` run beside a large m.onnx failed with
        # FileExistsError (the new model is written into a fresh staging directory).
        for graph in all_graphs(model):
            for tensor in graph.initializer:
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                    set_external_data(tensor, out_path.name + ".data")
        onnx.save_model(model, str(out_path))
        # onnx.save_model moved the weights out of `model` (its tensors now only name
        # out_path's .data file): read them back, so the caller still holds a whole model
        # (convert runs its passes on it and saves it again beside another name, then
        # deletes this file; with bare references it published a model with no weights).
        if keep_weights:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(out_path.parent))
    else:
        onnx.save_model(model, str(out_path))
