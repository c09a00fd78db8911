"""``kv-cache`` on onnxruntime-genai's ``com.microsoft::GroupQueryAttention`` models.

Two sources of graphs:

- onnxruntime-genai's model builder run on random-weight Hugging Face models (the
  form users download or build: packed QKV, rotary inside the op, ``seqlens_k`` from
  the attention mask, a symbolic head dim on the cache inputs). The reference is the
  PyTorch model itself, through parity's own step: the original GQA model must match it
  on an unpadded batch (that checks the reference), and the rewritten one on a
  left-padded batch too (GQA takes rows as right-padded; the rewrite follows the
  Hugging Face convention the harness feeds).
- one-layer graphs written here for the variants the builder does not write for these
  families (separate q / k / v, interleaved rotary, rotary on part of the head, no
  rotary). The reference is ONNX Runtime's own GroupQueryAttention, on unpadded batches,
  where both conventions agree.

While nothing is quantized (a residual window longer than every sequence) the logits
must agree within 1e-4 absolute (float32 attention summed in another order, as the
other forms' tests); an int8 cache must move them but stay close.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_kv_cache_pass import convert, prompts, run_steps
from test_kv_cache_sdpa import _reference_logits

from passes.pipeline import run_pipeline
from toolkit import ops
from toolkit.errors import InvalidModelError, PassError
from toolkit.parity import RIGHT_PADDED_NOTE, OnnxDecoder, decoder_facts, empty_cache_shape

ROOT = Path(__file__).resolve().parents[2]
_BUILT: dict[str, tuple] = {}


def _decoder(model: onnx.ModelProto | Path) -> OnnxDecoder:
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    session = ort.InferenceSession(proto.SerializeToString(), ops.session_options(1),
                                   providers=["CPUExecutionProvider"])
    return OnnxDecoder(session, decoder_facts(proto).cache_dims)


@pytest.fixture(scope="module")
def genai_model(tmp_path_factory):
    """``genai_model(family, precision="fp32", **config) -> (SourceModel, model.onnx)``,
    built by onnxruntime-genai's builder (``int4``: its MatMulNBits weights; ``config``:
    overrides of the Hugging Face config)."""
    root = tmp_path_factory.mktemp("genai_builder")

    def get(family: str, precision: str = "fp32", **overrides):
        key = (family, precision, *sorted(overrides.items()))
        if key not in _BUILT:
            from toolkit import sources

            src = sources.resolve(f"hf:{family}", overrides=overrides or None)
            tag = family + "".join(f"_{k}{v}" for k, v in sorted(overrides.items()))
            hf_dir, out = root / f"{tag}_hf", root / f"{tag}_{precision}"
            if not hf_dir.exists():
                src.module.save_pretrained(hf_dir)
            # the builder saves the tokenizer too (any tokenizer.json does: only the graph is tested)
                shutil.copy(ROOT / "models/checkpoints/llama-stdlib/tokenizer.json", hf_dir / "tokenizer.json")
            run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                                  "-o", str(out), "-p", precision, "-e", "cpu"], capture_output=True, text=True,
                                 check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
            assert run.returncode == 0, run.stderr[-3000:]
            _BUILT[key] = (src, out / "model.onnx")
        return _BUILT[key]

    return get


def _unpadded(batch=2, length=9, seed=3):
    ids = np.random.default_rng(seed).integers(3, 200, (batch, length)).astype(np.int64)
    return ids, np.ones_like(ids)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_genai_builder_models_are_rewritten_exactly_while_nothing_is_quantized(genai_model, family):
    src, path = genai_model(family)
    original = onnx.load(str(path))
    assert [n.op_type for n in original.graph.node].count("GroupQueryAttention") == src.num_layers
    ids, mask = _unpadded()
    ref, ref_past = run_steps(_decoder(original), ids, mask, steps=6)
    np.testing.assert_allclose(ref, _reference_logits(src, ids, mask, steps=6), atol=1e-4, rtol=0)

    model, report = convert(path, "kivi4", group=32, residual=64)
    assert report.counts["kv-cache"] == src.num_layers
    ops_after = [n.op_type for n in model.graph.node]
    assert ops_after.count("QuantKVAttention") == src.num_layers
    assert "GroupQueryAttention" not in ops_after
    got, past = run_steps(_decoder(model), ids, mask, steps=6)
    assert past["past_key_values.0.key_q"].shape[2] == 0  # 15 tokens < R = 64: all full precision
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # the cache holds the keys rotated at their own positions (attention alone cannot
    # tell: a rotary shifted by a constant gives the same scores)
    for i in range(src.num_layers):
        for kind in ("key", "value"):
            np.testing.assert_allclose(past[f"past_key_values.{i}.{kind}_res"], ref_past[f"past_key_values.{i}.{kind}"],
                                       atol=1e-5, rtol=0)

    # Left padding: positions and mask as the Hugging Face model takes them.
    ids, mask = prompts()  # left padding: 0, 3 and 6 tokens
    got, _ = run_steps(_decoder(model), ids, mask, steps=6)
    np.testing.assert_allclose(got, _reference_logits(src, ids, mask, steps=6), atol=1e-4, rtol=0)


def test_int4_weight_genai_models_are_rewritten_exactly_while_nothing_is_quantized(genai_model):
    """The builder's int4 weights (MatMulNBits: the query width is its N attribute): the
    rewrite reproduces the original model (not PyTorch: the weights are quantized)."""
    src, path = genai_model("llama", "int4")
    original = onnx.load(str(path))
    assert "MatMulNBits" in {n.op_type for n in original.graph.node}
    ids, mask = _unpadded()
    ref, _ = run_steps(_decoder(original), ids, mask, steps=4)
    del original.graph.value_info[:]  # (this builder annotates the widths; others do not)
    model, report = run_pipeline(original, ["kv-cache", "cleanup"],
                                 {"kv-cache": {"scheme": "kivi4", "group": "32", "residual": "64"}})
    assert report.counts["kv-cache"] == src.num_layers
    got, _ = run_steps(_decoder(model), ids, mask, steps=4)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_int8_cache_on_a_genai_model_moves_the_logits_but_stays_close(genai_model):
    src, path = genai_model("llama")
    ids, mask = prompts()  # left padding: 0, 3 and 6 tokens
    ref = _reference_logits(src, ids, mask, steps=8)
    model, _ = convert(path, "int8", residual=0)
    got, past = run_steps(_decoder(model), ids, mask, steps=8)
    assert past["past_key_values.0.key_q"].shape[2] == 19  # everything quantized
    assert np.abs(got - ref).max() > 1e-6
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= 0.999


def test_genai_model_head_dim_sizes_the_empty_cache(genai_model):
    """The builder leaves the cache's head dim symbolic; the GQA node gives it."""
    src, path = genai_model("llama")
    proto = onnx.load(str(path), load_external_data=False)
    head_dim = src.module.config.hidden_size // src.module.config.num_attention_heads
    facts = decoder_facts(proto)
    assert facts.cache_dims == {f"past_key_values.{i}.{k}": {3: head_dim}
                                for i in range(src.num_layers) for k in ("key", "value")}
    assert facts.right_padded
    assert facts.context_length == src.module.config.max_position_embeddings  # the cos/sin caches' rows
    from toolkit import model_info  # toolkit inspect: float32 K and V, kv heads x head dim per layer

    cfg = src.module.config
    assert model_info.describe(path, proto)["kv_cache"]["bytes_per_token"] == (
        src.num_layers * 2 * cfg.num_key_value_heads * head_dim * 4)
    shape = ["batch_size", 2, "past_sequence_length", "kv_cache_dim"]
    assert empty_cache_shape("past_key_values.0.key", shape, 3, {3: head_dim}) == [3, 2, 0, head_dim]
    with pytest.raises(InvalidModelError, match=r"'past_key_values.0.key'.*axes \[2, 3\] are symbolic"):
        empty_cache_shape("past_key_values.0.key", shape, 3)


def test_low_rank_kv_refuses_group_query_attention_by_name(genai_model):
    _, path = genai_model("llama")
    with pytest.raises(PassError, match="GroupQueryAttention"):
        run_pipeline(onnx.load(str(path)), ["low-rank-kv"], {"low-rank-kv": {"rank_ratio": "0.5"}})


# ------------------------------------------------------------- hand-written GQA graphs

H, HKV, D, E, V = 4, 2, 32, 32, 256


def _gqa_model(packed=True, rotary_dim=D, interleaved=False, attrs=None, extra_inputs=(), seqlens_from_mask=True,
               seed=0, seqlens_sub=1, switch_at=None) -> onnx.ModelProto:
    """input_ids -> embedding -> q/k/v projections -> GroupQueryAttention -> o_proj = logits [B, S, E].

    ``switch_at``: the cos/sin caches come from an ``If`` on the total length, as in
    onnxruntime-genai's LongRoPE Phi-3 (short factors up to ``switch_at`` tokens, long
    ones past it), their shapes symbolic."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape, (rng.standard_normal(shape) * 0.3).ravel())

    inits = [weight("embed", V, E), weight("o_proj", H * D, E)]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["x"])]
    if packed:
        inits.append(weight("qkv_proj", E, (H + 2 * HKV) * D))
        nodes.append(helper.make_node("MatMul", ["x", "qkv_proj"], ["qkv"]))
        qkv = ["qkv", "", ""]
    else:
        for n, width in (("q", H * D), ("k", HKV * D), ("v", HKV * D)):
            inits.append(weight(f"{n}_proj", E, width))
            nodes.append(helper.make_node("MatMul", ["x", f"{n}_proj"], [n]))
        qkv = ["q", "k", "v"]
    inits.append(helper.make_tensor("one", TensorProto.INT64, [1], [1]))
    inits.append(helper.make_tensor("sub", TensorProto.INT64, [1], [seqlens_sub]))
    if seqlens_from_mask:
        nodes += [helper.make_node("ReduceSum", ["attention_mask", "one"], ["len"], keepdims=0),
                  helper.make_node("Sub", ["len", "sub"], ["len_1"]),
                  helper.make_node("Cast", ["len_1"], ["seqlens_k"], to=TensorProto.INT32)]
    nodes += [helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
              helper.make_node("Gather", ["mask_shape", "one"], ["total_1"]),
              helper.make_node("Cast", ["total_1"], ["total"], to=TensorProto.INT32)]
    rot = []
    if rotary_dim:
        inv = 1.0 / 10000 ** (np.arange(0, rotary_dim, 2) / rotary_dim)
        angles = np.arange(128)[:, None] * inv[None]
        if switch_at is None:
            inits += [helper.make_tensor("cos_cache", TensorProto.FLOAT, angles.shape, np.cos(angles).ravel()),
                      helper.make_tensor("sin_cache", TensorProto.FLOAT, angles.shape, np.sin(angles).ravel())]
        else:
            def branch(name, a):
                outs = [helper.make_tensor_value_info(f"{name}_{f}", TensorProto.FLOAT, None) for f in ("cos", "sin")]
                consts = [helper.make_node("Constant", [], [f"{name}_{f}"], value=helper.make_tensor(
                    f"{name}_{f}_value", TensorProto.FLOAT, a.shape, fn(a).ravel())) for f, fn in (("cos", np.cos),
                                                                                                   ("sin", np.sin))]
                return helper.make_graph(consts, name, [], outs)

            inits.append(helper.make_tensor("switch", TensorProto.INT32, [], [switch_at]))
            nodes += [helper.make_node("Greater", ["total", "switch"], ["long"]),
                      helper.make_node("If", ["long"], ["cos_cache", "sin_cache"],
                                       then_branch=branch("long", angles * 0.5), else_branch=branch("short", angles))]
        rot = ["cos_cache", "sin_cache"]
    gqa_inputs = [*qkv, "past_key_values.0.key", "past_key_values.0.value", "seqlens_k", "total",
                  *(rot or ["", ""]), *extra_inputs]
    while gqa_inputs and gqa_inputs[-1] == "":
        gqa_inputs.pop()
    attributes = {"num_heads": H, "kv_num_heads": HKV, "do_rotary": int(bool(rotary_dim)),
                  "rotary_interleaved": int(interleaved), **(attrs or {})}
    nodes += [helper.make_node("GroupQueryAttention", gqa_inputs, ["attn", "present.0.key", "present.0.value"],
                               domain="com.microsoft", name="layer0/GroupQueryAttention", **attributes),
              helper.make_node("MatMul", ["attn", "o_proj"], ["logits"])]
    cache = ["batch", HKV, "past", "head"]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, cache)]
    if not seqlens_from_mask:
        inputs.append(helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]))
    for name in extra_inputs:
        if name:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", E]),
               helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, cache),
               helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, cache)]
    graph = helper.make_graph(nodes, "gqa", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _convert(model: onnx.ModelProto, scheme="kivi4", **options):
    opts = {"scheme": scheme, "residual": "64", **({"group": "8"} if scheme != "int8" else {}), **options}
    return run_pipeline(model, ["kv-cache", "cleanup"], {"kv-cache": opts})


@pytest.mark.parametrize(("packed", "rotary_dim", "interleaved"), [
    (True, D, False), (True, D, True), (False, D, False), (False, 16, False), (True, 16, True), (True, 0, False)],
    ids=["packed", "interleaved", "separate-qkv", "partial-rotary", "partial-interleaved", "no-rotary"])
def test_group_query_attention_variants_match_onnxruntime(packed, rotary_dim, interleaved):
    model = _gqa_model(packed, rotary_dim, interleaved)
    onnx.checker.check_model(model)
    ids, mask = _unpadded(batch=2, length=7)
    ref, ref_past = run_steps(_decoder(model), ids, mask, steps=5)
    rewritten, report = _convert(model)
    assert report.counts["kv-cache"] == 1
    onnx.checker.check_model(rewritten)
    got, past = run_steps(_decoder(rewritten), ids, mask, steps=5)
    assert past["past_key_values.0.key_res"].shape[2] == 12  # nothing quantized
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    for kind in ("key", "value"):  # rotated at the same positions
        np.testing.assert_allclose(past[f"past_key_values.0.{kind}_res"], ref_past[f"past_key_values.0.{kind}"],
                                   atol=1e-5, rtol=0)
    # the positions the cos/sin caches hold, for generate's and parity's up-front length check
    meta = {p.key: p.value for p in rewritten.metadata_props}
    assert meta.get("toolkit.context_length") == ("128" if rotary_dim else None)


def test_cos_sin_caches_chosen_by_an_if_match_onnxruntime_across_the_switch():
    """onnxruntime-genai's LongRoPE Phi-3 picks its cos/sin caches with an If on the total
    length (symbolic shapes): the pass reads R/2 from the branches' constants, and the
    rewrite follows the switch (9 tokens here: a 7-token prompt, then 5 decode steps)."""
    model = _gqa_model(switch_at=9)
    ids, mask = _unpadded(batch=2, length=7)
    ref, ref_past = run_steps(_decoder(model), ids, mask, steps=5)
    rewritten, report = _convert(model)
    assert report.counts["kv-cache"] == 1
    got, past = run_steps(_decoder(rewritten), ids, mask, steps=5)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(past["past_key_values.0.key_res"], ref_past["past_key_values.0.key"], atol=1e-5, rtol=0)
    # the long factors moved the keys rotated after the switch (the test can fail)
    unswitched, _ = run_steps(_decoder(_convert(_gqa_model())[0]), ids, mask, steps=5)
    assert np.abs(unswitched[:, -3:] - got[:, -3:]).max() > 1e-3


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"attrs": {"local_window_size": 4}}, "local_window_size=4"),
    ({"attrs": {"softcap": 30.0}}, "softcap=30.0"),
    ({"attrs": {"smooth_softmax": 1}}, "smooth_softmax=1"),
    ({"attrs": {"qk_norm_epsilon": 1e-6}}, "attribute(s) qk_norm_epsilon"),
    ({"extra_inputs": ("position_ids",)}, "input position_ids"),
    ({"extra_inputs": ("", "", "", "", "", "q_norm_weight")}, "input q_norm_weight"),
    ({"attrs": {"causal": 0}}, "causal=0"),
    ({"seqlens_sub": 2}, "is not ReduceSum"),
    ({"seqlens_from_mask": False}, "seqlens_k 'seqlens_k' is not ReduceSum"),
])
def test_unsupported_group_query_attention_is_refused_by_name(kwargs, fragment):
    model = _gqa_model(**kwargs)
    with pytest.raises(PassError, match="layer0/GroupQueryAttention") as err:
        _convert(model)
    assert fragment in str(err.value)
    assert "toolkit export" in err.value.hint


def test_generate_drives_genai_models_before_and_after_the_rewrite(genai_model):
    """Greedy tokens of the builder's model, and of its rewrite while nothing is
    quantized, are PyTorch's; without the head dim the empty cache is a named error."""
    import torch

    from toolkit.generate import generate_batch

    src, path = genai_model("llama")
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        expected = src.module.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                                       max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, 4:].tolist()
    original = onnx.load(str(path))
    rewritten, _ = convert(path, "kivi4", group=32, residual=64)
    in_place, _ = convert(path, "kivi4", group=32, residual=64, capacity=128)  # bound present-to-past
    for model in (original, rewritten, in_place):
        session = ort.InferenceSession(model.SerializeToString(), ops.session_options(1),
                                       providers=["CPUExecutionProvider"])
        result = generate_batch(session, [prompt], 10, facts=decoder_facts(model))
        assert result.token_ids[0] == expected
    with pytest.raises(InvalidModelError, match="'past_key_values.0.key'"):
        generate_batch(ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"]),
                       [prompt], 2)


def test_unconverted_genai_models_are_named_where_their_padding_convention_differs(genai_model):
    """GroupQueryAttention takes rows right-padded: generate refuses a batch it would pad
    (its rows came out wrong), and parity says why padded batches fail."""
    from toolkit import parity
    from toolkit.errors import ToolkitError
    from toolkit.generate import generate_batch

    src, path = genai_model("llama")
    original = onnx.load(str(path))
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ToolkitError, match="right-padded") as err:
        generate_batch(session, [[5, 6, 7, 8], [9, 10]], 3, facts=decoder_facts(original))
    assert "--kv-cache" in err.value.hint
    alone = generate_batch(session, [[9, 10]], 3, facts=decoder_facts(original)).token_ids[0]
    same_length = generate_batch(session, [[5, 6], [9, 10]], 3, facts=decoder_facts(original)).token_ids[1]
    assert same_length == alone  # no padding: the batch is fine
    report = parity.check(src, path, parity.ParitySettings(batch_sizes=(1, 3), decode_steps=1))
    assert RIGHT_PADDED_NOTE in report.notes
    assert not report.passed  # the padded batch, by the convention
    assert all(r.passed for r in report.records if "b=1" in r.phase)


def test_a_bundle_of_an_unconverted_genai_model_refuses_left_padding(genai_model, tmp_path):
    """toolkit.load's session refuses an attention_mask GroupQueryAttention would read
    wrong (padding before a kept position); right padding and no padding run."""
    import toolkit
    from toolkit.errors import ToolkitError

    _, path = genai_model("llama")
    out = tmp_path / "bundle"
    # (the builder's output directory as MODEL: its model.onnx, as convert takes a bundle directory)
    run = subprocess.run([sys.executable, "-m", "toolkit", "convert", str(path.parent), "--reference", "hf:llama",
                          "--sampling-head", "4", "--no-parity", "-o", str(out)], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stderr
    session = toolkit.load(out)
    past = {i.name: np.zeros((2, 2, 0, 16), np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values.")}
    ids = np.array([[0, 0, 5, 6], [7, 8, 9, 10]], np.int64)
    left = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int64)
    with pytest.raises(ToolkitError, match="attention_mask row 0 has padding before a kept position") as err:
        session.run(None, {"input_ids": ids, "attention_mask": left, **past})
    assert "--kv-cache" in err.value.hint
    right = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.int64)
    assert session.run(None, {"input_ids": ids, "attention_mask": right, **past})[0].shape[0] == 2


def test_parity_says_when_a_model_computes_with_quantized_weights(genai_model):
    """The builder's int4 model fails float32 parity by its weights alone: the report says so."""
    from toolkit import parity

    src, path = genai_model("llama", "int4")
    report = parity.check(src, path, parity.ParitySettings(batch_sizes=(1,), decode_steps=1))
    assert any("quantized weights (MatMulNBits)" in n for n in report.notes), report.notes
    _, fp32 = genai_model("llama")
    report = parity.check(src, fp32, parity.ParitySettings(batch_sizes=(1,), decode_steps=1))
    assert report.passed and not any("quantized weights" in n for n in report.notes)


def test_parity_says_when_a_genai_build_drops_the_checkpoints_sliding_window(genai_model):
    """onnxruntime-genai's builder windows only the layers a config's layer_types marks
    sliding_attention: a Mistral with sliding_window=8 (no layer_types) is built with
    local_window_size=-1, full attention, and fails parity past 8 tokens. The report says
    why (and the kv-cache rewrite reproduces the model as built, full attention)."""
    from toolkit import parity

    src, path = genai_model("mistral", sliding_window=8)
    assert decoder_facts(onnx.load(str(path))).attention_windows == (-1,) * src.num_layers
    settings = parity.ParitySettings(batch_sizes=(1,), decode_steps=1)  # a 12-token prompt
    report = parity.check(src, path, settings)
    assert not report.passed
    assert any("sliding window of 8 tokens" in n and "local_window_size=-1" in n for n in report.notes), report.notes
    plain_src, plain = genai_model("mistral")  # no window in the checkpoint: no note, and it passes
    report = parity.check(plain_src, plain, settings)
    assert report.passed and not any("sliding window" in n for n in report.notes)
