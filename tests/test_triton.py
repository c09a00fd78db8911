"""`toolkit package --triton`: the model repository, validated against Triton's own schema.

The bundles here are small decoder-shaped graphs (the exported I/O names, a KV
cache, a FusedSoftmaxTopK sampling head) written with :func:`toolkit.bundle.write`,
so the tests need no export. Each emitted ``config.pbtxt`` is parsed into Triton's
``inference.ModelConfig`` (``tritonclient``'s generated ``model_config_pb2``) and
compared with the ONNX graph; the repository's model is then opened the way
Triton's ONNX Runtime backend opens it (``RegisterCustomOpsLibrary`` on
``op_library_filename``, session from ``1/model.onnx``) and run once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient", reason="Triton's ModelConfig schema ships in tritonclient (test extra)")

import onnx
from onnx import TensorProto, helper

from toolkit import ops, triton
from toolkit.errors import ToolkitError

KV_HEADS, HEAD_DIM, VOCAB, K = 2, 4, 16, 5


def toolkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], check=False, capture_output=True, text=True,
                          timeout=300)


def _decoder(sampled_seed: bool = False) -> onnx.ModelProto:
    """A decoder-shaped graph: logits from input_ids, present = Concat(past, new), top-k head."""
    b, s, p = "batch_size", "sequence_length", "past_sequence_length"
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [b, s]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [b, "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [b, s]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [b, KV_HEADS, p, HEAD_DIM]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [b, s, VOCAB]),
        helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [b, KV_HEADS, f"{p} + {s}", HEAD_DIM]),
        helper.make_tensor_value_info("next_token_probs", TensorProto.FLOAT, [b, K]),
        helper.make_tensor_value_info("next_token_ids", TensorProto.INT64, [b, K]),
    ]
    rng = np.random.default_rng(0)
    inits = [
        helper.make_tensor("embed", TensorProto.FLOAT, [VOCAB, VOCAB], rng.standard_normal(VOCAB * VOCAB)),
        helper.make_tensor("kv", TensorProto.FLOAT, [VOCAB, KV_HEADS * HEAD_DIM],
                           rng.standard_normal(VOCAB * KV_HEADS * HEAD_DIM)),
        helper.make_tensor("kv_shape", TensorProto.INT64, [4], [0, -1, KV_HEADS, HEAD_DIM]),
        helper.make_tensor("last", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["logits"]),
        helper.make_node("Gather", ["kv", "input_ids"], ["new_flat"]),
        helper.make_node("Reshape", ["new_flat", "kv_shape"], ["new_bshd"]),
        helper.make_node("Transpose", ["new_bshd"], ["new"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["past_key_values.0.key", "new"], ["present.0.key"], axis=2),
        helper.make_node("Gather", ["logits", "last"], ["last_logits3"], axis=1),
        helper.make_node("Squeeze", ["last_logits3", "axis1"], ["last_logits"]),
        helper.make_node("FusedSoftmaxTopK", ["last_logits"], ["next_token_probs", "next_token_ids"],
                         domain=ops.DOMAIN, k=K),
    ]
    if sampled_seed:  # a tensor with no batch dimension (a static [1], as sampled heads' seeds were)
        inputs.append(helper.make_tensor_value_info("sampling_seed", TensorProto.INT64, [1]))
        outputs.append(helper.make_tensor_value_info("seed_out", TensorProto.INT64, [1]))
        nodes.append(helper.make_node("Identity", ["sampling_seed"], ["seed_out"]))
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])
    model.ir_version = 10
    return model


def make_bundle(directory: Path, sampled_seed: bool = False) -> Path:
    from toolkit import bundle

    directory.mkdir(parents=True)
    model = _decoder(sampled_seed)
    onnx.save(model, str(directory / "model.onnx"))
    bundle.write(directory, model, {"passes": []}, None)
    return directory


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("triton") / "tiny-decoder")


def test_repository_layout_and_schema(bundle_dir, tmp_path):
    repo = tmp_path / "repo"
    r = toolkit("package", str(bundle_dir), "--triton", str(repo), "--name", "tiny")
    assert r.returncode == 0, r.stderr
    model_dir = repo / "tiny"
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]  # no staging left behind
    assert (model_dir / "config.pbtxt").is_file() and (model_dir / "1" / "model.onnx").is_file()
    assert (model_dir / "1" / "manifest.json").is_file()

    config = triton.parse_config(model_dir / "config.pbtxt")
    pb2 = triton.model_config_schema()
    assert isinstance(config, pb2.ModelConfig)
    assert (config.name, config.platform, config.backend) == ("tiny", "onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    types = {t.name: (pb2.DataType.Name(t.data_type), list(t.dims)) for t in list(config.input) + list(config.output)}
    assert types == {
        "input_ids": ("TYPE_INT64", [-1, -1]),
        "attention_mask": ("TYPE_INT64", [-1, -1]),
        "position_ids": ("TYPE_INT64", [-1, -1]),
        "past_key_values.0.key": ("TYPE_FP32", [-1, KV_HEADS, -1, HEAD_DIM]),
        "logits": ("TYPE_FP32", [-1, -1, VOCAB]),
        "present.0.key": ("TYPE_FP32", [-1, KV_HEADS, -1, HEAD_DIM]),
        "next_token_probs": ("TYPE_FP32", [-1, K]),
        "next_token_ids": ("TYPE_INT64", [-1, K]),
    }
    (lib,) = config.model_operations.op_library_filename
    assert lib == str((model_dir / "libtoolkit_ops.so").resolve())
    assert Path(lib).is_file()
    triton.validate_model_dir(model_dir)


def test_repository_runs_as_the_onnxruntime_backend_loads_it(bundle_dir, tmp_path):
    """Register op_library_filename, open 1/model.onnx, feed a request shaped by the config."""
    import onnxruntime as ort

    repo = tmp_path / "repo"
    assert toolkit("package", str(bundle_dir), "--triton", str(repo), "--name", "m").returncode == 0
    config = triton.parse_config(repo / "m" / "config.pbtxt")
    so = ort.SessionOptions()
    for lib in config.model_operations.op_library_filename:
        so.register_custom_ops_library(lib)
    sess = ort.InferenceSession(str(repo / "m" / "1" / config.default_model_filename), so,
                                providers=["CPUExecutionProvider"])
    # One request as a client would send it: every dimension explicit (max_batch_size 0).
    feeds = {"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.ones((1, 3), np.int64),
             "position_ids": np.arange(3)[None],
             "past_key_values.0.key": np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)}
    assert set(feeds) == {t.name for t in config.input}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    assert set(outs) == {t.name for t in config.output}
    assert outs["present.0.key"].shape == (1, KV_HEADS, 3, HEAD_DIM)
    assert outs["next_token_ids"][0, 0] == int(outs["logits"][0, -1].argmax())


def test_dynamic_batching_and_instances(bundle_dir, tmp_path):
    repo = tmp_path / "repo"
    r = toolkit("package", str(bundle_dir), "--triton", str(repo), "--max-batch-size", "8",
                "--instance-count", "2", "--instance-kind", "cpu")
    assert r.returncode == 0, r.stderr
    config = triton.validate_model_dir(repo / "tiny-decoder")  # default name: the bundle directory's
    assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 100
    dims = {t.name: list(t.dims) for t in config.input}
    assert dims["input_ids"] == [-1] and dims["past_key_values.0.key"] == [KV_HEADS, -1, HEAD_DIM]
    (group,) = config.instance_group
    assert group.count == 2 and triton.model_config_schema().ModelInstanceGroup.Kind.Name(group.kind) == "KIND_CPU"


def test_batching_refused_without_batch_dimension(tmp_path):
    sampled = make_bundle(tmp_path / "sampled", sampled_seed=True)
    r = toolkit("package", str(sampled), "--triton", str(tmp_path / "repo"), "--max-batch-size", "4")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sampling_seed" in r.stderr and "--max-batch-size 0" in r.stderr
    assert not (tmp_path / "repo" / "sampled").exists()
    # the default (explicit batch dimension) is fine for it
    assert toolkit("package", str(sampled), "--triton", str(tmp_path / "repo")).returncode == 0
    triton.validate_model_dir(tmp_path / "repo" / "sampled")


def test_a_sampled_heads_seed_batches_one_per_row():
    """The sampling-head pass's seed input is [seeds] (one, or one per row): with server
    batching each request's seed becomes its row's, so it is not refused."""
    sys.path.insert(0, str(Path(__file__).parent / "passes"))
    from test_sampling_head import _lm_graph

    from passes import run_pipeline

    out, _ = run_pipeline(_lm_graph(), ["sampling-head"], {"sampling-head": {"k": 20, "sample": "true"}})
    inputs, outputs = triton.graph_io(out)
    assert tuple({t.name: t.dims for t in inputs}["sampling_seed"]) == (-1,)
    config = triton.render_config(triton.TritonOptions(name="m", max_batch_size=4), inputs, outputs, None)
    assert "dynamic_batching" in config and "sampling_seed" in config


def test_served_root_maps_the_library_path(bundle_dir, tmp_path):
    repo = tmp_path / "repo"
    r = toolkit("package", str(bundle_dir), "--triton", str(repo), "--name", "tiny", "--served-root", "/models")
    assert r.returncode == 0, r.stderr
    assert "/models/tiny/libtoolkit_ops.so" in r.stdout
    config = triton.parse_config(repo / "tiny" / "config.pbtxt")
    assert list(config.model_operations.op_library_filename) == ["/models/tiny/libtoolkit_ops.so"]
    triton.validate_model_dir(repo / "tiny", served_dir="/models/tiny")
    with pytest.raises(ToolkitError, match="does not exist"):
        triton.validate_model_dir(repo / "tiny")  # as seen from here, /models/... is absent


def test_existing_model_dir_and_other_models_untouched(bundle_dir, tmp_path):
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    assert toolkit("package", str(bundle_dir), "--triton", str(repo), "--name", "tiny").returncode == 0
    r = toolkit("package", str(bundle_dir), "--triton", str(repo), "--name", "tiny")
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    r = toolkit("package", str(bundle_dir), "--triton", str(repo), "--name", "tiny", "--overwrite",
                "--max-batch-size", "2")
    assert r.returncode == 0, r.stderr
    assert triton.parse_config(repo / "tiny" / "config.pbtxt").max_batch_size == 2
    assert sorted(p.name for p in repo.iterdir()) == ["other", "tiny"]
    assert (repo / "other" / "config.pbtxt").read_text() == 'name: "other"\n'


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('data_type: TYPE_INT64 dims: [ -1, 5 ]', 'data_type: TYPE_INT32 dims: [ -1, 5 ]'),
     "'next_token_ids': config type TYPE_INT32, model type TYPE_INT64"),
    (lambda t: t.replace('dims: [ -1, 2, -1, 4 ] },\n', 'dims: [ -1, 2, -1 ] },\n', 1),
     "config rank 3"),
    (lambda t: t.replace(',\n  { name: "next_token_probs" data_type: TYPE_FP32 dims: [ -1, 5 ] }', ''),
     "model output 'next_token_probs' is not declared"),
    (lambda t: t.replace('dims: [ -1, -1, 16 ]', 'dims: [ -1, -1, 17 ]'), "dimension 2 is 17 in the config, 16"),
    (lambda t: t.replace('name: "tiny"', 'name: "other"'), "differs from the model directory name"),
    (lambda t: t.replace('max_batch_size: 0', 'max_batch_size: 0\ndynamic_batching { }'),
     "dynamic_batching needs max_batch_size > 0"),
    (lambda t: t[:t.index("model_operations")] + 'model_operations { op_library_filename: "libtoolkit_ops.so" }\n',
     "is relative"),
    (lambda t: t[:t.index("model_operations")], "names no op library"),
    (lambda t: t.replace("platform:", "platfrom:"), "not a valid Triton model configuration"),
])
def test_validation_names_each_problem(bundle_dir, tmp_path, edit, message):
    repo = tmp_path / "repo"
    assert toolkit("package", str(bundle_dir), "--triton", str(repo), "--name", "tiny").returncode == 0
    path = repo / "tiny" / "config.pbtxt"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ToolkitError) as info:
        triton.validate_model_dir(repo / "tiny")
    assert message in str(info.value)


def test_missing_files_are_reported(bundle_dir, tmp_path):
    repo = tmp_path / "repo"
    assert toolkit("package", str(bundle_dir), "--triton", str(repo), "--name", "tiny").returncode == 0
    (repo / "tiny" / "libtoolkit_ops.so").unlink()
    (repo / "tiny" / "1" / "model.onnx").unlink()
    with pytest.raises(ToolkitError) as info:
        triton.validate_model_dir(repo / "tiny")
    assert "libtoolkit_ops.so' does not exist" in str(info.value) and "model.onnx is missing" in str(info.value)


def test_bad_bundles_write_nothing(bundle_dir, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    r = toolkit("package", str(tmp_path / "nope"), "--triton", str(repo))
    assert r.returncode == 2 and "nope' does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()  # a directory that is no bundle: its missing manifest is named
    r = toolkit("package", str(tmp_path / "empty"), "--triton", str(repo))
    assert r.returncode == 2 and "manifest.json" in r.stderr and "Traceback" not in r.stderr
    altered = tmp_path / "altered"
    shutil.copytree(bundle_dir, altered)
    with open(altered / "libtoolkit_ops.so", "ab") as f:
        f.write(b"\0")
    r = toolkit("package", str(altered), "--triton", str(repo))
    assert r.returncode == 2 and "SHA-256" in r.stderr
    r = toolkit("package", str(bundle_dir), "--triton", str(repo), "--name", ".hidden")
    assert r.returncode == 2 and "--name" in r.stderr
    assert not repo.exists() or list(repo.iterdir()) == []
