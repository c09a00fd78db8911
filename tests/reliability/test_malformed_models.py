"""A corpus of malformed ONNX files: every CLI command refuses each one with a
clear message, exit code 2, no traceback, and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def _save(path, nodes, inits=(), opset=21):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _traversal(path):
    _save(path, [helper.make_node("Add", ["x", "w"], ["y"])], [numpy_helper.from_array(np.ones(2, np.float32), "w")])
    model = onnx.load(str(path))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../etc/passwd"
    onnx.save(model, str(path))
    return path


def _truncated(path):
    whole = _save(path, [helper.make_node("Relu", ["x"], ["y"])]).read_bytes()
    path.write_bytes(whole[:20])
    return path


def _garbage(path):
    path.write_bytes(b"\x0a\xff\xff\xff\x0fnot onnx at all")
    return path


CORPUS = {
    "truncated": (_truncated, "does not parse"),
    "garbage": (_garbage, "does not parse"),
    "unknown_op": (lambda p: _save(p, [helper.make_node("Frobnicate", ["x"], ["y"])]), "No Op registered"),
    "missing_initializer": (lambda p: _save(p, [helper.make_node("Add", ["x", "w"], ["y"])]), "input 'w'"),
    "cycle": (lambda p: _save(p, [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                                  helper.make_node("Identity", ["a"], ["y"])]), "topologically sorted"),
    "future_opset": (lambda p: _save(p, [helper.make_node("Relu", ["x"], ["y"])], opset=99), "opset 99"),
    "path_traversal": (_traversal, "points outside the model's directory"),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.parametrize("command", ["inspect", "parity", "generate"])
def test_malformed_model_is_refused(tmp_path, name, command):
    make, message = CORPUS[name]
    path = make(tmp_path / f"{name}.onnx")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = {"inspect": ["inspect", str(path)],
            "parity": ["parity", "llama", str(path), "--json", str(tmp_path / "report.json")],
            "generate": ["generate", str(path), "--prompt-ids", "1,2,3"]}[command]
    r = subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written"


@pytest.mark.parametrize("config", ['{"model_type": "llama", ', '{"neither": 1}', '{"model_type": "nosuch"}'])
@pytest.mark.parametrize("command", ["export", "convert"])
def test_malformed_model_directory_is_refused(tmp_path, config, command):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(config)
    out = tmp_path / ("m.onnx" if command == "export" else "out")
    r = subprocess.run([sys.executable, "-m", "toolkit", command, str(model_dir), "-o", str(out)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "config.json" in r.stderr or "could not load" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "nothing may be written"
