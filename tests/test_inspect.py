"""``toolkit inspect`` / ``load_onnx`` on ONNX files a user brings: external data seen
from another directory, cache layouts the shapes cannot describe, ops inside If / Loop
bodies, standard ONNX-ML domains, and malformed toolkit metadata. Each number is
checked against one computed here from the graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit.cli import main
from toolkit.model_info import describe
from toolkit.parity import load_onnx, uses_custom_ops


def _inspect_json(path, capsys):
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _io_model(shapes, dtype=TensorProto.FLOAT, metadata=None):
    ins = [helper.make_tensor_value_info(n, dtype, s) for n, s in shapes.items()]
    outs = [helper.make_tensor_value_info(n + "_o", dtype, s) for n, s in shapes.items()]
    g = helper.make_graph([helper.make_node("Identity", [n], [n + "_o"]) for n in shapes], "g", ins, outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    for k, v in (metadata or {}).items():
        m.metadata_props.add(key=k, value=v)
    return m


def test_external_data_is_found_beside_the_model_from_any_directory(tmp_path, monkeypatch, capsys):
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    (tmp_path / "m").mkdir()
    onnx.save(m, str(tmp_path / "m" / "model.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the checker used to look for weights.bin here
    load_onnx("../m/model.onnx")
    info = _inspect_json("../m/model.onnx", capsys)
    assert info["parameters"] == 64 * 64
    assert sorted(p.rsplit("/", 1)[-1] for p in info["files"]) == ["model.onnx", "weights.bin"]


@pytest.mark.parametrize("shapes", [
    {"past_key_values.0.key": ["B", "heads", "P", 16], "past_key_values.0.value": ["B", "heads", "P", 16]},
    {"past_key_values.0.key": ["B", "P", 4, 16], "past_key_values.0.value": ["B", "P", 4, 16]},
    {"past_key_values.0.key_value": ["B", "P", 128]},
], ids=["symbolic_heads", "seq_on_axis_1", "gptbigcode_fused"])
def test_a_cache_layout_the_shapes_cannot_describe_is_unknown(tmp_path, shapes, capsys):
    """These reported 128, 128 and 0 bytes per token (512 is right for the first two)."""
    path = tmp_path / "kv.onnx"
    onnx.save(_io_model(shapes), str(path))
    kv = _inspect_json(path, capsys)["kv_cache"]
    assert kv["bytes_per_token"] is None and "cannot be read from the shapes" in kv["layout_note"]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "unknown bytes per token" in out
    # printed as text: rich read "[batch, heads, sequence, head_dim]" as markup and dropped it
    assert "[batch, heads, sequence, head_dim]" in " ".join(out.split())


def test_the_exporters_layout_is_counted(tmp_path, capsys):
    shapes = {f"past_key_values.{i}.{t}": ["B", 4, "P", 16] for i in range(3) for t in ("key", "value")}
    path = tmp_path / "kv.onnx"
    onnx.save(_io_model(shapes, TensorProto.FLOAT16), str(path))
    kv = _inspect_json(path, capsys)["kv_cache"]
    assert kv["bytes_per_token"] == 3 * 2 * 4 * 16 * 2 and kv["layers"] == 3 and "layout_note" not in kv


def test_ops_inside_subgraphs_are_counted_and_custom_ops_found(tmp_path, capsys):
    from toolkit.ops import DOMAIN, OPSET_VERSION

    then = helper.make_graph([helper.make_node("FusedSoftmaxTopK", ["x"], ["p", "i"], domain=DOMAIN, k=2)], "then",
                             [], [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 2]),
                                  helper.make_tensor_value_info("i", TensorProto.INT64, [1, 2])])
    other = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["p2", "i2"])], "else", [],
                              [helper.make_tensor_value_info("p2", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("i2", TensorProto.INT64, [1, 2])],
                              [numpy_helper.from_array(np.array([2], np.int64), "k")])
    g = helper.make_graph([helper.make_node("If", ["c"], ["p", "i"], then_branch=then, else_branch=other),
                           helper.make_node("Normalizer", ["x"], ["n"], domain="ai.onnx.ml", norm="L1")], "g",
                          [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 2]),
                           helper.make_tensor_value_info("i", TensorProto.INT64, [1, 2]),
                           helper.make_tensor_value_info("n", TensorProto.FLOAT, [1, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.onnx.ml", 3),
                                            helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    m.ir_version = 10
    assert uses_custom_ops(m)  # parity registers the op library for it
    info = describe(tmp_path / "m.onnx", m)
    assert info["custom_ops"] == [f"{DOMAIN}::FusedSoftmaxTopK"]  # ai.onnx.ml is a standard domain
    assert info["ops"] == {"If": 1, f"{DOMAIN}::FusedSoftmaxTopK": 1, "TopK": 1, "ai.onnx.ml::Normalizer": 1}
    assert info["nodes"] == 4


@pytest.mark.parametrize("key,value,fragment", [
    ("toolkit.kv_quant", "not json", "JSONDecodeError"),
    ("toolkit.kv_quant", '{"bits": 8}', "no field"),
    ("toolkit.kv_quant", "[1, 2]", "not an object"),
    ("toolkit.low_rank_kv", "{}", "no field 'bytes_per_token'"),
])
def test_malformed_toolkit_metadata_is_a_named_error(tmp_path, key, value, fragment, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_io_model({"past_key_values.0.key": ["B", 2, "P", 8]}, metadata={key: value}), str(path))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"metadata {key!r} is malformed" in err and fragment in err and "Traceback" not in err


def test_a_misspelt_attribute_of_our_ops_is_refused(tmp_path, capsys):
    """ORT gives a custom op only the attributes it asks for: `temprature=2` ran at T=1."""
    from toolkit.ops import DOMAIN, OPSET_VERSION

    node = helper.make_node("FusedSoftmaxTopK", ["x"], ["p", "i"], name="head", domain=DOMAIN, k=2, temprature=2.0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 2]),
                           helper.make_tensor_value_info("i", TensorProto.INT64, [1, 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    m.ir_version = 10
    onnx.save(m, str(tmp_path / "m.onnx"))
    for argv in (["inspect", str(tmp_path / "m.onnx")], ["generate", str(tmp_path / "m.onnx"), "--prompt-ids", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "node 'head' (FusedSoftmaxTopK) has attribute 'temprature'" in err and "'temperature'?" in err, err
    attrs = m.graph.node[0].attribute
    attrs.remove(next(a for a in attrs if a.name == "temprature"))  # the same node without it loads
    assert [a.name for a in attrs] == ["k"]
    onnx.save(m, str(tmp_path / "m.onnx"))
    load_onnx(tmp_path / "m.onnx")


def _rms_norm_model(*, dangling: bool = False):
    """x -> SimplifiedLayerNormalization (ONNX Runtime's RMSNorm, in the standard domain,
    with no onnx schema) -> Relu; ``dangling``: the Relu reads a tensor nothing makes."""
    w = numpy_helper.from_array(np.linspace(0.5, 1.5, 64).astype(np.float32), "w")
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["t"], axis=-1, epsilon=1e-5),
             helper.make_node("Relu", ["nope" if dangling else "t"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def test_onnx_runtime_standard_domain_ops_are_accepted(tmp_path, monkeypatch, capsys):
    """onnxruntime-genai's builder, ORT's transformer optimizer and onnxscript's ORT fusions
    write RMSNorm as SimplifiedLayerNormalization in the standard domain, which ONNX
    Runtime runs and onnx.checker rejects ("No Op registered"): inspect, parity and every
    pass refused such models as invalid. The rest of the model is still checked."""
    import onnxruntime as ort

    from toolkit.checker import check_model, runtime_only_ops

    assert "SimplifiedLayerNormalization" in runtime_only_ops()
    m = _rms_norm_model()
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered"):
        onnx.checker.check_model(m)
    for full in (False, True):
        check_model(m, full_check=full)
    with pytest.raises(onnx.checker.ValidationError, match="nope"):
        check_model(_rms_norm_model(dangling=True))
    # ONNX Runtime agrees it is a model: RMSNorm of the input
    x = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * np.linspace(0.5, 1.5, 64)
    np.testing.assert_allclose(y, np.maximum(ref, 0), rtol=1e-5, atol=1e-6)
    # with external data, seen from another directory (the checker's copy keeps no weights)
    (tmp_path / "m").mkdir()
    onnx.save(m, str(tmp_path / "m" / "model.onnx"), save_as_external_data=True, location="w.bin",
              size_threshold=0)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    load_onnx("../m/model.onnx")
    assert _inspect_json("../m/model.onnx", capsys)["parameters"] == 64


def test_files_a_deployer_makes_get_named_errors(tmp_path):
    """Three files from shipping steps that were reported as corrupt or with a wrong fix:
    an ONNX Runtime format model (.ort: "does not parse ... re-run toolkit export"), a
    model whose .data file was left behind ("not a regular file ... structurally
    invalid"), and our op cast to float16 ("the op library is missing or too old")."""
    import onnxruntime as ort

    from toolkit.errors import InvalidModelError
    from toolkit.parity import make_session

    m = _rms_norm_model()
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "m.ort")
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with pytest.raises(InvalidModelError, match="ONNX Runtime format model") as err:
        load_onnx(tmp_path / "m.ort")
    assert "InferenceSession" in err.value.hint

    (tmp_path / "b").mkdir()
    onnx.save(m, str(tmp_path / "b" / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    (tmp_path / "b" / "model.onnx.data").unlink()
    with pytest.raises(InvalidModelError, match="external data file 'model.onnx.data' that holds tensor 'w' is "
                       "missing") as err:
        load_onnx(tmp_path / "b")
    assert "move the whole directory" in err.value.hint

    h = TensorProto.FLOAT16
    g = helper.make_graph([helper.make_node("LowRankMatMul", ["x", "U", "V"], ["y"], domain="com.toolkit")], "g",
                          [helper.make_tensor_value_info("x", h, [1, 4])], [helper.make_tensor_value_info("y", h, [1, 3])],
                          [numpy_helper.from_array(np.ones((4, 2), np.float16), "U"),
                           numpy_helper.from_array(np.ones((2, 3), np.float16), "V")])
    half = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.toolkit", 1)])
    half.ir_version = 10
    onnx.save(half, str(tmp_path / "half.onnx"))
    with pytest.raises(InvalidModelError, match="Type Error") as err:
        make_session(tmp_path / "half.onnx")
    assert "op_block_list" in err.value.hint and "LowRankMatMul does not take these types" in err.value.hint


def test_inspect_notes_a_portable_model_whose_ops_were_inlined(exported, tmp_path, capsys):
    """onnxscript's optimizer inlines model-local functions by default: a --portable
    model then holds none of our ops and runs without the fused kernels, silently (an
    audit: kivi4 decode 0.28 -> 0.74 ms/step). inspect says so; inline=False keeps them."""
    import onnxscript.optimizer

    from passes.pipeline import run_pipeline

    _, path = exported("llama")
    model, _ = run_pipeline(onnx.load(str(path)), ["kv-cache", "sampling-head", "portable", "cleanup"],
                            {"kv-cache": {"scheme": "int8", "residual": "0"}, "sampling-head": {"k": "4"}})
    for name, m in (("portable", model), ("kept", onnxscript.optimizer.optimize(model, inline=False)),
                    ("inlined", onnxscript.optimizer.optimize(model))):
        onnx.save(m, tmp_path / f"{name}.onnx")
    assert describe(tmp_path / "portable.onnx", load_onnx(tmp_path / "portable.onnx"))["notes"] == []
    assert describe(tmp_path / "kept.onnx", load_onnx(tmp_path / "kept.onnx"))["notes"] == []
    notes = _inspect_json(tmp_path / "inlined.onnx", capsys)["notes"]
    assert len(notes) == 2 and "quantized KV cache" in notes[0] and "sampling head" in notes[1]
    assert all("inline=False" in n for n in notes)
    assert main(["inspect", str(tmp_path / "inlined.onnx")]) == 0
    assert "runs without the fused kernels" in capsys.readouterr().out
