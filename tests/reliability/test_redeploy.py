"""A server that swaps a bundle directory in place runs the library it checked.

The dynamic loader returns a library already open under the same path name without
reading the file again: loading a new bundle at the path of one whose sessions are
still alive ran the old library, while the SHA-256 check had read the new file (an
audit). ``toolkit.load`` registers a library whose bytes differ from what this process
registered from that path before through a copy named after its hash.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from toolkit import bundle, ops


def _write_bundle(directory: Path) -> None:
    node = helper.make_node("FusedSoftmaxTopK", ["logits"], ["probs", "ids"], domain=ops.DOMAIN, k=3)
    graph = helper.make_graph([node], "head", [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 3]),
                               helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])
    model.ir_version = 10
    directory.mkdir(parents=True)
    onnx.save(model, str(directory / "model.onnx"))
    bundle.write(directory, model, {"passes": []}, None)


def _mapped_library_digests() -> set[str]:
    """SHA-256 of every op library file mapped into this process."""
    paths = {line.split(None, 5)[5].strip() for line in Path("/proc/self/maps").read_text().splitlines()
             if line.rstrip().endswith(bundle.LIBRARY_NAME)}
    return {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


def test_a_bundle_swapped_in_place_runs_its_own_library(tmp_path):
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    _write_bundle(v1)
    shutil.copytree(v1, v2)
    # v2's library: other bytes (one message's case), loadable, with its manifest updated
    lib = v2 / bundle.LIBRARY_NAME
    data = lib.read_bytes()
    assert data.count(b"got temperature=") == 1
    lib.write_bytes(data.replace(b"got temperature=", b"GOT temperature="))
    manifest = json.loads((v2 / bundle.MANIFEST).read_text())
    manifest["op_library"]["sha256"] = bundle.sha256(lib)
    (v2 / bundle.MANIFEST).write_text(json.dumps(manifest))
    old_digest, new_digest = bundle.sha256(v1 / bundle.LIBRARY_NAME), manifest["op_library"]["sha256"]
    assert old_digest != new_digest

    live = tmp_path / "live"
    shutil.copytree(v1, live)
    first = bundle.load(live, threads=1)  # kept alive, as a server does while it swaps
    x = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
    expected = first.run(None, {"logits": x})
    live.rename(tmp_path / "retired")
    shutil.copytree(v2, live)
    second = bundle.load(live, threads=1)
    assert new_digest in _mapped_library_digests(), "the new bundle's session runs another library"
    for a, b in zip(second.run(None, {"logits": x}), expected):
        np.testing.assert_array_equal(a, b)  # (the same kernel code: only a message differs)
    # the old session still runs, on its own library
    np.testing.assert_array_equal(first.run(None, {"logits": x})[1], expected[1])
    assert old_digest in _mapped_library_digests()


def test_load_takes_the_callers_session_options(tmp_path):
    """A server sets its own session options (e.g. no CPU memory arena, so one large
    request's memory goes back to the system); load registers the library into them."""
    import onnxruntime as ort
    import pytest

    from toolkit.errors import ToolkitError

    _write_bundle(tmp_path / "b")
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = bundle.load(tmp_path / "b", threads=1, session_options=so)
    assert so.intra_op_num_threads == 1
    assert session.get_session_options().enable_cpu_mem_arena is False
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    _, ids = session.run(None, {"logits": np.arange(16, dtype=np.float32)[None]})
    np.testing.assert_array_equal(ids, [[15, 14, 13]])
    with pytest.raises(ToolkitError, match="session_options must be an onnxruntime.SessionOptions, got dict"):
        bundle.load(tmp_path / "b", session_options={"enable_cpu_mem_arena": False})
