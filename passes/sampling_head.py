"""``sampling-head``: append the fused softmax–top-k to a language model's logits.

A decode step only needs the next token's candidates, not ``[B, S, V]`` logits.
This pass takes the last position of the ``logits`` output and feeds it to
``com.toolkit::FusedSoftmaxTopK``, adding two graph outputs:

* ``next_token_probs [B, k]`` — probabilities (softmax over the full vocabulary at
  the given temperature), descending;
* ``next_token_ids [B, k]`` — their token ids (int64); ``next_token_ids[:, 0]`` is
  the greedy token.

With ``sample=true`` the head is ``com.toolkit::SampleTopKTopP`` instead: the model
takes an extra input ``sampling_seed`` (int64 ``[seeds]``: one, for which a decode
loop passes ``call_seed(base_seed, step)`` from toolkit.ops.reference, or one per
row, for a server batching requests, each row drawing its own stream whatever its
slot) and outputs ``next_token [B]`` (drawn with temperature,
top-k, top-p and min-p, in that order) and ``next_token_prob [B]``.

The logits output is kept by default (parity checks and scoring need it); with
``keep_logits=false`` it is removed from the graph outputs, so a runtime never
copies ``[B, S, V]`` floats out of the session, and the last position is taken
before the LM head instead of after it (:func:`_hoist_last_position`): a prefill of
S tokens then projects one hidden state onto the vocabulary, not S. The pass changes
the model's I/O, so it is opt-in (not in the default pipeline).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir

from passes.registry import GraphPass, PassOptions, PassResult
from toolkit.errors import PassError

DOMAIN = "com.toolkit"


@dataclasses.dataclass(frozen=True)
class SamplingHeadOptions(PassOptions):
    """Options of ``sampling-head``."""

    k: int = dataclasses.field(default=50, metadata={"help": "candidates returned per row (1 <= k <= vocab)"})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "softmax temperature (> 0)"})
    keep_logits: bool = dataclasses.field(default=True, metadata={"help": "keep the [B, S, V] logits output"})
    logits_output: str = dataclasses.field(default="logits", metadata={"help": "name of the logits graph output"})
    sample: bool = dataclasses.field(
        default=False, metadata={"help": "draw a token (SampleTopKTopP, input sampling_seed) instead of top-k"})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "nucleus mass kept when sampling, in (0, 1]"})
    min_p: float = dataclasses.field(default=0.0, metadata={"help": "min-p filter when sampling, in [0, 1)"})

    def validate(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise PassError(f"sampling-head option k must be an integer >= 1, got {self.k!r}",
                            hint="e.g. --sampling-head 50 (or --pass-option sampling-head.k=50)")
        from toolkit.ops.reference import temperature_problem

        if (problem := temperature_problem(self.temperature)) is not None:
            raise PassError(f"sampling-head option temperature {problem}",
                            hint="use 1.0 for the model's own distribution")
        if not 0 < self.top_p <= 1:
            raise PassError(f"sampling-head option top_p must be in (0, 1], got {self.top_p!r}",
                            hint="1.0 keeps every top-k candidate")
        if not 0 <= self.min_p < 1:
            raise PassError(f"sampling-head option min_p must be in [0, 1), got {self.min_p!r}",
                            hint="0.0 disables the min-p filter")


def apply(model: ir.Model, options: SamplingHeadOptions, *, explain: bool = False) -> PassResult:
    """Add the head; count = 1 when added, 0 (with an explanation) otherwise."""
    graph = model.graph
    outputs = {v.name: v for v in graph.outputs}
    logits = outputs.get(options.logits_output)
    if logits is None:
        raise PassError(
            f"sampling-head: the model has no output {options.logits_output!r} "
            f"(outputs: {', '.join(outputs)})",
            hint="set sampling-head.logits_output to the name of the [batch, seq, vocab] logits output",
        )
    if "next_token_ids" in outputs or "next_token" in outputs:
        return PassResult(name=PASS.name, count=0,
                          explanations=["graph already has a sampling head (next_token_ids / next_token)"])
    shape = logits.shape
    if shape is not None and len(shape) != 3:
        raise PassError(
            f"sampling-head: output {logits.name!r} has rank {len(shape)}, expected [batch, seq, vocab]",
            hint="the sampling head applies to decoder LM logits",
        )
    vocab = shape[2] if shape is not None else None
    if isinstance(vocab, int) and options.k > vocab:
        raise PassError(f"sampling-head: k={options.k} exceeds the vocabulary size {vocab} of {logits.name!r}",
                        hint=f"choose k <= {vocab}")

    last_index = ir.val("sampling_head.last_position", const_value=ir.tensor(np.array(-1, dtype=np.int64)))
    graph.register_initializer(last_index)
    gather = ir.Node("", "Gather", [logits, last_index], [ir.AttrInt64("axis", 1)], num_outputs=1,
                     name="sampling_head/Gather_last")
    last = gather.outputs[0]
    last.name = "sampling_head.last_logits"
    batch = shape[0] if shape is not None else None
    common = [ir.AttrInt64("k", options.k), ir.AttrFloat32("temperature", float(options.temperature))]
    if options.sample:
        seed = ir.val("sampling_seed", ir.DataType.INT64, ir.Shape(["seeds"]))  # 1, or B
        graph.inputs.append(seed)
        head = ir.Node(DOMAIN, "SampleTopKTopP", [last, seed],
                       [*common, ir.AttrFloat32("top_p", float(options.top_p)),
                        ir.AttrFloat32("min_p", float(options.min_p))],
                       num_outputs=2, name="sampling_head/SampleTopKTopP")
        token, prob = head.outputs
        token.name, prob.name = "next_token", "next_token_prob"
        token.dtype, prob.dtype = ir.DataType.INT64, ir.DataType.FLOAT
        token.shape = ir.Shape([batch])
        prob.shape = ir.Shape([batch])
        new_outputs = [token, prob]
    else:
        head = ir.Node(DOMAIN, "FusedSoftmaxTopK", [last],
                       [*common, ir.AttrInt64("normalize", 0), ir.AttrInt64("log_probs", 0)],
                       num_outputs=2, name="sampling_head/FusedSoftmaxTopK")
        probs, ids = head.outputs
        probs.name, ids.name = "next_token_probs", "next_token_ids"
        probs.dtype = logits.dtype
        ids.dtype = ir.DataType.INT64
        probs.shape = ir.Shape([batch, options.k])
        ids.shape = ir.Shape([batch, options.k])
        new_outputs = [probs, ids]
    graph.extend([gather, head])
    graph.outputs.extend(new_outputs)
    hoisted = 0
    if not options.keep_logits:
        graph.outputs.remove(logits)
        hoisted = _hoist_last_position(graph, gather)
    model.opset_imports.setdefault(DOMAIN, 1)
    model.metadata_props["toolkit.sampling_head"] = json.dumps(dataclasses.asdict(options), sort_keys=True)
    return PassResult(name=PASS.name, count=1,
                      details={"k": options.k, "keep_logits": options.keep_logits, "sample": options.sample,
                               "ops_after_last_position": hoisted},
                      explanations=[(f"the last position is taken before {hoisted} op(s) of the LM head "
                                     "(a prefill projects one hidden state onto the vocabulary)")] if hoisted else [])


_UNARY = {"Cast", "Identity", "Tanh", "Neg", "Sigmoid", "Relu", "Softplus"}
_BINARY = {"Add", "Sub", "Mul", "Div"}


def _hoist_last_position(graph: ir.Graph, gather: ir.Node) -> int:
    """Moves ``gather`` (the last position, axis 1 of ``[B, S, ...]``) above the ops
    that act on each position alone and feed only it: a MatMul by a rank-2 weight (the
    LM head), elementwise ops whose other operand has no sequence axis (a bias, a
    scale, a softcap), and unary ops. Returns how many ops it moved above.

    Each step copies one op below the gather: ``gather(op(x, w))`` becomes
    ``op(gather(x), w)``, with the gathered value one rank lower (``[B, S, d]`` ->
    ``[B, d]``), and the old op, which fed only the gather, is removed.
    """
    moved = 0
    while True:
        value = gather.inputs[0]
        op = value.producer()
        if op is None or op.domain not in ("", "ai.onnx") or len(op.outputs) != 1:
            return moved
        if value.is_graph_output() or len(value.uses()) != 1:
            return moved
        data_index = _position_wise_input(op)
        if data_index is None:
            return moved
        x = op.inputs[data_index]
        new_gather = ir.Node("", "Gather", [x, gather.inputs[1]], [ir.AttrInt64("axis", 1)], num_outputs=1,
                             name=f"sampling_head/Gather_last_{moved}")
        inputs = list(op.inputs)
        inputs[data_index] = new_gather.outputs[0]
        new_op = ir.Node("", op.op_type, inputs, list(op.attributes.values()), num_outputs=1,
                         name=f"sampling_head/{op.name or op.op_type}_last")
        last = gather.outputs[0]
        for v, dtype in ((new_op.outputs[0], value.dtype), (new_gather.outputs[0], x.dtype)):
            if dtype is not None:
                v.dtype = dtype
        if x.shape is not None and len(x.shape) == 3:
            new_gather.outputs[0].shape = ir.Shape([x.shape[0], x.shape[2]])
        if last.shape is not None:
            new_op.outputs[0].shape = ir.Shape(list(last.shape))
        graph.insert_before(gather, [new_gather, new_op])
        last.replace_all_uses_with(new_op.outputs[0])
        graph.remove(gather, safe=True)
        graph.remove(op, safe=True)  # it fed only the gather: x keeps one use, the new gather's
        name, last.name = last.name, None
        new_op.outputs[0].name = name
        gather = new_gather
        moved += 1


def _position_wise_input(op: ir.Node) -> int | None:
    """The input through which ``op`` (whose output is ``[B, S, ...]``, rank 3) maps
    position i of axis 1 to position i alone, or None when it does not (or that cannot
    be told from the static shapes). The other operands keep their values, so only
    their ranks matter: a rank-2 weight of a MatMul (whose data input is then rank 3
    too) or a broadcast operand of rank <= 1 (a bias, a scale)."""
    if op.op_type in _UNARY:
        return 0
    if op.op_type == "MatMul":
        w = op.inputs[1]
        return 0 if w is not None and w.shape is not None and len(w.shape) == 2 else None
    if op.op_type in _BINARY:
        for index in (0, 1):
            other = op.inputs[1 - index]
            if other is not None and other.shape is not None and len(other.shape) <= 1:
                return index
        return None
    return None


PASS = GraphPass(
    name="sampling-head",
    description="Append the decode step's head to the LM logits: top-k (next_token_probs/ids) or a sampled "
    "next_token (sample=true)",
    options_type=SamplingHeadOptions,
    apply=apply,
)
