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
    (_manifest(model=None), "field 'model' must be the model file's name, got None"),
    ({k: v for k, v in _manifest().items() if k != "model"}, "field 'model'"),
    (_manifest(op_library="lib.so"), "field 'op_library' must be an object or null"),
    (_manifest(op_library={"file": None, "sha256": "00", "min_ort_api_version": 17}), "'op_library.file'"),
    (_manifest(op_library={"file": "a.so", "min_ort_api_version": 17}), "'op_library.sha256'"),
    (_manifest(op_library={"file": "a.so", "sha256": "00", "min_ort_api_version": "17"}),
     "'op_library.min_ort_api_version' must be an integer"),
    (_manifest(op_library={"file": "a.so", "sha256": "00", "min_ort_api_version": 17, "providers": "CPU"}),
     "'op_library.providers'"),
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
