"""The ``kv-cache`` pass on exported decoders: structure, exactness, quantized decode.

Exactness: with a residual window longer than every sequence in the test nothing is
ever quantized, so the rewritten model must reproduce the original ONNX model's
logits (1e-4 absolute: float32 attention summed in another order). With a small
window the cache is quantized after a few tokens: the logits must move (the test
would catch a pass that silently kept full precision) but stay close (cosine >=
0.99, same greedy token on >= 90% of rows; the op's exact numerics are tested
against the NumPy reference in tests/ops/test_kv_attention.py).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from passes.pipeline import run_pipeline
from toolkit import ops
from toolkit.errors import PassError
from toolkit.parity import OnnxDecoder

FAMILIES = ["llama", "gpt2", "hf:gpt2", "hf:llama", "hf:qwen2", "hf:mistral", "hf:phi3"]


def convert(path, scheme="kivi4", group=8, residual=16, capacity=0, quantize_query=False):
    """The kv-cache pass; `group` is left out for int8 (one scale per token: no groups)."""
    model = onnx.load(str(path))
    options = {"scheme": scheme, "residual": str(residual), "capacity": str(capacity),
               "quantize_query": str(quantize_query)}
    if not scheme.startswith("int8") and group is not None:
        options["group"] = str(group)
    out, report = run_pipeline(model, ["kv-cache", "cleanup"], {"kv-cache": options})
    return out, report


def decoder(model_or_path):
    so = ops.session_options(1)
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return OnnxDecoder(ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]))


def run_steps(dec, ids, mask, steps, seed=0):
    """Left-padded prefill then greedy-free decode of random tokens; logits of every call."""
    rng = np.random.default_rng(seed)
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    logits, past, _ = dec.step(ids, mask, pos, dec.empty_past(ids.shape[0]))
    out = [logits[:, -1]]
    for _ in range(steps):
        nxt = rng.integers(3, 200, (ids.shape[0], 1)).astype(np.int64)
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], 1)
        pos = (np.cumsum(mask, -1) - 1)[:, -1:]
        logits, past, _ = dec.step(nxt, mask, pos, past)
        out.append(logits[:, -1])
    return np.stack(out, 1), past


def prompts(batch=3, length=11, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 200, (batch, length)).astype(np.int64)
    mask = np.ones_like(ids)
    for b in range(batch):
        mask[b, : 3 * b] = 0  # left padding: 0, 3, 6 tokens
        ids[b, : 3 * b] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_rewrite_is_exact_while_nothing_is_quantized(exported, family):
    src, path = exported(family)
    model, report = convert(path, "kivi4", group=32, residual=64)
    assert report.counts["kv-cache"] == src.num_layers
    onnx.checker.check_model(model)
    ops_used = [n.op_type for n in model.graph.node]
    assert ops_used.count("QuantKVAttention") == src.num_layers
    assert "Softmax" not in ops_used
    names = [i.name for i in model.graph.input]
    assert "past_key_values.0.key" not in names and "past_key_values.0.key_q" in names
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["toolkit.kv_quant"])["layers"] == src.num_layers
    assert meta["toolkit.parity_profile"] == "kv-int4"

    ids, mask = prompts()
    ref, _ = run_steps(decoder(path), ids, mask, steps=8)
    got, past = run_steps(decoder(model), ids, mask, steps=8)
    assert past["past_key_values.0.key_q"].shape[2] == 0  # 19 tokens < R = 64: all full precision
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "hf:gpt2", "hf:qwen2"])
@pytest.mark.parametrize("scheme", ["int8", "kivi4", "kivi2"])
def test_quantized_decode_moves_but_stays_close(exported, family, scheme):
    _, path = exported(family)
    # int8 as its preset (no residual window: every past token quantized); KIVI with R = 8
    model, _ = convert(path, scheme, group=8, residual=8 if scheme.startswith("kivi") else -1)
    ids, mask = prompts(length=20)
    ref, _ = run_steps(decoder(path), ids, mask, steps=12)
    got, past = run_steps(decoder(model), ids, mask, steps=12)
    assert past["past_key_values.0.key_q"].shape[2] > 0  # the cache really is quantized
    diff = float(np.abs(got - ref).max())
    assert diff > 1e-5, diff
    a, b = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= (0.999 if scheme == "int8" else 0.99), cos.min()
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9


def test_symmetric_int8_has_no_zero_points(exported):
    _, path = exported("llama")
    model, _ = convert(path, "int8")
    names = [i.name for i in model.graph.input] + [o.name for o in model.graph.output]
    assert not any(n.endswith("_zero") for n in names)
    assert "present.1.value_scale" in names


def test_model_without_cache_inputs_is_left_alone():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    _, report = run_pipeline(model, ["kv-cache"], {})
    assert report.counts["kv-cache"] == 0
    assert "past_key_values" in report["kv-cache"].explanations[0]


def test_attention_probabilities_used_elsewhere_is_a_named_error(exported):
    _, path = exported("llama")
    model = onnx.load(str(path))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.output.append(onnx.helper.make_tensor_value_info(softmax.output[0], onnx.TensorProto.FLOAT, None))
    with pytest.raises(PassError) as err:
        run_pipeline(model, ["kv-cache"], {"kv-cache": {"scheme": "kivi4", "group": "8", "residual": "16"}})
    msg = str(err.value)
    assert "layer 0" in msg and "attention probabilities" in msg and softmax.output[0] in msg


def test_a_float16_cache_is_refused_by_name(exported):
    """A model cast to float16 (ORT's float16 converter) was rewritten, and ONNX Runtime
    then refused to load it (QuantKVAttention takes float32): now the pass says so."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _, path = exported("llama")
    half = convert_float_to_float16(onnx.load(str(path)), keep_io_types=False)
    ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])  # a model ORT runs
    with pytest.raises(PassError, match="'past_key_values.0.key' is float16; QuantKVAttention takes float32") as err:
        run_pipeline(half, ["kv-cache"], {"kv-cache": {"scheme": "int8"}})
    assert "--float16" in err.value.hint


def test_a_one_input_concat_on_the_cache_is_looked_through(exported, tmp_path):
    """The TorchScript exporter writes Concat(past) (an identity) before the real one, and
    reads the past length through it; the pass stopped there (with a hint to simplify the
    model first) and now takes it: exact while nothing is quantized."""
    _, path = exported("llama")
    model = onnx.load(str(path))
    concat = next(n for n in model.graph.node if n.op_type == "Concat" and n.input[0] == "past_key_values.0.key")
    concat.input[0] = "past_copy"
    shape = next(n for n in model.graph.node if n.op_type == "Shape" and n.input[0] == "past_key_values.0.key")
    shape.input[0] = "past_copy"  # the past length, read through the identity
    model.graph.node.insert(0, onnx.helper.make_node("Concat", ["past_key_values.0.key"], ["past_copy"], axis=2))
    original = tmp_path / "identity_concat.onnx"
    onnx.save(model, str(original))
    rewritten, report = convert(original, "kivi4", group=32, residual=64)
    assert report.counts["kv-cache"] == 2
    ids, mask = prompts()
    ref, _ = run_steps(decoder(original), ids, mask, steps=6)
    got, _ = run_steps(decoder(rewritten), ids, mask, steps=6)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "hf:gpt2", "hf:qwen2", "hf:phi3"])
@pytest.mark.parametrize("scheme", ["int8", "kivi2"])
def test_fixed_capacity_model_matches_the_growing_cache_bit_for_bit(exported, family, scheme):
    """--kv-capacity: static cache shapes and a lengths tensor; the same logits, exactly.

    The op computes the same arithmetic in both cache modes, so the converted models
    must agree to the bit over a left-padded prefill and decode steps that quantize.
    """
    _, path = exported(family)
    grow, _ = convert(path, scheme, group=8, residual=8)
    cap, _ = convert(path, scheme, group=8, residual=8, capacity=48)
    inputs = {i.name: i for i in cap.graph.input}
    dims = [d.dim_value or d.dim_param for d in inputs["past_key_values.0.key_q"].type.tensor_type.shape.dim]
    assert dims[2] == 48
    assert [d.dim_value for d in inputs["past_key_values.lengths"].type.tensor_type.shape.dim] == [2]
    assert "present.lengths" in [o.name for o in cap.graph.output]
    meta = json.loads({p.key: p.value for p in cap.metadata_props}["toolkit.kv_quant"])
    assert meta["capacity"] == 48 and meta["residual_slots"] == 7  # R = 8 for every scheme, int8 included

    ids, mask = prompts(length=20)
    ref, past_grow = run_steps(decoder(grow), ids, mask, steps=12)
    got, past_cap = run_steps(decoder(cap), ids, mask, steps=12)
    np.testing.assert_array_equal(got, ref)
    n, r = (int(v) for v in past_cap["past_key_values.lengths"])
    assert (n, r) == (past_grow["past_key_values.0.key_q"].shape[2], past_grow["past_key_values.0.key_res"].shape[2])
    assert n + r == 32 and n > 0  # 20 + 12 tokens, quantized
    np.testing.assert_array_equal(past_cap["past_key_values.1.value_q"][:, :, :n], past_grow["past_key_values.1.value_q"])


@pytest.mark.parametrize("family", ["llama", "hf:qwen2"])
def test_int8_query_moves_the_logits_but_stays_close(exported, family):
    """--kv-quantize-query: every attention node rounds its query to int8 (the op's
    numerics are tested in tests/ops); the logits differ from the float-query int8
    model (the option really is applied) but stay as close to the original."""
    _, path = exported(family)
    plain, _ = convert(path, "int8")
    q8, _ = convert(path, "int8", quantize_query=True)
    nodes = [n for n in q8.graph.node if n.op_type == "QuantKVAttention"]
    assert nodes and all(onnx.helper.get_attribute_value(a) == 1
                         for n in nodes for a in n.attribute if a.name == "quantize_query")
    assert all(any(a.name == "quantize_query" for a in n.attribute) for n in nodes)
    assert not any(a.name == "quantize_query" for n in plain.graph.node for a in n.attribute)
    from toolkit.model_info import describe

    assert describe("q8.onnx", q8)["kv_cache"]["quantize_query"] is True  # what `toolkit inspect` shows
    assert describe("plain.onnx", plain)["kv_cache"]["quantize_query"] is False
    ids, mask = prompts(length=20)
    ref, _ = run_steps(decoder(path), ids, mask, steps=12)
    base, _ = run_steps(decoder(plain), ids, mask, steps=12)
    got, _ = run_steps(decoder(q8), ids, mask, steps=12)
    assert float(np.abs(got - base).max()) > 1e-5
    a, b = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= 0.999, cos.min()
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9


def test_portable_refuses_the_int8_query(exported):
    _, path = exported("llama")
    q8, _ = convert(path, "int8", quantize_query=True)
    with pytest.raises(PassError, match="quantize_query=1"):
        run_pipeline(q8, ["portable"], {})


def test_fixed_capacity_overflow_is_a_named_error(exported):
    _, path = exported("llama")
    cap, _ = convert(path, "int8", residual=0, capacity=16)  # no residual slots: 20 tokens overflow 16
    ids, mask = prompts(length=20)
    with pytest.raises(Exception, match="cache is full.*allocate a larger cache"):
        run_steps(decoder(cap), ids, mask, steps=0)


def test_convert_flags_for_the_fixed_capacity_cache():
    import argparse

    from toolkit.commands import convert as convert_cmd

    parser = argparse.ArgumentParser()
    convert_cmd.register(parser)
    args = parser.parse_args(["llama", "-o", "x", "--kv-cache", "kivi2", "--kv-capacity", "4096"])
    assert convert_cmd._pass_selection(args)[1]["kv-cache"]["capacity"] == "4096"
    with pytest.raises(PassError, match="--kv-capacity needs --kv-cache"):
        convert_cmd._pass_selection(parser.parse_args(["llama", "-o", "x", "--kv-capacity", "4096"]))
    with pytest.raises(PassError, match="cannot be combined with --portable"):
        convert_cmd._pass_selection(parser.parse_args(["llama", "-o", "x", "--kv-cache", "int8", "--kv-capacity",
                                                       "64", "--portable"]))


def test_convert_options_without_their_parent_flag_are_refused():
    """--kv-group / --kv-residual without --kv-cache, --sample without --sampling-head
    and a --pass-option of a pass that does not run used to be dropped silently (the
    model came out without them)."""
    import argparse

    from toolkit.commands import convert as convert_cmd

    parser = argparse.ArgumentParser()
    convert_cmd.register(parser)
    for extra, message in ((["--kv-group", "64"], "--kv-group needs --kv-cache"),
                           (["--kv-residual", "0"], "--kv-residual needs --kv-cache"),
                           (["--sample"], "--sample needs --sampling-head K"),
                           # an option of a pass that does not run (audit: silently ignored)
                           (["--pass-option", "float16.keep_io_types=false"],
                            "the pass 'float16' does not run here"),
                           (["--passes", "none", "--pass-option", "fuse-softmax-topk.max_k=8"],
                            "the pass 'fuse-softmax-topk' does not run")):
        with pytest.raises(PassError, match=message):
            convert_cmd._pass_selection(parser.parse_args(["llama", "-o", "x", *extra]))
    assert convert_cmd._pass_selection(parser.parse_args(
        ["llama", "-o", "x", "--float16", "--pass-option", "float16.keep_io_types=false"]))[1] == \
        {"float16": {"keep_io_types": "false"}}
    # a kv-cache pass option wins over a flag's default (the default overwrote it), and
    # conflicts with a flag given
    opts = convert_cmd._pass_selection(parser.parse_args(
        ["llama", "-o", "x", "--kv-cache", "int8", "--pass-option", "kv-cache.residual=4"]))[1]["kv-cache"]
    assert opts["residual"] == "4" and opts["scheme"] == "int8"
    with pytest.raises(PassError, match="kv-cache.residual=4 conflicts with --kv-residual, which sets residual to 8"):
        convert_cmd._pass_selection(parser.parse_args(["llama", "-o", "x", "--kv-cache", "int8", "--kv-residual", "8",
                                                       "--pass-option", "kv-cache.residual=4"]))
    # the same for every flag that sets a pass option (they overwrote it silently); the
    # same value, written another way, is no conflict
    for extra, message in ((["--sampling-head", "50", "--pass-option", "sampling-head.k=40"],
                            "sampling-head.k=40 conflicts with --sampling-head, which sets k to 50"),
                           (["--rank-ratio", "0.5", "--pass-option", "low-rank.rank_ratio=0.25"],
                            "low-rank.rank_ratio=0.25 conflicts with --rank-ratio")):
        with pytest.raises(PassError, match=message):
            convert_cmd._pass_selection(parser.parse_args(["llama", "-o", "x", *extra]))
    same = convert_cmd._pass_selection(parser.parse_args(["llama", "-o", "x", "--rank-ratio", "0.5", "--whiten",
                                                          "--pass-option", "low-rank.rank_ratio=.50",
                                                          "--pass-option", "low-rank.whiten=True"]))[1]
    assert same["low-rank"] == {"rank_ratio": "0.5", "whiten": "true"}
    # parity --bisect too
    from toolkit.cli import main

    assert main(["parity", "llama", "x.onnx", "--bisect", "--passes", "cleanup",
                 "--pass-option", "float16.keep_io_types=false"]) == 2
    opts = convert_cmd._pass_selection(parser.parse_args(["llama", "-o", "x", "--kv-cache", "kivi2", "--kv-group",
                                                          "64", "--kv-residual", "128"]))[1]["kv-cache"]
    assert (opts["group"], opts["residual"]) == ("64", "128")


def test_preset_is_refused_for_models_it_cannot_size():
    import argparse

    from toolkit.commands._common import add_model_args, resolve_model
    from toolkit.errors import ModelNotFoundError

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    add_model_args(parser)
    for model in ("hf:llama", "llama-stdlib"):
        with pytest.raises(ModelNotFoundError, match=f"--preset base applies to the built-in families .*'{model}'"):
            resolve_model(parser.parse_args([model, "--preset", "base"]))


def test_convert_flags_for_the_int8_query():
    import argparse

    from toolkit.commands import convert as convert_cmd

    parser = argparse.ArgumentParser()
    convert_cmd.register(parser)
    args = parser.parse_args(["llama", "-o", "x", "--kv-cache", "int8", "--kv-quantize-query"])
    assert convert_cmd._pass_selection(args)[1]["kv-cache"]["quantize_query"] == "True"
    assert convert_cmd._pass_selection(parser.parse_args(["llama", "-o", "x", "--kv-cache", "int8"]))[1][
        "kv-cache"]["quantize_query"] == "False"
    with pytest.raises(PassError, match="--kv-quantize-query needs --kv-cache"):
        convert_cmd._pass_selection(parser.parse_args(["llama", "-o", "x", "--kv-quantize-query"]))
    with pytest.raises(PassError, match="--kv-quantize-query cannot be combined with --portable"):
        convert_cmd._pass_selection(parser.parse_args(["llama", "-o", "x", "--kv-cache", "int8",
                                                       "--kv-quantize-query", "--portable"]))


@pytest.mark.parametrize("options,fragment", [
    # The residual-window rule comes first: following a group-only message led to a
    # second refusal (kivi2 --kv-capacity 100 said "multiple of group=32", then 160 was
    # "not a multiple of the residual window 128").
    ({"scheme": "kivi4", "group": "8", "residual": "16", "capacity": "20"}, "not a multiple of the residual window 16"),
    ({"scheme": "kivi2", "capacity": "100"}, "use --kv-capacity 128 or 256"),
    ({"scheme": "int8", "capacity": "-1"}, "capacity=-1"),
    ({"scheme": "int3"}, "unknown scheme"),
    ({"scheme": "kivi2", "group": "32", "residual": "48"}, "multiple of group"),
    ({"scheme": "kivi4", "group": "24"}, "group=24"),
    ({"scheme": "int8", "group": "32"}, "group=32 does not apply to scheme int8"),
    ({"scheme": "int8-asym", "group": "64"}, "int8 has one scale per token row"),
])
def test_bad_options_are_explained(options, fragment):
    from passes import get_pass

    with pytest.raises(PassError) as err:
        get_pass("kv-cache").make_options(options)
    assert fragment in str(err.value)


def test_residual_window_applies_to_every_scheme(exported):
    """--kv-residual R keeps R recent tokens unquantized for the per-token presets too;
    left out (-1), each preset has its own window: 128 for int4 and KIVI, none for int8."""
    _, path = exported("llama")
    for scheme, residual, expected in [("int4", -1, 128), ("int4", 0, 0), ("int4", 16, 16), ("int8", -1, 0), ("int8", 8, 8),
                                       ("kivi4", -1, 128), ("kivi4", 16, 16)]:
        model, _ = convert(path, scheme, group=8, residual=residual)
        attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                 for n in model.graph.node if n.op_type == "QuantKVAttention"]
        assert attrs and all(a["residual"] == expected for a in attrs), (scheme, residual, attrs[0])
    with pytest.raises(PassError, match="residual=-2"):
        convert(path, "int8", residual=-2)


def test_kv_residual_flag_reaches_the_pass():
    import argparse

    from toolkit.commands import convert as convert_cmd

    parser = argparse.ArgumentParser()
    convert_cmd.register(parser)
    base = ["llama", "-o", "x", "--kv-cache", "int4"]
    assert convert_cmd._pass_selection(parser.parse_args(base))[1]["kv-cache"]["residual"] == "-1"
    got = convert_cmd._pass_selection(parser.parse_args(base + ["--kv-residual", "64"]))[1]["kv-cache"]["residual"]
    assert got == "64"


def test_default_channel_groups_are_capped_at_the_head_dim(exported):
    _, path = exported("llama")  # head_dim 16 < the default group 32: one value group per head and token
    model, _ = convert(path, "int4", group=None)
    vi = {v.name: v for v in model.graph.input}["past_key_values.0.value_scale"]
    assert vi.type.tensor_type.shape.dim[3].dim_value == 1
    node = next(n for n in model.graph.node if n.op_type == "QuantKVAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["value_group"] == 16 and attrs["key_group"] == 16 and attrs["key_per_channel"] == 0


def test_an_int4_group_larger_than_the_head_dim_is_a_named_error(exported):
    """int4 --kv-group 32 on a head dim of 16 used to be capped to 16 without a word:
    the model came out with other groups than asked for. KIVI keeps its G as the key
    group in tokens and caps only its value groups (channels)."""
    _, path = exported("llama")  # head_dim 16

    def attrs(model):
        node = next(n for n in model.graph.node if n.op_type == "QuantKVAttention")
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    with pytest.raises(PassError) as err:
        convert(path, "int4", group=32)
    assert "group=32 is larger than the head dim 16 of 'past_key_values.0.key'" in str(err.value)
    assert "--kv-group 16 or smaller" in err.value.hint
    got = attrs(convert(path, "int4", group=16)[0])  # the head dim itself is fine
    assert (got["key_group"], got["value_group"]) == (16, 16)
    got = attrs(convert(path, "kivi4", group=32, residual=32)[0])
    assert (got["key_per_channel"], got["key_group"], got["value_group"]) == (1, 32, 16)


def test_kv_group_flag_is_checked_against_the_scheme():
    import argparse

    from toolkit.commands import convert as convert_cmd

    parser = argparse.ArgumentParser()
    convert_cmd.register(parser)
    base = ["llama", "-o", "x", "--kv-cache"]
    assert convert_cmd._pass_selection(parser.parse_args(base + ["kivi4"]))[1]["kv-cache"]["group"] == "0"
    assert convert_cmd._pass_selection(parser.parse_args(base + ["int4", "--kv-group", "64"]))[1][
        "kv-cache"]["group"] == "64"
    with pytest.raises(PassError, match="group=64 does not apply to scheme int8") as err:
        convert_cmd._pass_selection(parser.parse_args(base + ["int8", "--kv-group", "64"]))
    assert "drop --kv-group" in err.value.hint


@pytest.mark.parametrize("pass_name", ["kv-cache", "low-rank-kv"])
def test_a_cache_sliced_before_attention_is_named(exported, pass_name):
    """A past cut to a window before attention (how some exporters write sliding-window
    attention; `toolkit export` keeps the whole past) is refused by name, with the fix,
    by both cache passes; they used to name an internal Slice node and ask for a report."""
    import onnx_ir as ir

    _, path = exported("llama")
    model = ir.serde.deserialize_model(onnx.load(str(path)))
    past = next(v for v in model.graph.inputs if v.name == "past_key_values.0.key")
    concat = next(u.node for u in past.uses() if u.node.op_type == "Concat")
    consts = [ir.node("Constant", [], attributes={"value": ir.tensor(np.array([a], np.int64))}) for a in (-3, 2**62, 2)]
    cut = ir.node("Slice", [past, *(c.outputs[0] for c in consts)])
    model.graph.insert_before(concat, [*consts, cut])
    concat.replace_input_with(0, cut.outputs[0])
    options = {"scheme": "int8"} if pass_name == "kv-cache" else {"rank_ratio": "0.5"}
    with pytest.raises(PassError, match=f"{pass_name}: layer 0: input 'past_key_values.0.key' is sliced before "
                                        "attention .*a cache cut to a window") as err:
        run_pipeline(ir.serde.serialize_model(model), [pass_name], {pass_name: options})
    assert "re-export with `toolkit export`" in err.value.hint
