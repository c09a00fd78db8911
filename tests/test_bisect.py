"""parity --bisect names the pass that breaks parity, and the nodes it added."""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import onnx_ir as ir

from passes import registry
from passes import pipeline
from passes.registry import GraphPass, PassOptions, PassResult
from toolkit import parity, sources
from toolkit.bisect import bisect


def _perturb(model: ir.Model, options: PassOptions, *, explain: bool = False) -> PassResult:
    """A broken "optimisation": scales the largest weight by 1.01."""
    init = max(model.graph.initializers.values(), key=lambda v: v.const_value.size)
    init.const_value = ir.tensor(init.const_value.numpy() * np.float32(1.01), name=init.name)
    return PassResult(name="perturb", count=1)


def test_bisect_names_the_breaking_pass(monkeypatch):
    module = types.ModuleType("passes._test_perturb")
    module.PASS = GraphPass("perturb", "test-only broken pass", dataclasses.make_dataclass(
        "PerturbOptions", [], bases=(PassOptions,), frozen=True), _perturb)
    monkeypatch.setitem(sys.modules, "passes._test_perturb", module)
    monkeypatch.setitem(registry._PASS_MODULES, "perturb", "passes._test_perturb")
    monkeypatch.setattr(pipeline, "PIPELINE_ORDER", ("fuse-softmax-topk", "sampling-head", "perturb", "cleanup"))
    src = sources.resolve("llama")
    settings = parity.ParitySettings(batch_sizes=(1,), prompt_len=6, decode_steps=1, perplexity_tokens=0)
    result = bisect(src, ["fuse-softmax-topk", "sampling-head", "perturb", "cleanup"], None, settings)
    assert [s["pass"] for s in result["steps"]] == ["fuse-softmax-topk", "sampling-head", "perturb"]
    assert [s["parity_passed"] for s in result["steps"]] == [True, True, False]
    assert result["first_failing_pass"] == "perturb"
    # the sampling head's nodes were reported when it was added
    assert any("FusedSoftmaxTopK" in n for n in result["steps"][1]["nodes_added"])

    clean = bisect(src, ["fuse-softmax-topk", "sampling-head"], None, settings)
    assert clean["first_failing_pass"] is None and all(s["parity_passed"] for s in clean["steps"])


def test_bisect_with_junit_is_a_named_error(capsys):
    """--bisect wrote its JSON/HTML but silently no JUnit file."""
    from toolkit.cli import main

    assert main(["parity", "llama", "--bisect", "--junit", "x.xml"]) == 2
    err = capsys.readouterr().err
    assert "--junit is not written by --bisect" in err
