"""The ``float16`` pass (``toolkit convert --float16``) and float16 files from ONNX Runtime's
converter run by hand.

References: the same model in float32 (the float16 model must stay within float16
rounding of it: logits within 2e-2 absolute on these random-weight models, whose
logits are of magnitude ~1, while moving them by more than 1e-6; the PyTorch
comparison is parity's, with the fp16 profile, in the CLI test), and exact equality
where nothing is computed in float16 (a full-precision residual window passed through).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from test_kv_cache_pass import decoder, prompts, run_steps

from passes.pipeline import run_pipeline
from toolkit import ops
from toolkit.errors import InvalidModelError

FP16_LOGITS_ATOL = 2e-2


def _float_weights(model: onnx.ModelProto) -> dict[int, int]:
    counts: dict[int, int] = {}
    for t in model.graph.initializer:
        counts[t.data_type] = counts.get(t.data_type, 0) + 1
    return counts


def test_float16_decoder_stays_within_float16_rounding_of_float32(exported):
    _, path = exported("llama")
    fp32, _ = run_pipeline(onnx.load(str(path)), ["cleanup"])
    fp16, report = run_pipeline(onnx.load(str(path)), ["float16", "cleanup"])
    details = report["float16"].details
    assert details["float32_weights_converted"] > 0 and details["float32_weights_kept"] == 0
    assert TensorProto.FLOAT not in _float_weights(fp16)
    assert fp16.metadata_props and {p.key: p.value for p in fp16.metadata_props}["toolkit.parity_profile"] == "fp16"
    # I/O keep their types: hosts feed it as before
    assert [(v.name, v.type.tensor_type.elem_type) for v in fp16.graph.input] == \
        [(v.name, v.type.tensor_type.elem_type) for v in fp32.graph.input]
    ids, mask = prompts()
    ref, _ = run_steps(decoder(fp32), ids, mask, steps=5)
    got, _ = run_steps(decoder(fp16), ids, mask, steps=5)
    diff = np.abs(got - ref).max()
    assert 1e-6 < diff <= FP16_LOGITS_ATOL, diff


def test_quantized_cache_stays_float32_and_its_residual_window_is_not_rounded(exported):
    """QuantKVAttention takes float32: it stays a float32 island. ONNX Runtime's converter
    routes a float32 input that only passes through as Cast(float16) -> Cast(float32),
    which rounded the full-precision residual window; the pass removes those round trips,
    so a past residual of float32 values comes back out bit for bit."""
    _, path = exported("llama")
    kv = {"kv-cache": {"scheme": "kivi4", "group": "8", "residual": "64"}}
    fp32, _ = run_pipeline(onnx.load(str(path)), ["kv-cache", "cleanup"], kv)
    fp16, report = run_pipeline(onnx.load(str(path)), ["kv-cache", "float16", "cleanup"], kv)
    assert report["float16"].details["float32_ops_kept"] == 2
    assert report["float16"].details["cast_round_trips_removed"] > 0
    consumers = {i: n.op_type for n in fp16.graph.node for i in n.input}
    producers = {o: n.op_type for n in fp16.graph.node for o in n.output}
    for v in fp16.graph.input:
        if v.name.endswith(("_res", "_q", "_scale", "_zero")):
            assert consumers[v.name] == "QuantKVAttention", v.name
    for v in fp16.graph.output:
        if v.name.startswith("present."):
            assert producers[v.name] == "QuantKVAttention", v.name
    ids, mask = prompts()
    ref, _ = run_steps(decoder(fp32), ids, mask, steps=5)
    got, past = run_steps(decoder(fp16), ids, mask, steps=5)
    assert np.abs(got - ref).max() <= FP16_LOGITS_ATOL
    # one more step from a residual of arbitrary float32 values (not float16-representable)
    dec = decoder(fp16)
    res = {k: v for k, v in past.items() if k.endswith("_res")}
    rng = np.random.default_rng(0)
    for k in res:
        past[k] = (rng.standard_normal(past[k].shape) * 1.2345678).astype(np.float32)
    mask = np.concatenate([mask, np.ones((ids.shape[0], 6), np.int64)], 1)  # the 5 steps' tokens and this one
    _, present, _ = dec.step(np.full((ids.shape[0], 1), 5, np.int64), mask, (np.cumsum(mask, -1) - 1)[:, -1:], past)
    for k in res:
        kept = past[k].shape[2]
        np.testing.assert_array_equal(present[k][:, :, :kept], past[k], err_msg=k)


def test_low_rank_factors_become_float16_and_are_read_directly(exported):
    """ORT's converter keeps the weights of a float32-only op float32 (behind a no-op
    Cast); LowRankMatMul takes float16 factors and widens them exactly, so the pass
    stores them float16 (the float32 factors rounded, as every other weight) and feeds
    them to the op directly: half the bytes, logits within float16 rounding."""
    from onnx import numpy_helper

    _, path = exported("llama")
    lr = {"low-rank": {"rank_ratio": "0.5"}}
    fp32, report32 = run_pipeline(onnx.load(str(path)), ["low-rank", "cleanup"], lr)
    model, report = run_pipeline(onnx.load(str(path)), ["low-rank", "float16", "cleanup"], lr)
    rewired = report["float16"].details["low_rank_ops_with_float16_factors"]
    assert rewired == report["low-rank"].count == report32["low-rank"].count > 0
    assert report["float16"].details["float32_weights_kept"] == 0
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights32 = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    factors = [name for n in model.graph.node if n.op_type == "LowRankMatMul" for name in n.input[1:3]]
    assert len(factors) == 2 * rewired
    for name in factors:  # an initializer the op reads itself: no Cast in between
        assert weights[name].dtype == np.float16
        np.testing.assert_array_equal(weights[name], weights32[name].astype(np.float16))
    ids, mask = prompts()
    ref, _ = run_steps(decoder(fp32), ids, mask, steps=3)
    got, _ = run_steps(decoder(model), ids, mask, steps=3)
    assert 1e-6 < np.abs(got - ref).max() <= FP16_LOGITS_ATOL


def test_sampling_head_and_portable_bodies_in_float16(exported):
    """The fused sampling op reads float16 logits; SampleTopKTopP stays float32; portable
    runs after the conversion, so the model still runs without the library."""
    import onnxruntime as ort

    from toolkit.parity import OnnxDecoder

    _, path = exported("llama")
    opts = {"sampling-head": {"k": "8", "sample": "true"}}
    model, _ = run_pipeline(onnx.load(str(path)), ["sampling-head", "float16", "portable", "cleanup"], opts)
    blob = model.SerializeToString()
    decoders = [OnnxDecoder(ort.InferenceSession(blob, providers=["CPUExecutionProvider"])),
                OnnxDecoder(ort.InferenceSession(blob, ops.session_options(1), providers=["CPUExecutionProvider"]))]
    ids, mask = prompts()
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    tokens = [dec.step(ids, mask, pos, dec.empty_past(3))[2]["next_token"] for dec in decoders]
    np.testing.assert_array_equal(tokens[0], tokens[1])


def test_float16_after_portable_is_refused(exported):
    from passes.pipeline import PIPELINE_ORDER

    assert PIPELINE_ORDER.index("float16") < PIPELINE_ORDER.index("portable")
    _, path = exported("llama")
    opts = {"kv-cache": {"scheme": "int8", "residual": "0"}}
    portable, _ = run_pipeline(onnx.load(str(path)), ["kv-cache", "portable"], opts)
    from toolkit.errors import PassError

    with pytest.raises(PassError, match="local functions") as err:
        run_pipeline(portable, ["float16"])
    assert "before portable" in err.value.hint


def test_toolkit_loads_an_unsorted_float16_file(exported, tmp_path):
    """onnxruntime.transformers.float16 run by hand appends its input Casts after their
    readers: ONNX Runtime runs the file, and toolkit's loader (every command) now sorts
    it in memory instead of refusing it; a graph that sorting cannot fix is still refused
    with the checker's whole message."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from toolkit.parity import load_onnx

    _, path = exported("llama")
    raw = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True,
                                   op_block_list=list(ops.FLOAT32_ONLY_OPS))
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(raw)
    onnx.save(raw, tmp_path / "raw.onnx")
    loaded = load_onnx(tmp_path / "raw.onnx")
    onnx.checker.check_model(loaded)
    assert len(loaded.graph.node) == len(raw.graph.node)
    ids, mask = prompts()
    ref, _ = run_steps(decoder(tmp_path / "raw.onnx"), ids, mask, steps=2)  # ORT on the file as written
    got, _ = run_steps(decoder(loaded), ids, mask, steps=2)
    np.testing.assert_array_equal(got, ref)

    # a value read before any node produces it, which no order fixes
    broken = onnx.load(str(tmp_path / "raw.onnx"))
    broken.graph.node[-1].input[0] = broken.graph.node[0].output[0] + "_nowhere"
    onnx.save(broken, tmp_path / "broken.onnx")
    with pytest.raises(InvalidModelError, match="topologically sorted.*_nowhere|_nowhere.*topologically sorted"):
        load_onnx(tmp_path / "broken.onnx")


def test_parity_judges_a_hand_converted_float16_model_by_the_fp16_profile(exported, tmp_path):
    """A float16 model without toolkit metadata (ORT's converter run by hand) failed the
    fp32 bounds by design; parity now picks the fp16 profile from its weights, says so,
    and passes it (the float32 export stays on fp32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from toolkit import parity

    src, path = exported("llama")
    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), tmp_path / "half.onnx")
    settings = parity.ParitySettings(batch_sizes=(1, 3), decode_steps=2)
    report = parity.check(src, tmp_path / "half.onnx", settings)
    assert report.profile == "fp16" and "weight matrices are float16" in report.profile_note
    assert report.passed
    report = parity.check(src, path, settings)
    assert report.profile == "fp32" and report.profile_note is None and report.passed


def test_converting_a_float16_model_again(exported):
    """--float16 on its own output is a no-op (it crashed: ORT's converter named its new
    Casts as the previous run's, a redeclared output); a float16 model from ORT's
    converter run by hand, with no toolkit metadata, converts again and runs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _, path = exported("llama")
    once, _ = run_pipeline(onnx.load(str(path)), ["float16"])
    twice, report = run_pipeline(once, ["float16"], explain=True)
    assert report["float16"].count == 0 and "float16 already" in report["float16"].explanations[0]
    assert len(twice.graph.node) == len(once.graph.node)
    raw = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    assert any(n.name.startswith("graph_input_cast") for n in raw.graph.node)
    again, _ = run_pipeline(raw, ["float16", "cleanup"])
    ids, mask = prompts()
    ref, _ = run_steps(decoder(once), ids, mask, steps=2)
    got, _ = run_steps(decoder(again), ids, mask, steps=2)
    np.testing.assert_allclose(got, ref, rtol=0, atol=FP16_LOGITS_ATOL)


def test_a_weight_beyond_float16_range_is_refused_by_name(exported):
    """The converter clamps to 65504 silently: a weight of 1e5 gave all-NaN logits in a
    bundle written without parity (audit). A weight matrix beyond the range is refused,
    named; the export's scalar fills (-3.4e38 masks) still convert."""
    from onnx import numpy_helper

    from toolkit.errors import PassError

    _, path = exported("llama")
    model = onnx.load(str(path))
    index, weight = next((i, t) for i, t in enumerate(model.graph.initializer)
                         if t.data_type == TensorProto.FLOAT and len(t.dims) == 2)
    array = numpy_helper.to_array(weight).copy()
    array[0, 0] = 1e5
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, weight.name))
    with pytest.raises(PassError, match=rf"beyond float16's range.*'{weight.name}' \(\|w\| up to 1e\+05\)"):
        run_pipeline(model, ["float16"])


def test_a_float16_cache_io_is_labelled_float16(exported):
    """keep_io_types=false: the cache inputs/outputs become float16 and the metadata says
    so (it said fp32); the decoder feeds and reads them as float16."""
    from toolkit.parity import OnnxDecoder

    _, path = exported("llama")
    model, _ = run_pipeline(onnx.load(str(path)), ["float16"], {"float16": {"keep_io_types": "false"}})
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["toolkit.kv_cache"] == "fp16"
    past = [v for v in model.graph.input if v.name.startswith("past_key_values.")]
    assert past and all(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in past)
    dec = decoder(model)
    assert isinstance(dec, OnnxDecoder)
    ids, mask = prompts()
    fp32, _ = run_pipeline(onnx.load(str(path)), ["float16"])
    ref, _ = run_steps(decoder(fp32), ids, mask, steps=2)
    got, cache = run_steps(dec, ids, mask, steps=2)
    assert all(v.dtype == np.float16 for v in cache.values())
    np.testing.assert_allclose(got, ref, rtol=0, atol=FP16_LOGITS_ATOL)


def test_range_check_reads_every_weight_and_only_weights():
    """A weight of 1e5 in a Constant node or an If branch was clamped unrefused (review
    audit); a 2-D mask filled with float32's minimum (read by an Add, not a weight) is
    clamped to -65504 by the converter, still a mask, and converts."""
    from onnx import helper, numpy_helper

    from toolkit.errors import PassError

    big = np.array([[1e5, 1.0], [1.0, 1.0]], np.float32)

    def model(nodes, inits=(), opset=21):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], initializer=list(inits))
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])

    constant = model([helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(big, "w")),
                      helper.make_node("MatMul", ["x", "w"], ["y"])])
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "wb"], ["yb"])], "then", [],
                               [helper.make_tensor_value_info("yb", TensorProto.FLOAT, [1, 2])],
                               initializer=[numpy_helper.from_array(big, "wb")])
    in_if = model([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
                   helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)])
    for m, name in ((constant, "'w'"), (in_if, "'wb'")):
        with pytest.raises(PassError, match=f"beyond float16's range.*{name}"):
            run_pipeline(m, ["float16"])
    mask = np.triu(np.full((2, 2), np.finfo(np.float32).min, np.float32), 1)
    masked = model([helper.make_node("Add", ["x", "m"], ["y"])], [numpy_helper.from_array(mask, "m")])
    out, _ = run_pipeline(masked, ["float16"])
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
