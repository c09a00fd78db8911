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
import pytest
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


def _two_versions(tmp_path: Path) -> tuple[Path, Path, str, str]:
    """Bundles v1 and v2 whose libraries differ in the bytes of one message only; v2's
    bytes are this test's own (a library another test left mapped has other bytes)."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    _write_bundle(v1)
    shutil.copytree(v1, v2)
    lib = v2 / bundle.LIBRARY_NAME
    data = lib.read_bytes()
    assert data.count(b"got temperature=") == 1
    unique = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:15].encode() + b"="
    lib.write_bytes(data.replace(b"got temperature=", unique))
    manifest = json.loads((v2 / bundle.MANIFEST).read_text())
    manifest["op_library"]["sha256"] = bundle.sha256(lib)
    (v2 / bundle.MANIFEST).write_text(json.dumps(manifest))
    old_digest, new_digest = bundle.sha256(v1 / bundle.LIBRARY_NAME), manifest["op_library"]["sha256"]
    assert old_digest != new_digest
    return v1, v2, old_digest, new_digest


X = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)


@pytest.mark.parametrize("swap", ["rename", "symlink", "relative"])
def test_a_bundle_swapped_in_place_runs_its_own_library(tmp_path, monkeypatch, swap):
    """rename: the old directory moved away and the new one copied in; symlink: a
    `live -> v1` link flipped to v2 (the loader matches the name it was given, not the
    resolved file); relative: load("live") from two working directories."""
    v1, v2, old_digest, new_digest = _two_versions(tmp_path)
    live = tmp_path / "live"
    if swap == "symlink":
        live.symlink_to(v1, target_is_directory=True)
    else:
        shutil.copytree(v1, live)
    if swap == "relative":
        monkeypatch.chdir(tmp_path)
        first = bundle.load("live", threads=1)
    else:
        first = bundle.load(live, threads=1)  # kept alive, as a server does while it swaps
    expected = first.run(None, {"logits": X})
    if swap == "rename":
        live.rename(tmp_path / "retired")
        shutil.copytree(v2, live)
    elif swap == "symlink":
        live.unlink()
        live.symlink_to(v2, target_is_directory=True)
    else:
        other = tmp_path / "elsewhere"
        shutil.copytree(v2, other / "live")
        monkeypatch.chdir(other)
    second = bundle.load("live" if swap == "relative" else live, threads=1)
    assert new_digest in _mapped_library_digests(), "the new bundle's session runs another library"
    for a, b in zip(second.run(None, {"logits": X}), expected):
        np.testing.assert_array_equal(a, b)  # (the same kernel code: only a message differs)
    # the old session still runs, on its own library
    np.testing.assert_array_equal(first.run(None, {"logits": X})[1], expected[1])
    assert old_digest in _mapped_library_digests()


def test_load_takes_the_callers_session_options(tmp_path):
    """A server sets its own session options (e.g. no CPU memory arena, so one large
    request's memory goes back to the system); load registers the library into them."""
    import onnxruntime as ort

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

    # one SessionOptions object per load: ORT registers one library per object
    with pytest.raises(ToolkitError, match="already hold a registered op library") as err:
        bundle.load(tmp_path / "b", session_options=so)
    assert "pass a new onnxruntime.SessionOptions to each load" in err.value.hint


def test_a_swap_with_no_room_for_the_copy(tmp_path, monkeypatch):
    """Old sessions alive and no usable temporary directory: a named error and no
    partial file; once the old sessions are released, the path loads as is."""
    import gc

    from toolkit.errors import OpLibraryError

    v1, v2, _, new_digest = _two_versions(tmp_path)
    live = tmp_path / "live"
    shutil.copytree(v1, live)
    first = bundle.load(live, threads=1)
    live.rename(tmp_path / "retired")
    shutil.copytree(v2, live)
    blocked = tmp_path / "tmp"
    blocked.write_text("a file where the temporary directory should be")
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(blocked))
    with pytest.raises(OpLibraryError, match="differs from the op library this process still has open") as err:
        bundle.load(live, threads=1)
    assert "release the sessions of the previous bundle" in err.value.hint
    assert not list(tmp_path.glob("**/.partial-*"))
    del first
    gc.collect()
    second = bundle.load(live, threads=1)  # the loader closed v1's library: the path is read afresh
    assert new_digest in _mapped_library_digests()
    second.run(None, {"logits": X})
