"""Malformed bundle manifests: toolkit.load names the field instead of a KeyError /
TypeError from deep inside; thread counts ORT cannot use are refused."""

from __future__ import annotations

import json

import pytest

import toolkit
from toolkit import bundle, ops
from toolkit.errors import InvalidModelError, ToolkitError


def _manifest(**fields):
    good = {"manifest_version": bundle.MANIFEST_VERSION, "model": "model.onnx",
            "op_library": {"file": "libtoolkit_ops.so", "sha256": "00", "min_ort_api_version": 17}}
    return {**good, **fields}


@pytest.mark.parametrize("manifest,fragment", [
    ([1, 2], "holds a JSON list, not an object"),
    (_manifest(op_library=None, files={"model.onnx": 5}), "field 'files.model.onnx' must be {bytes: integer"),
    (_manifest(op_library=None, files={"model.onnx": {"sha256": "00"}}), "'files.model.onnx'"),
    (_manifest(op_library=None, files={"../../etc/hostname": {"bytes": 1, "sha256": "00"}}),
     "must be names inside the bundle directory"),
    (_manifest(op_library=None, files=[]), "field 'files' must be an object"),
    (_manifest(model=None), "field 'model' must be the model file's name, got None"),
    ({k: v for k, v in _manifest().items() if k != "model"}, "field 'model'"),
    (_manifest(op_library="lib.so"), "field 'op_library' must be an object or null"),
    (_manifest(op_library={"file": None, "sha256": "00", "min_ort_api_version": 17}), "'op_library.file'"),
    (_manifest(op_library={"file": "a.so", "min_ort_api_version": 17}), "'op_library.sha256'"),
    (_manifest(op_library={"file": "a.so", "sha256": "00", "min_ort_api_version": "17"}),
     "'op_library.min_ort_api_version' must be an integer"),
    (_manifest(op_library={"file": "a.so", "sha256": "00", "min_ort_api_version": 17, "providers": "CPU"}),
     "'op_library.providers'"),
    (_manifest(op_library=None, parity="passed"), "field 'parity' must be an object whose 'passed' is true"),
    (_manifest(op_library=None, parity={"passed": "false"}), "field 'parity' must be an object"),
    (_manifest(op_library=None, parity={"passed": 0}), "field 'parity' must be an object"),
])
def test_malformed_manifest_names_the_field(tmp_path, manifest, fragment):
    (tmp_path / bundle.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InvalidModelError) as err:
        toolkit.load(tmp_path)
    assert fragment in str(err.value), str(err.value)


def test_missing_bundle_and_bad_thread_counts(tmp_path):
    with pytest.raises(InvalidModelError, match="bundle directory .*nowhere' does not exist"):
        toolkit.load(tmp_path / "nowhere")
    (tmp_path / bundle.MANIFEST).write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidModelError, match="is not valid JSON"):
        toolkit.load(tmp_path)
    for threads in (0, -1, 1.5, True):  # ORT reads 0 as its default and fails on -1
        with pytest.raises(ToolkitError, match="threads must be an integer >= 1"):
            ops.session_options(threads)
    assert ops.session_options(2).intra_op_num_threads == 2


def test_a_model_file_or_a_provider_string_is_named(tmp_path):
    """toolkit.load(DIR/model.onnx) said the file 'has no manifest.json'; providers given
    as one string reached ORT, which warned once per character."""
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(InvalidModelError, match="is a file; a bundle is the directory") as err:
        toolkit.load(tmp_path / "model.onnx")
    assert str(tmp_path) in err.value.hint
    with pytest.raises(ToolkitError, match="providers must be a list of provider names"):
        toolkit.load(tmp_path, providers="CPUExecutionProvider")


def _relu_bundle(directory, op="Relu", external=False):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.linspace(-1, 1, 64).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["t"]), helper.make_node(op, ["t"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "model.onnx"), save_as_external_data=external, location="model.onnx.data",
              size_threshold=0)
    return model


def test_a_model_changed_after_conversion_is_refused(tmp_path):
    """A bundle whose model.onnx was replaced by a valid model (onnxruntime.quantization's
    output, in an audit) loaded and ran while manifest.json still said parity passed.
    The manifest records the model's SHA-256 and its external data files' sizes."""
    import shutil

    one = tmp_path / "one"
    bundle.write(one, _relu_bundle(one), {"passes": []}, True)
    assert set(json.loads((one / bundle.MANIFEST).read_text())["files"]) == {"model.onnx"}
    toolkit.load(one)
    _relu_bundle(one, op="Tanh")  # a valid model of the same size, another function
    with pytest.raises(InvalidModelError, match="model.onnx does not match its recorded SHA-256 .*changed after "
                       "conversion"):
        toolkit.load(one)
    (one / "model.onnx").write_bytes(b"\x0a\xff\xff\xff\x0fnot onnx")  # a broken file: the bare-file diagnosis
    with pytest.raises(InvalidModelError, match="does not parse"):
        toolkit.load(one)

    two = tmp_path / "two"
    bundle.write(two, _relu_bundle(two, external=True), {"passes": []}, True)
    assert set(json.loads((two / bundle.MANIFEST).read_text())["files"]) == {"model.onnx", "model.onnx.data"}
    toolkit.load(two)
    data = (two / "model.onnx.data").read_bytes()
    (two / "model.onnx.data").write_bytes(data + b"\0" * 8)
    with pytest.raises(InvalidModelError, match=f"has {len(data) + 8} bytes, not the {len(data)} recorded"):
        toolkit.load(two)
    shutil.rmtree(two)  # ORT maps the file: write it anew
    bundle.write(two, _relu_bundle(two, external=True), {"passes": []}, True)
    toolkit.load(two)
