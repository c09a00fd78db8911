"""The pass pipeline: THE order in which graph passes run.

Mirrors onnxscript's ``ort_fusions/_core.py``: one explicit list, counts per pass,
and a comment on every ordering dependency. After each pass the model is validated
(:func:`validate_model`); an invalid graph raises :class:`PassError` naming the pass
and the failing node, so a broken rewrite is caught where it happens rather than at
session creation.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from passes.registry import PassResult, check_pass_names, get_pass
from toolkit.checker import check_model
from toolkit.errors import PassError

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir

PIPELINE_ORDER: tuple[str, ...] = (
    # Fusions first. fuse-softmax-topk needs the Softmax/TopK nodes as exported; a
    # future pass that rewrites Softmax (e.g. an attention fusion that swallows its
    # Softmax) must run after it, or it would hide the router/sampling Softmax.
    "fuse-softmax-topk",
    # kv-cache swallows each attention's Softmax into QuantKVAttention. Independent of
    # fuse-softmax-topk (an attention Softmax never feeds a TopK). Before low-rank, so
    # low-rank's calibration run already uses the quantized cache. It changes the
    # cache I/O, so it is opt-in (`convert --kv-cache`).
    "kv-cache",
    # sampling-head appends its own FusedSoftmaxTopK to the logits; running it after
    # the fusion keeps its report free of the head it adds. It changes the model's
    # outputs, so it is opt-in (not in DEFAULT_PASSES).
    "sampling-head",
    # low-rank replaces constant-weight MatMul(+Add) by LowRankMatMul. It runs after
    # the fusions (none of them looks at these MatMuls, and its calibration run of
    # the graph then sees their ops too) and before portable, which must attach a
    # body to the LowRankMatMul nodes it adds, and cleanup, which drops the dense
    # weights it leaves unused. Opt-in: it changes the numbers (lossy by design).
    "low-rank",
    # low-rank-kv replaces each attention's key/value cache by a rank-r latent (and the
    # Concat -> repeat_kv -> MatMul -> Softmax -> MatMul core around it). After low-rank:
    # low-rank's calibration feeds past tensors in the [B, H, P, D] layout, which the
    # latent [B, P, r] inputs no longer have, and low-rank-kv then calibrates its bases on
    # the factored projections. After kv-cache, so that combining the two (not supported
    # yet: quantizing the latent) stops with a clear error here instead of kv-cache
    # silently finding no cache to quantize. Before portable and cleanup (it leaves the
    # old cache's shape arithmetic dead). Opt-in: it changes the cache I/O and is lossy.
    "low-rank-kv",
    # float16 converts what the passes above leave in float32 (their com.toolkit ops that
    # take float32 stay float32 islands), so it runs after all of them; before portable,
    # whose function bodies the converter would not convert. Opt-in: it changes the numbers.
    "float16",
    # portable attaches a standard-ONNX body to every com.toolkit op present, so it
    # runs after every pass that inserts such ops. Opt-in (it grows the model).
    "portable",
    # cleanup must run last: every fusion may leave dead nodes and initializers
    # behind (e.g. a Div constant folded into `temperature`), and it drops opset
    # imports that no node uses after the rewrites.
    "cleanup",
)

# Passes that run when the caller names none: those that keep the model's I/O.
DEFAULT_PASSES: tuple[str, ...] = tuple(
    p for p in PIPELINE_ORDER
    if p not in ("sampling-head", "kv-cache", "low-rank", "low-rank-kv", "float16", "portable"))


@dataclasses.dataclass
class PipelineReport:
    """Per-pass results of :func:`run_pipeline`, in the order the passes ran."""

    results: list[PassResult] = dataclasses.field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Pass name -> number of rewrites."""
        return {r.name: r.count for r in self.results}

    @property
    def order(self) -> list[str]:
        """Names of the passes that ran, in order."""
        return [r.name for r in self.results]

    def __getitem__(self, name: str) -> PassResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"passes": [dataclasses.asdict(r) for r in self.results]}

    def to_text(self) -> str:
        """Human-readable summary, with explanations when they were recorded."""
        lines = []
        for r in self.results:
            lines.append(f"{r.name}: {r.count}")
            lines.extend(f"    {line}" for line in r.explanations)
        return "\n".join(lines)


def _to_ir(model: onnx.ModelProto | ir.Model, consume: bool = False) -> ir.Model:
    """``model`` as onnx_ir, a copy (the caller's model is never modified), except with
    ``consume``: a ModelProto the caller gives up is wrapped, its weights shared."""
    import onnx
    import onnx_ir as ir

    if consume and isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return ir.serde.deserialize_model(copy)


# Initializers at least this large are left out of the copy a pass's output is checked
# on (a placeholder with their type and shape stands in), once the weights add up to
# protobuf's limit: the copy would hold the weights a second time only to be stripped.
_PLACEHOLDER_BYTES = 1 << 16


def _checkable_proto(ir_model: ir.Model) -> onnx.ModelProto:
    """``ir_model`` serialized for the checker; past protobuf's 2 GiB limit, its large
    initializers are placeholders (external-data references with their dtype and shape,
    which :func:`toolkit.checker.check_model` checks as typed inputs) instead of copies."""
    import onnx_ir as ir

    from toolkit.checker import exceeds_protobuf_limit

    weights = [v for v in ir_model.graph.initializers.values() if v.const_value is not None]
    if not exceeds_protobuf_limit(sum(v.const_value.nbytes for v in weights)):
        return ir.serde.serialize_model(ir_model)
    saved = {}
    try:
        for v in weights:
            if v.const_value.nbytes >= _PLACEHOLDER_BYTES:
                saved[v] = v.const_value
                v.const_value = ir.ExternalTensor("toolkit-checker-placeholder", offset=0, length=saved[v].nbytes,
                                                  dtype=saved[v].dtype, shape=saved[v].shape, name=v.name)
        return ir.serde.serialize_model(ir_model)
    finally:
        for v, tensor in saved.items():
            v.const_value = tensor


def _find_dangling_input(graph: onnx.GraphProto, outer: set[str]) -> tuple[Any, str] | None:
    """(node, input name) of the first node input that nothing produces before it."""
    available = set(outer)
    available.update(i.name for i in graph.input)
    available.update(i.name for i in graph.initializer)
    available.update(i.name for i in graph.sparse_initializer)
    for node in graph.node:
        for name in node.input:
            if name and name not in available:
                return node, name
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                found = _find_dangling_input(sub, available)
                if found is not None:
                    return found
        available.update(o for o in node.output if o)
    return None


def _checker_failing_node(model: onnx.ModelProto) -> Any | None:
    """The first top-level node that onnx's node checker rejects, if any."""
    import onnx

    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
    from toolkit.checker import is_runtime_only

    for node in model.graph.node:
        if is_runtime_only(node):  # (onnx has no schema for it: not the culprit)
            continue
        try:
            onnx.checker.check_node(node, ctx)
        except onnx.checker.ValidationError:
            return node
    return None


def _node_label(node: Any) -> str:
    op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
    return f"node {node.name or '<unnamed>'} ({op})"


def validate_model(model: onnx.ModelProto, pass_name: str) -> None:
    """Check ``model`` as produced by ``pass_name``.

    Checks that every node input is produced (by a graph input, an initializer or an
    earlier node), then runs ``onnx.checker.check_model(full_check=False)`` (through
    :func:`toolkit.checker.check_model`, which leaves ONNX Runtime's own standard-domain
    ops such as SimplifiedLayerNormalization to ONNX Runtime).

    Raises:
        PassError: naming the pass and, where it can be found, the failing node.
    """
    import onnx

    found = _find_dangling_input(model.graph, set())
    if found is not None:
        node, name = found
        raise PassError(
            f"pass {pass_name!r} produced an invalid graph: input {name!r} of "
            f"{_node_label(node)} is not produced by any node, graph input or initializer",
            hint=f"this is a bug in pass {pass_name!r}; rerun without it "
            f"(leave it out of the pass list) and report the model",
        )
    try:
        check_model(model, full_check=False)
    except onnx.checker.ValidationError as err:
        node = _checker_failing_node(model)
        where = f" at {_node_label(node)}" if node is not None else ""
        raise PassError(
            f"pass {pass_name!r} produced a model that fails onnx.checker{where}: {err}",
            hint=f"this is a bug in pass {pass_name!r}; rerun without it and report the model",
        ) from err


def resolve_pass_names(names: list[str] | None) -> list[str]:
    """The passes to run, in pipeline order (``None`` -> the default set)."""
    if names is None:
        return list(DEFAULT_PASSES)
    check_pass_names(list(names))
    requested = set(names)
    return [name for name in PIPELINE_ORDER if name in requested]


def _refuse_invalid_input(model: onnx.ModelProto | ir.Model) -> None:
    """Raises a PassError naming the input model when it fails onnx's full check
    (checker and strict shape inference), e.g. a TopK asking for more elements than
    its axis has; returns when the input is valid."""
    import onnx
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    try:
        check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0][:400]
        raise PassError(f"the input model is invalid before any pass ran: {first}",
                        hint="fix the model (onnx.checker.check_model(model, full_check=True) reports it), "
                        "then run the passes again") from None


def run_pipeline(
    model: onnx.ModelProto | ir.Model,
    names: list[str] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    explain: bool = False,
    consume: bool = False,
) -> tuple[onnx.ModelProto, PipelineReport]:
    """Run the requested passes in pipeline order.

    Args:
        model: The model; it is copied, never modified.
        consume: The caller gives ``model`` (a ModelProto) up: its weights are shared
            with the passes' working copy instead of copied (convert of a large model
            holds one copy fewer); do not use it afterwards.
        names: Passes to run (any order, duplicates ignored); ``None`` runs the
            default set ``DEFAULT_PASSES``.
        options: ``{pass name: {option: value}}``; values may be strings (from the
            CLI) and are converted to the option's type.
        explain: Record, per pass, why candidate nodes did not match.

    Returns:
        The rewritten model and the per-pass report.

    Raises:
        PassError: unknown pass name (lists the known ones), invalid options, or a
            pass produced an invalid model (names the pass and node).
    """
    import onnx
    import onnx_ir as ir

    if not isinstance(model, (onnx.ModelProto, ir.Model)):
        raise PassError(f"run_pipeline takes an onnx.ModelProto or an onnx_ir.Model, got {type(model).__name__} "
                        f"{str(model)[:80]!r}", hint="load a file first: run_pipeline(onnx.load(path), ...)")
    selected = resolve_pass_names(names)
    options = dict(options or {})
    check_pass_names(list(options))
    # Build and validate every pass's options before touching the model, so a typo
    # in the last pass's options does not cost a run of the first passes.
    graph_passes = [get_pass(name) for name in selected]
    pass_options = [p.make_options(options.get(p.name)) for p in graph_passes]

    ir_model = _to_ir(model, consume=consume)
    report = PipelineReport()
    for graph_pass, opts in zip(graph_passes, pass_options):
        result = graph_pass.apply(ir_model, opts, explain=explain)
        try:
            validate_model(_checkable_proto(ir_model), graph_pass.name)
        except PassError:
            _refuse_invalid_input(model)  # an input that was invalid already is not the pass's bug
            raise
        report.results.append(result)
    return ir.serde.serialize_model(ir_model), report
