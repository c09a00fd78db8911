"""``sampling-head``: append the fused softmax–top-k to a language model's logits.

A decode step only needs the next token's candidates, not ``[B, S, V]`` logits.
This pass takes the last position of the ``logits`` output and feeds it to
``com.toolkit::FusedSoftmaxTopK``, adding two graph outputs:

* ``next_token_probs [B, k]`` — probabilities (softmax over the full vocabulary at
  the given temperature), descending;
* ``next_token_ids [B, k]`` — their token ids (int64); ``next_token_ids[:, 0]`` is
  the greedy token.

The logits output is kept by default (parity checks and scoring need it); with
``keep_logits=false`` it is removed from the graph outputs, so a runtime never
copies ``[B, S, V]`` floats out of the session. The pass changes the model's I/O, so
it is opt-in (not in the default pipeline).
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

    def validate(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise PassError(f"sampling-head option k must be an integer >= 1, got {self.k!r}",
                            hint="e.g. --pass-option sampling-head.k=50")
        if not self.temperature > 0:
            raise PassError(f"sampling-head option temperature must be > 0, got {self.temperature!r}",
                            hint="use 1.0 for the model's own distribution")


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
    if "next_token_ids" in outputs:
        return PassResult(name=PASS.name, count=0,
                          explanations=["graph already has next_token_ids: sampling head present"])
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
    fused = ir.Node(
        DOMAIN, "FusedSoftmaxTopK", [last],
        [ir.AttrInt64("k", options.k), ir.AttrFloat32("temperature", float(options.temperature)),
         ir.AttrInt64("normalize", 0), ir.AttrInt64("log_probs", 0)],
        num_outputs=2, name="sampling_head/FusedSoftmaxTopK",
    )
    probs, ids = fused.outputs
    probs.name, ids.name = "next_token_probs", "next_token_ids"
    probs.dtype = logits.dtype
    ids.dtype = ir.DataType.INT64
    batch = shape[0] if shape is not None else None
    probs.shape = ir.Shape([batch, options.k])
    ids.shape = ir.Shape([batch, options.k])
    graph.extend([gather, fused])
    graph.outputs.extend([probs, ids])
    if not options.keep_logits:
        graph.outputs.remove(logits)
    model.opset_imports.setdefault(DOMAIN, 1)
    model.metadata_props["toolkit.sampling_head"] = json.dumps(dataclasses.asdict(options), sort_keys=True)
    return PassResult(name=PASS.name, count=1, details={"k": options.k, "keep_logits": options.keep_logits})


PASS = GraphPass(
    name="sampling-head",
    description="Append FusedSoftmaxTopK to the LM logits: next_token_probs/next_token_ids [B, k] outputs",
    options_type=SamplingHeadOptions,
    apply=apply,
)
