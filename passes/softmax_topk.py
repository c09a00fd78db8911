"""Fuse Softmax/LogSoftmax + TopK into ``com.toolkit.FusedSoftmaxTopK`` (opset 1).

The fused operator (implemented in C++ under ``custom_ops/``) computes, on the
last axis of ``logits`` only::

    normalize=0, log_probs=0:  TopK(Softmax(logits / temperature), k)      sampling head
    normalize=0, log_probs=1:  TopK(LogSoftmax(logits / temperature), k)   beam search
    normalize=1:               v, i = TopK(logits, k); Softmax(v / temperature)
                               the MoE router (Mixtral / Qwen-MoE "top-k then softmax")

outputs ``values`` (dtype of ``logits``), ``indices`` (int64), optional
``log_normalizer`` (never used by these rules). ``TopK`` must be ``largest=1,
sorted=1`` on the last axis; ties resolve to the lower index, as ONNX TopK does.

Rules (onnxscript rewriter, ``RewriteRuleClassBase``):

* :class:`SoftmaxTopKFusion` -- ``Softmax -> TopK`` (normalize=0) and
  ``LogSoftmax -> TopK`` (log_probs=1), optionally with ``Div(x, c)`` /
  ``Mul(x, c)`` by a positive constant scalar folded into ``temperature``, and
  optionally with an exact Cast to float32 between Softmax and TopK (the dynamo
  exporter's form of ``softmax(fp16, dtype=torch.float)``), moved after the fused op.
  A ``Cast`` to float32 before the Softmax (fp16 logits upcast) stays where it is:
  ``x`` binds to the Cast's output, so the fused op runs in float32 like the
  original graph did.
* :class:`TopKSoftmaxRouterFusion` -- ``TopK -> [Cast] -> Softmax(values)``
  (normalize=1); ``indices`` may be used anywhere, ``values`` only by the Softmax.
  A widening Cast between TopK and Softmax (``softmax(w, dtype=torch.float)``) is
  moved before the fused op: casting fp16 -> fp32 is exact and monotonic, so TopK
  picks the same indices.
* :class:`RenormalizedTopKFusion` -- ``Fused(normalize=0) -> Div(v, ReduceSum(v,
  -1, keepdims))`` (HF Mixtral / Qwen2-MoE ``norm_topk_prob``: softmax, top-k,
  then renormalise) becomes ``normalize=1``: exp(x_i)/sum_{j in topk} exp(x_j) is
  exactly the softmax over the k largest logits, on every row without NaN or +inf. On
  such a row the weights are NaN either way, but the original's softmax row is all NaN
  (its TopK returns 0..k-1) while the fused op ranks the raw logits (NaN / +inf first).
  It rewrites the output of the first rule, so it is listed after it in the same rule
  set (see ``_rules``).

Every ``check`` says why a candidate is rejected (``MatchResult().fail``); the
pipeline shows those reasons with ``explain=True``. The rules use
``remove_nodes=False`` so that the "intermediate value is used elsewhere" case
reaches ``check`` and gets a precise reason instead of the matcher's generic one;
the rule set removes the dead nodes after rewriting.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern as rw

from passes.registry import GraphPass, PassOptions, PassResult
from passes.rule_application import apply_rules, describe_node
from toolkit.errors import PassError

DOMAIN = "com.toolkit"
OP_TYPE = "FusedSoftmaxTopK"
OPSET_VERSION = 1

_FUSED_INPUT_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
# Source dtypes whose conversion to float32 is exact (so it preserves order and ties).
_EXACT_TO_FLOAT32 = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT})


@dataclasses.dataclass(frozen=True)
class SoftmaxTopKOptions(PassOptions):
    """Options of ``fuse-softmax-topk``."""

    enable_router_form: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "also fuse the MoE-router forms TopK->Softmax and "
            "Softmax->TopK->renormalise (normalize=1)"
        },
    )
    fold_temperature: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "fold Div/Mul by a positive constant scalar before the Softmax "
            "into the temperature attribute"
        },
    )
    max_k: int | None = dataclasses.field(
        default=None,
        metadata={"help": "only fuse TopK with K <= max_k (the kernel's limit); None = any K"},
    )

    def validate(self) -> None:
        for name in ("enable_router_form", "fold_temperature"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise PassError(
                    f"fuse-softmax-topk option {name!r} must be a bool, got {value!r}",
                    hint=f"set {name}=true or {name}=false",
                )
        if self.max_k is not None and (
            isinstance(self.max_k, bool) or not isinstance(self.max_k, int) or self.max_k < 1
        ):
            raise PassError(
                f"fuse-softmax-topk option 'max_k' must be a positive int or None, "
                f"got {self.max_k!r}",
                hint="use max_k=None to fuse any K, or the largest K the kernel supports, "
                "e.g. max_k=64",
            )


# --------------------------------------------------------------------------- helpers


def _fail(reason: str, source: ir.Node | ir.Value | None = None) -> rw.MatchResult:
    return rw.MatchResult().fail(reason, source)


def _opset_version(model: ir.Model, domain: str = "") -> int:
    return model.graph.opset_imports.get(domain, model.opset_imports.get(domain, 0)) or 0


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _rank(*values: ir.Value | None) -> int | None:
    for value in values:
        if value is not None and value.shape is not None:
            return value.shape.rank()
    return None


def _last_axis_failure(node: ir.Node, axis: int, rank: int | None) -> str | None:
    """None if ``axis`` is provably the last axis, else the reason it is not."""
    if axis == -1:
        return None
    if rank is None:
        return (
            f"{describe_node(node)} uses axis={axis} and the input rank is unknown, "
            "so it cannot be proven to be the last axis (run shape inference, or export "
            "with axis=-1)"
        )
    if axis == rank - 1:
        return None
    return f"{describe_node(node)} reduces axis={axis}, not the last axis of a rank-{rank} input"


def _constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (initializer or Constant), or None if it can vary."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


def _topk_k(topk: ir.Node, k: ir.Value) -> tuple[int | None, str | None]:
    """(K, None) or (None, reason)."""
    array = _constant_array(k)
    if array is None:
        return None, (
            f"K of {describe_node(topk)} (input {k.name!r}) is not a constant; the fused op "
            "needs K as an attribute"
        )
    if array.size != 1:
        return None, f"K of {describe_node(topk)} has {array.size} elements, expected 1"
    return int(array.reshape(-1)[0]), None


def _topk_failure(topk: ir.Node, rank: int | None) -> str | None:
    """Reason the TopK's attributes are not (last axis, largest=1, sorted=1), or None."""
    if (largest := _int_attr(topk, "largest", 1)) != 1:
        return f"{describe_node(topk)} has largest={largest}; the fused op takes the largest k"
    if (is_sorted := _int_attr(topk, "sorted", 1)) != 1:
        return (
            f"{describe_node(topk)} has sorted={is_sorted}; the fused op always sorts, and "
            "code after an unsorted TopK may rely on the unsorted order"
        )
    return _last_axis_failure(topk, _int_attr(topk, "axis", -1), rank)


def _softmax_failure(model: ir.Model, softmax: ir.Node, rank: int | None) -> str | None:
    # Softmax-13 defaults to axis=-1. Softmax-1/11 defaults to axis=1 and flattens the
    # input to 2-D at `axis`, which equals a last-axis softmax only when axis is the
    # last axis -- so the same last-axis test is correct for every opset.
    default_axis = -1 if _opset_version(model) >= 13 else 1
    return _last_axis_failure(softmax, _int_attr(softmax, "axis", default_axis), rank)


def _exclusive_use_failure(value: ir.Value, allowed: set[ir.Node], what: str) -> str | None:
    """Reason ``value`` cannot disappear (graph output / other consumers), or None."""
    if value.is_graph_output():
        return f"{what} {value.name!r} is a graph output, so it must stay materialised"
    others = [node for node, _ in value.uses() if node not in allowed]
    if others:
        names = ", ".join(describe_node(n) for n in others)
        return f"{what} {value.name!r} is also used by {names}"
    return None


def _temperature(scale_kind: str | None, scale: ir.Value | None) -> float:
    """The temperature a checked Div/Mul constant folds into (1.0 without one)."""
    if scale_kind is None:
        return 1.0
    c = float(_constant_array(scale).reshape(-1)[0])
    return c if scale_kind == "Div" else 1.0 / c


# Folding x * c or x / c into the temperature is exact only while x * c cannot leave
# float32's range for logits of any size a model produces (|x| < 2^64 with |log2 c| <= 64).
_MAX_FOLDED_SCALE_LOG2 = 64


def _temperature_failure(scale_kind: str | None, scale: ir.Value | None, rank: int | None) -> str | None:
    """Why the Div/Mul constant cannot fold into the temperature, or None. ``rank``: the
    rank of the logits it scales (None: unknown); a constant of higher rank would
    broadcast them to more axes, which the fused op cannot (a 0-d one never does)."""
    if scale_kind is None:
        return None
    array = _constant_array(scale)
    name = getattr(scale, "name", None)
    if array is None or array.size != 1:
        return f"the {scale_kind} operand {name!r} is not a constant scalar"
    if array.ndim > 0 and (rank is None or array.ndim > rank):
        return (f"the {scale_kind} constant {name!r} has shape {list(array.shape)}, which adds axes to logits of "
                f"rank {rank if rank is not None else 'unknown'}; folding it would drop them")
    c = float(array.reshape(-1)[0])
    if not math.isfinite(c) or c <= 0.0:
        # A non-positive scale reverses (or collapses) the order TopK sees.
        return f"the {scale_kind} constant {c} is not a positive finite number"
    if abs(math.log2(c)) > _MAX_FOLDED_SCALE_LOG2:
        # x * 3e38 overflows float32 in the original graph (a NaN softmax row) and x * 1e-30
        # flushes logits together (ties), where the fused op's (x - max) / T would not
        return (f"the {scale_kind} constant {c!r} scales the logits by more than 2^{_MAX_FOLDED_SCALE_LOG2} either "
                "way: the original graph's scaled logits can overflow or underflow float32 where the fused op's "
                "would not")
    from toolkit.ops.reference import temperature_problem

    if (problem := temperature_problem(_temperature(scale_kind, scale))) is not None:
        return f"the {scale_kind} constant {c!r} cannot fold into the fused op's temperature, which {problem}"
    return None


def _scaled(op, x, scale, scale_kind: str | None):
    """Pattern for ``x``, ``x / scale``, ``x * scale`` or ``scale * x`` (output ``scaled``)."""
    if scale_kind is None:
        return x
    if scale_kind == "Div":
        return op.Div(x, scale, _outputs=["scaled"])
    if scale_kind == "Mul":
        return op.Mul(x, scale, _outputs=["scaled"])
    return op.Mul(scale, x, _outputs=["scaled"])  # "Mul(c, x)"


def _scale_failure(
    scale_kind: str | None, scaled: ir.Value | None, consumer: ir.Node
) -> str | None:
    if scale_kind is None or scaled is None:
        return None
    return _exclusive_use_failure(
        scaled, {consumer}, f"the {scale_kind.split('(')[0]} output folded into temperature"
    )


def _fused(op, x, *, k: int, temperature: float, normalize: int, log_probs: int):
    return op.FusedSoftmaxTopK(
        x,
        k=k,
        temperature=float(temperature),
        normalize=normalize,
        log_probs=log_probs,
        _domain=DOMAIN,
        _version=OPSET_VERSION,
        _outputs=2,
    )


def _k_limit_failure(k: int, max_k: int | None, topk: ir.Node) -> str | None:
    if k < 1:
        return f"{describe_node(topk)} has K={k}; the fused op needs K >= 1"
    if max_k is not None and k > max_k:
        return f"{describe_node(topk)} has K={k} > max_k={max_k}"
    return None


def _fusable_topk_failure(topk: ir.Node, k: ir.Value, rank: int | None, max_k: int | None) -> str | None:
    """Why ``topk`` cannot become part of the fused op (last axis, largest, sorted, constant K)."""
    if (reason := _topk_failure(topk, rank)) is not None:
        return reason
    k_value, reason = _topk_k(topk, k)
    return reason if reason is not None else _k_limit_failure(k_value, max_k, topk)


# --------------------------------------------------------------------------- rules


class SoftmaxTopKFusion(rw.RewriteRuleClassBase):
    """``[Div|Mul by c] -> Softmax|LogSoftmax(last) -> [Cast] -> TopK(K, last)``.

    The optional Cast after the Softmax is the form torch's dynamo exporter emits for
    ``softmax(fp16_logits, dim=-1, dtype=torch.float)``: Softmax in fp16, then Cast to
    float32. That Cast is exact and monotonic, so it moves after the fused op, where it
    converts only the k values.
    """

    def __init__(
        self, *, log_probs: bool, scale_kind: str | None, cast_after: bool, max_k: int | None
    ):
        softmax = "LogSoftmax" if log_probs else "Softmax"
        suffix = ("[Cast]" if cast_after else "") + (f"[{scale_kind}]" if scale_kind else "")
        super().__init__(f"{softmax}TopK{suffix}", remove_nodes=False)
        self._log_probs = log_probs
        self._scale_kind = scale_kind
        self._cast_after = cast_after
        self._max_k = max_k

    def pattern(self, op, x, scale, k, to):
        softmax_input = _scaled(op, x, scale, self._scale_kind)
        softmax = op.LogSoftmax if self._log_probs else op.Softmax
        probs = softmax(softmax_input, _outputs=["probs"])
        if self._cast_after:
            probs = op.Cast(probs, to=to, _outputs=["cast_probs"])
        return op.TopK(probs, k, _outputs=["values", "indices"])

    def check(self, context, x, k, probs, values, to=None, cast_probs=None, scale=None,
              scaled=None, **_):  # fmt: skip
        softmax, topk = probs.producer(), values.producer()
        rank = _rank(x, probs)
        if self._cast_after:
            cast = cast_probs.producer()
            if to.as_int() != ir.DataType.FLOAT or probs.dtype not in _EXACT_TO_FLOAT32:
                return _fail(
                    f"{describe_node(cast)} casts {probs.dtype} to {ir.DataType(to.as_int())}; "
                    "only an exact cast to float32 can be moved after the TopK",
                    cast,
                )
            if reason := _exclusive_use_failure(cast_probs, {topk}, "Cast output"):
                return _fail(reason, cast_probs)
        if (reason := _softmax_failure(context.model, softmax, rank)) is not None:
            return _fail(reason, softmax)
        if (reason := _fusable_topk_failure(topk, k, rank, self._max_k)) is not None:
            return _fail(reason, topk)
        consumer = cast_probs.producer() if self._cast_after else topk
        if reason := _exclusive_use_failure(probs, {consumer}, f"{softmax.op_type} output"):
            return _fail(reason, probs)
        if (reason := _scale_failure(self._scale_kind, scaled, softmax)) is not None:
            return _fail(reason, scaled)
        if (reason := _temperature_failure(self._scale_kind, scale, _rank(x))) is not None:
            return _fail(reason, scale)
        if x.dtype not in _FUSED_INPUT_DTYPES:
            return _fail(
                f"input {x.name!r} of {describe_node(softmax)} has dtype {x.dtype}; the fused "
                "op takes float32 or float16",
                x,
            )
        return rw.MatchResult()

    def rewrite(self, op, x, k, values, scale=None, **_):
        k_value, _reason = _topk_k(values.producer(), k)
        temperature = _temperature(self._scale_kind, scale)
        fused_values, indices = _fused(
            op,
            x,
            k=k_value,
            temperature=temperature,
            normalize=0,
            log_probs=int(self._log_probs),
        )
        if self._cast_after:
            fused_values = op.Cast(fused_values, to=int(ir.DataType.FLOAT))
        return fused_values, indices


class SoftmaxTransposeTopKFusion(rw.RewriteRuleClassBase):
    """``Softmax|LogSoftmax(axis=a) -> Transpose(perm) -> TopK(K, last)`` with ``perm[-1] == a``.

    The softmax axis becomes the last axis after the Transpose (e.g. logits laid out
    ``[B, V, S]``), so the fused op runs on ``Transpose(x)``: the Transpose moves the
    logits instead of the probabilities, and the softmax and top-k become one pass.
    """

    def __init__(self, *, log_probs: bool, max_k: int | None):
        super().__init__(f"{'LogSoftmax' if log_probs else 'Softmax'}TransposeTopK", remove_nodes=False)
        self._log_probs = log_probs
        self._max_k = max_k

    def pattern(self, op, x, k):
        softmax = op.LogSoftmax if self._log_probs else op.Softmax
        probs = softmax(x, _outputs=["probs"])
        moved = op.Transpose(probs, _outputs=["moved"])
        return op.TopK(moved, k, _outputs=["values", "indices"])

    def check(self, context, x, k, probs, moved, values, **_):
        softmax, transpose, topk = probs.producer(), moved.producer(), values.producer()
        rank = _rank(x, probs, moved)
        if rank is None:
            return _fail(f"the rank of {x.name!r} is unknown, so the Transpose cannot be checked", x)
        perm_attr = transpose.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else list(range(rank))[::-1]
        axis = _int_attr(softmax, "axis", -1)
        axis = axis + rank if axis < 0 else axis
        if _opset_version(context.model) < 13:
            return _fail(f"{describe_node(softmax)} is from opset < 13, where it normalises flattened axes",
                         softmax)
        if perm[-1] != axis:
            return _fail(
                f"{describe_node(transpose)} moves axis {perm[-1]} last, but {describe_node(softmax)} "
                f"normalises axis {axis}",
                transpose,
            )
        if (reason := _fusable_topk_failure(topk, k, rank, self._max_k)) is not None:
            return _fail(reason, topk)
        if reason := _exclusive_use_failure(probs, {transpose}, f"{softmax.op_type} output"):
            return _fail(reason, probs)
        if reason := _exclusive_use_failure(moved, {topk}, "Transpose output"):
            return _fail(reason, moved)
        if x.dtype not in _FUSED_INPUT_DTYPES:
            return _fail(f"input {x.name!r} has dtype {x.dtype}; the fused op takes float32 or float16", x)
        return rw.MatchResult()

    def rewrite(self, op, x, k, moved, values, **_):
        k_value, _reason = _topk_k(values.producer(), k)
        perm = moved.producer().attributes.get("perm")
        transposed = op.Transpose(x, perm=list(perm.as_ints())) if perm is not None else op.Transpose(x)
        return _fused(op, transposed, k=k_value, temperature=1.0, normalize=0, log_probs=int(self._log_probs))


class TopKSoftmaxRouterFusion(rw.RewriteRuleClassBase):
    """``[Div|Mul by c] -> TopK(K, last) -> [Cast to float32] -> Softmax(values, last)``."""

    def __init__(self, *, cast: bool, scale_kind: str | None, max_k: int | None):
        suffix = ("[Cast]" if cast else "") + (f"[{scale_kind}]" if scale_kind else "")
        super().__init__(f"TopKSoftmaxRouter{suffix}", remove_nodes=False)
        self._cast = cast
        self._scale_kind = scale_kind
        self._max_k = max_k

    def pattern(self, op, x, scale, k, to):
        topk_input = _scaled(op, x, scale, self._scale_kind)
        values, indices = op.TopK(topk_input, k, _outputs=["topk_values", "indices"])
        softmax_input = op.Cast(values, to=to, _outputs=["cast_values"]) if self._cast else values
        probs = op.Softmax(softmax_input, _outputs=["probs"])
        return probs, indices

    def check(self, context, x, k, probs, topk_values, to=None, cast_values=None,
              scale=None, scaled=None, **_):  # fmt: skip
        softmax, topk = probs.producer(), topk_values.producer()
        rank = _rank(x, topk_values, probs)
        if (reason := _fusable_topk_failure(topk, k, rank, self._max_k)) is not None:
            return _fail(reason, topk)
        if (reason := _softmax_failure(context.model, softmax, rank)) is not None:
            return _fail(reason, softmax)
        consumer = cast_values.producer() if self._cast else softmax
        if (reason := _exclusive_use_failure(topk_values, {consumer}, "TopK values")):
            return _fail(reason, topk_values)
        if self._cast:
            if (reason := _exclusive_use_failure(cast_values, {softmax}, "Cast output")):
                return _fail(reason, cast_values)
            if to.as_int() != ir.DataType.FLOAT or x.dtype not in _EXACT_TO_FLOAT32:
                return _fail(
                    f"{describe_node(consumer)} casts {x.dtype} to "
                    f"{ir.DataType(to.as_int())}; only an exact cast to float32 can be "
                    "moved before the TopK",
                    consumer,
                )
        elif x.dtype not in _FUSED_INPUT_DTYPES:
            return _fail(
                f"input {x.name!r} of {describe_node(topk)} has dtype {x.dtype}; the fused "
                "op takes float32 or float16",
                x,
            )
        if (reason := _scale_failure(self._scale_kind, scaled, topk)) is not None:
            return _fail(reason, scaled)
        if (reason := _temperature_failure(self._scale_kind, scale, _rank(x))) is not None:
            return _fail(reason, scale)
        return rw.MatchResult()

    def rewrite(self, op, x, k, topk_values, scale=None, **_):
        k_value, _reason = _topk_k(topk_values.producer(), k)
        temperature = _temperature(self._scale_kind, scale)
        logits = op.Cast(x, to=int(ir.DataType.FLOAT)) if self._cast else x
        return _fused(op, logits, k=k_value, temperature=temperature, normalize=1, log_probs=0)


class RenormalizedTopKFusion(rw.RewriteRuleClassBase):
    """``FusedSoftmaxTopK(normalize=0) -> [Cast] -> v / ReduceSum(v, [-1], keepdims=1)``.

    The Cast is the one :class:`SoftmaxTopKFusion` moved after the fused op; it stays
    after the new one.
    """

    def __init__(self, *, cast: bool):
        super().__init__(f"RenormalizedSoftmaxTopK{'[Cast]' if cast else ''}", remove_nodes=False)
        self._cast = cast

    def pattern(self, op, x, axes, to):
        values, indices = op.FusedSoftmaxTopK(
            x, _domain=DOMAIN, _outputs=["fused_values", "indices"]
        )
        if self._cast:
            values = op.Cast(values, to=to, _outputs=["values"])
        total = op.ReduceSum(values, axes, _outputs=["total"])
        return op.Div(values, total), indices

    def check(self, context, fused_values, total, axes, values=None, **_):
        values = values if self._cast else fused_values
        fused, reduce_sum = fused_values.producer(), total.producer()
        if self._cast and (
            reason := _exclusive_use_failure(fused_values, {values.producer()}, "fused values")
        ):
            return _fail(reason, fused_values)
        if _int_attr(fused, "normalize", 0) != 0 or _int_attr(fused, "log_probs", 0) != 0:
            return _fail(f"{describe_node(fused)} is not the plain probability form", fused)
        if len(fused.outputs) > 2 and fused.outputs[2].uses():
            return _fail(f"log_normalizer of {describe_node(fused)} is used", fused)
        if _int_attr(reduce_sum, "keepdims", 1) != 1:
            return _fail(f"{describe_node(reduce_sum)} has keepdims=0", reduce_sum)
        axes_array = _constant_array(axes)
        if axes_array is None or axes_array.size != 1:
            return _fail(f"axes of {describe_node(reduce_sum)} are not one constant axis", axes)
        rank = _rank(values, fused.inputs[0])
        if (reason := _last_axis_failure(reduce_sum, int(axes_array.reshape(-1)[0]), rank)):
            return _fail(reason, reduce_sum)
        div = next((n for n, _ in total.uses()), None)
        if (reason := _exclusive_use_failure(total, {div}, "ReduceSum output")):
            return _fail(reason, total)
        if (reason := _exclusive_use_failure(values, {reduce_sum, div}, "top-k probabilities")):
            return _fail(reason, values)
        return rw.MatchResult()

    def rewrite(self, op, x, fused_values, to=None, **_):
        fused = fused_values.producer()
        renormalized, indices = _fused(
            op,
            x,
            k=_int_attr(fused, "k", 0),
            temperature=fused.attributes["temperature"].as_float()
            if "temperature" in fused.attributes
            else 1.0,
            normalize=1,
            log_probs=0,
        )
        if self._cast:
            renormalized = op.Cast(renormalized, to=to.as_int())
        return renormalized, indices


def _rules(options: SoftmaxTopKOptions) -> list[rw.RewriteRule]:
    # For one root node the first rule that succeeds wins, so the scaled variants come
    # before the plain one: if folding is impossible (e.g. the Div has other
    # consumers) the plain rule still fuses, taking the Div's output as its input.
    scale_kinds = ["Div", "Mul", "Mul(c, x)", None] if options.fold_temperature else [None]
    rules = [
        SoftmaxTopKFusion.rule(
            log_probs=log_probs, scale_kind=kind, cast_after=cast, max_k=options.max_k
        )
        for log_probs in (False, True)
        for cast in (True, False)
        for kind in scale_kinds
    ]
    rules += [SoftmaxTransposeTopKFusion.rule(log_probs=lp, max_k=options.max_k) for lp in (False, True)]
    if options.enable_router_form:
        rules += [
            TopKSoftmaxRouterFusion.rule(cast=cast, scale_kind=kind, max_k=options.max_k)
            for cast in (True, False)
            for kind in scale_kinds
        ]
        # Must follow SoftmaxTopKFusion: it rewrites that rule's output. The rule set
        # visits nodes in graph order and the Div comes after the TopK, so one sweep
        # applies both.
        rules += [RenormalizedTopKFusion.rule(cast=cast) for cast in (True, False)]
    return rules


def apply(model: ir.Model, options: SoftmaxTopKOptions, *, explain: bool = False) -> PassResult:
    """Fuse every Softmax/TopK pair the rules accept; see the module docstring."""
    from onnx_ir.passes.common import ShapeInferencePass

    # Ranks and dtypes prove "last axis" and pick the fused op's input type; models
    # built by hand often carry none for intermediate values. Not strict: one node onnx
    # cannot infer (ONNX Runtime's SimplifiedLayerNormalization) made the strict pass log
    # a traceback and infer nothing.
    ShapeInferencePass(strict_mode=False)(model)
    outcome = apply_rules(model, _rules(options), explain=explain)
    if outcome.count:
        model.opset_imports.setdefault(DOMAIN, OPSET_VERSION)
        model.graph.opset_imports.setdefault(DOMAIN, OPSET_VERSION)
    # The renormalised rule rewrites an earlier fusion, so it is not a new fusion.
    fused = outcome.count - sum(
        n for rule, n in outcome.per_rule.items() if rule.startswith("RenormalizedSoftmaxTopK")
    )
    explanations = outcome.explanations
    if explain and not fused and not explanations:  # no rule got past its first node: say what the graph has
        ops = [n.op_type for n in model.graph.all_nodes()]  # (subgraphs too: the rules visit them)
        softmax = sum(op in ("Softmax", "LogSoftmax") for op in ops)
        explanations = [(f"graph: {ops.count('TopK')} TopK and {softmax} Softmax/LogSoftmax nodes, no pair of "
                         "them to fuse (a decoder's Softmax feeds its attention); --sampling-head K appends a "
                         "fused top-k to the logits")]
    return PassResult(
        name=PASS.name,
        count=fused,
        explanations=explanations,
        details={"rules": outcome.per_rule},
    )


PASS = GraphPass(
    name="fuse-softmax-topk",
    description="Fuse Softmax/LogSoftmax + TopK (and the MoE-router TopK + Softmax) "
    "into com.toolkit.FusedSoftmaxTopK",
    options_type=SoftmaxTopKOptions,
    apply=apply,
)
