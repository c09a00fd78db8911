"""Tests of the pass registry and pipeline: names, order, counts, options, validation."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import helper

import passes
import softmax_topk_graphs as graphs
from passes import pipeline, registry
from toolkit.errors import PassError

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_import_passes_is_cheap():
    code = (
        "import sys, passes; "
        "heavy = [m for m in ('onnxscript', 'onnx_ir', 'onnx', 'torch') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_pipeline_order_lists_every_registered_pass():
    assert sorted(pipeline.PIPELINE_ORDER) == registry.known_pass_names()
    assert pipeline.PIPELINE_ORDER[-1] == "cleanup"


def test_pipeline_order_has_a_comment_per_pass():
    source = Path(pipeline.__file__).read_text()
    block = source.split("PIPELINE_ORDER: tuple[str, ...] = (")[1].split("\n)")[0]
    lines = block.strip().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith('"'):
            assert lines[i - 1].strip().startswith("#"), f"no comment above {line.strip()}"


def test_unknown_pass_lists_known_passes():
    with pytest.raises(PassError) as info:
        passes.run_pipeline(graphs.softmax_topk(), ["fuse-softmax-top-k"])
    message = str(info.value)
    assert "unknown pass 'fuse-softmax-top-k'" in message
    for name in registry.known_pass_names():
        assert name in message
    assert "list-passes" in message
    with pytest.raises(PassError, match="known passes: cleanup, float16, fuse-softmax-topk"):
        passes.get_pass("nope")


def test_options_for_unknown_pass_rejected():
    with pytest.raises(PassError, match="unknown pass 'fuse-softmax'"):
        passes.run_pipeline(graphs.softmax_topk(), None, {"fuse-softmax": {}})


def test_default_set_runs_in_pipeline_order_with_counts():
    model = graphs.scaled_softmax_topk("Div", 0.5)
    out, report = passes.run_pipeline(model)
    assert report.order == list(pipeline.DEFAULT_PASSES)
    assert "sampling-head" not in pipeline.DEFAULT_PASSES  # changes the I/O: opt-in only
    assert report.counts == {"fuse-softmax-topk": 1, "cleanup": 0}
    assert [n.op_type for n in out.graph.node] == ["FusedSoftmaxTopK"]
    # the Div constant folded into `temperature` is gone
    assert [i.name for i in out.graph.initializer] == []


def test_requested_names_run_in_pipeline_order_not_argument_order():
    _, report = passes.run_pipeline(
        graphs.softmax_topk(), ["cleanup", "fuse-softmax-topk", "cleanup"]
    )
    assert report.order == ["fuse-softmax-topk", "cleanup"]


def test_cleanup_counts_removed_nodes_and_initializers():
    model = graphs.softmax_topk()
    model.graph.node.append(helper.make_node("Relu", ["x"], ["dead"], name="dead_relu"))
    model.graph.initializer.append(graphs.const_i64("unused", [1, 2]))
    out, report = passes.run_pipeline(model, ["cleanup"])
    assert report["cleanup"].count == 1
    assert report["cleanup"].details["initializers_removed"] == 1
    assert "dead_relu" not in [n.name for n in out.graph.node]


def test_caller_model_is_not_modified():
    model = graphs.softmax_topk()
    before = model.SerializeToString()
    passes.run_pipeline(model)
    assert model.SerializeToString() == before


def test_accepts_onnx_ir_model():
    import onnx_ir as ir

    out, report = passes.run_pipeline(ir.serde.deserialize_model(graphs.softmax_topk()))
    assert isinstance(out, onnx.ModelProto)
    assert report.counts["fuse-softmax-topk"] == 1


@pytest.mark.parametrize(
    ("options", "message", "hint"),
    [
        ({"max_k": 0}, "must be a positive int or None, got 0", "max_k=None"),
        (
            {"max_kk": 4},
            "has no option 'max_kk'; valid options: enable_router_form",
            "list-passes",
        ),
        ({"fold_temperature": "maybe"}, "expects bool, got str 'maybe'", "fold_temperature=true"),
        ({"max_k": 2.5}, "expects int | None, got float 2.5", "max_k=8"),
    ],
)
def test_option_errors_are_actionable(options, message, hint):
    with pytest.raises(PassError) as info:
        passes.run_pipeline(graphs.softmax_topk(), None, {"fuse-softmax-topk": options})
    assert message in info.value.message
    assert info.value.hint is not None and hint in info.value.hint


def test_cli_strings_are_converted():
    _, report = passes.run_pipeline(
        graphs.softmax_topk(k=3),
        None,
        {"fuse-softmax-topk": {"max_k": "2", "enable_router_form": "false"}},
    )
    assert report.counts["fuse-softmax-topk"] == 0


def test_none_from_the_cli_means_none():
    """`--pass-option fuse-softmax-topk.max_k=None` (the hint's own advice and list-passes'
    spelling of the default) was refused as a str."""
    for text in ("None", "none", "null"):
        _, report = passes.run_pipeline(graphs.softmax_topk(k=3), None,
                                        {"fuse-softmax-topk": {"max_k": "2"}})
        assert report.counts["fuse-softmax-topk"] == 0  # the limit applies ...
        _, report = passes.run_pipeline(graphs.softmax_topk(k=3), None,
                                        {"fuse-softmax-topk": {"max_k": text}})
        assert report.counts["fuse-softmax-topk"] == 1  # ... and None lifts it


def test_a_path_instead_of_a_model_is_a_named_error(tmp_path):
    with pytest.raises(PassError, match="onnx.load"):
        passes.run_pipeline(str(tmp_path / "m.onnx"))


def test_options_are_frozen_dataclasses_with_help():
    for info in passes.list_passes():
        graph_pass = passes.get_pass(info.name)
        assert dataclasses.is_dataclass(graph_pass.options_type)
        assert graph_pass.options_type.__dataclass_params__.frozen
        assert info.description and "\n" not in info.description
        for option in info.options:
            assert option.help, f"{info.name}.{option.name} has no help"
    text = passes.format_pass_list()
    assert "fuse-softmax-topk:" in text and "max_k (int | None, default None)" in text


def test_validator_names_pass_and_node(monkeypatch):
    real = passes.get_pass("cleanup")

    def broken_apply(model, options, *, explain=False):
        # Simulate a buggy rewrite: a node reading a value nothing produces.
        import onnx_ir as ir

        ghost = ir.Value(name="ghost")
        node = ir.Node("", "Relu", [ghost], name="bad_relu")
        model.graph.append(node)
        return registry.PassResult("cleanup", 0)

    broken = dataclasses.replace(real, apply=broken_apply)
    monkeypatch.setattr(registry, "get_pass", lambda name: broken)
    monkeypatch.setattr(pipeline, "get_pass", lambda name: broken)
    with pytest.raises(PassError) as info:
        passes.run_pipeline(graphs.softmax_topk(), ["cleanup"])
    assert "pass 'cleanup'" in str(info.value)
    assert "node bad_relu (Relu)" in str(info.value)


def test_validator_reports_checker_failure_with_node():
    model = graphs.softmax_topk()
    model.graph.node[1].attribute.append(helper.make_attribute("bogus", 1))
    with pytest.raises(PassError, match=r"pass 'x' .*onnx.checker at node tk \(TopK\)"):
        passes.validate_model(model, "x")


def test_an_input_model_invalid_before_the_passes_is_named_as_such():
    """A TopK asking for more elements than its axis has (k=9 of 6): the fusion's output
    failed the checker the same way, and the error called it a bug in the pass."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["p"]), helper.make_node("TopK", ["p", "K"], ["v", "i"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("i", TensorProto.INT64, None)],
        [numpy_helper.from_array(np.array([9], np.int64), "K")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    with pytest.raises(PassError) as err:
        passes.run_pipeline(model, ["fuse-softmax-topk"])
    assert "the input model is invalid before any pass ran" in str(err.value), str(err.value)
    assert "bug in pass" not in err.value.hint
