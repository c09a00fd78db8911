"""``kv-cache`` on the attention other exporters write for SDPA.

A Hugging Face model with ``attn_implementation="sdpa"`` (the transformers default)
calls ``torch.nn.functional.scaled_dot_product_attention``, which each exporter writes
in its own form:

- torch's dynamo exporter at opset < 23: its decomposition, the keys transposed as
  ``Reshape [-1, T, D] -> Transpose [0, 2, 1] -> Reshape`` with shapes read from the
  keys, ``sqrt(scale)`` on the query and the keys, and ``Where(IsNaN(p), 0, p)`` after a
  boolean mask's Softmax;
- torch's dynamo exporter at opset >= 23: one ONNX ``Attention`` node with a boolean mask;
- the TorchScript exporter (``dynamo=False``, what optimum uses), simplified with
  ``onnxscript.optimizer.optimize``: the eager form plus the NaN guard, and the output's
  shape read from the repeated values;
- the same, raw: also an identity ``Concat(past)`` before the cache's Concat, and
  Constant nodes for the scales (and, with eager attention, no-op Casts to float32
  after the Softmax).

Every form is rewritten (all layers) and, while nothing is quantized (the residual
window is longer than every sequence), the rewritten model must reproduce the original
ONNX model's logits (1e-4 absolute, as the eager export's test); with int8 keys and
values the logits must move but stay close. The export of each form is the reference:
it is checked against PyTorch before the rewrite is compared with it.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from test_kv_cache_pass import convert, decoder, prompts, run_steps

from passes.pipeline import run_pipeline
from toolkit.errors import PassError

FORMS = ["dynamo-opset21", "dynamo-opset23", "torchscript", "torchscript-raw", "torchscript-ort"]
_CACHE: dict[tuple[str, str], tuple] = {}


@pytest.fixture(scope="module")
def sdpa_export(tmp_path_factory):
    """``sdpa_export(spec, form) -> (SourceModel, path)``: the model exported with SDPA attention."""
    out_dir = tmp_path_factory.mktemp("sdpa_exports")

    def get(spec: str, form: str):
        if (spec, form) not in _CACHE:
            from toolkit import export, sources

            src = sources.resolve(spec)
            src.module.set_attn_implementation("eager" if form.endswith("-eager") else "sdpa")
            path = out_dir / f"{spec.replace(':', '_')}_{form}.onnx"
            if form.startswith("dynamo"):
                export.export(src, path, opset=int(form.removeprefix("dynamo-opset")))
            else:
                _torchscript_export(src, path, simplify=form == "torchscript")
                if form == "torchscript-ort":
                    _ort_transformers_optimize(src, path)
            _CACHE[spec, form] = (src, path)
        return _CACHE[spec, form]

    return get


def _torchscript_export(src, path, simplify: bool) -> None:
    import onnx_ir as ir
    import onnxscript
    import torch

    from toolkit import export

    n = src.num_layers
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for i in range(n):
        for kind in ("key", "value"):
            axes[f"past_key_values.{i}.{kind}"] = {0: "batch", 2: "past"}
            axes[f"present.{i}.{kind}"] = {0: "batch", 2: "total"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(export._flat_module(src), export.example_inputs(src), str(path), dynamo=False,
                          opset_version=17, input_names=export.input_names(n), output_names=export.output_names(n),
                          dynamic_axes=axes)
    if simplify:
        ir.save(onnxscript.optimizer.optimize(ir.load(str(path))), str(path))


def _ort_transformers_optimize(src, path) -> None:
    """ONNX Runtime's transformer optimizer (what optimum's ORTOptimizer runs): its fusions
    around the attention (SkipLayerNormalization, FastGelu, Gemm), which it leaves unfused."""
    from onnxruntime.transformers import optimizer

    cfg = src.module.config
    optimizer.optimize_model(str(path), model_type="gpt2", num_heads=cfg.num_attention_heads,
                             hidden_size=cfg.hidden_size, opt_level=0).save_model_to_file(str(path))


def _reference_logits(src, ids, mask, steps=8, seed=0):
    """PyTorch's last-position logits for the same calls as run_steps (greedy-free decode),
    through parity's own PyTorch step."""
    from toolkit.parity import _positions, _torch_step

    rng = np.random.default_rng(seed)
    logits, past = _torch_step(src, ids, mask, _positions(mask, ids.shape[1]), src.empty_past(ids.shape[0]))
    out = [logits[:, -1]]
    for _ in range(steps):
        nxt = rng.integers(3, 200, (ids.shape[0], 1)).astype(np.int64)
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], 1)
        logits, past = _torch_step(src, nxt, mask, _positions(mask, 1), past)
        out.append(logits[:, -1])
    return np.stack(out, 1)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", ["hf:llama", "hf:gpt2"])
def test_sdpa_forms_are_rewritten_exactly_while_nothing_is_quantized(sdpa_export, family, form):
    src, path = sdpa_export(family, form)
    ops_before = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ("Attention" in ops_before) == (form == "dynamo-opset23")  # the form this test means to cover
    assert ("SkipLayerNormalization" in ops_before or "SkipSimplifiedLayerNormalization" in ops_before) == (
        form == "torchscript-ort")
    ids, mask = prompts()
    ref, _ = run_steps(decoder(path), ids, mask, steps=8)
    np.testing.assert_allclose(ref, _reference_logits(src, ids, mask), atol=1e-4, rtol=0)

    model, report = convert(path, "kivi4", group=32, residual=64)
    assert report.counts["kv-cache"] == src.num_layers
    ops_after = [n.op_type for n in model.graph.node]
    assert ops_after.count("QuantKVAttention") == src.num_layers
    assert not {"Softmax", "Attention", "IsNaN"} & set(ops_after)
    got, past = run_steps(decoder(model), ids, mask, steps=8)
    assert past["past_key_values.0.key_q"].shape[2] == 0  # 19 tokens < R = 64: all full precision
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("form", FORMS)
def test_sdpa_forms_with_an_int8_cache_move_but_stay_close(sdpa_export, form):
    _, path = sdpa_export("hf:llama", form)
    model, _ = convert(path, "int8", residual=-1)
    ids, mask = prompts(length=20)
    ref, _ = run_steps(decoder(path), ids, mask, steps=12)
    got, past = run_steps(decoder(model), ids, mask, steps=12)
    assert past["past_key_values.0.key_q"].shape[2] > 0
    diff = float(np.abs(got - ref).max())
    assert diff > 1e-5, diff
    a, b = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= 0.999, cos.min()


def test_low_rank_kv_rewrites_the_decomposition_and_names_the_attention_node(sdpa_export):
    """low-rank-kv splits the score and value products: at full rank the decomposed form is
    reproduced (1e-4); an ONNX Attention node has no such products and is refused by name."""
    _, path = sdpa_export("hf:llama", "dynamo-opset21")
    options = {"low-rank-kv": {"rank_ratio": "1.0"}}
    model, report = run_pipeline(onnx.load(str(path)), ["low-rank-kv", "cleanup"], options)
    assert report.counts["low-rank-kv"] == 2
    ids, mask = prompts()
    ref, _ = run_steps(decoder(path), ids, mask, steps=4)
    got, _ = run_steps(decoder(model), ids, mask, steps=4)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)

    _, path = sdpa_export("hf:llama", "dynamo-opset23")
    with pytest.raises(PassError, match="layer 0: the attention is an ONNX Attention node") as err:
        run_pipeline(onnx.load(str(path)), ["low-rank-kv"], options)
    assert "--kv-cache" in err.value.hint


def _first(model, op_type):
    return next(n for n in model.graph.node if n.op_type == op_type)


@pytest.mark.parametrize("attribute,value,fragment", [
    ("is_causal", 1, "is_causal=1: a causal flag instead of a mask"),
    ("softcap", 30.0, "softcap=30.0: logit soft-capping"),
])
def test_attention_nodes_the_op_cannot_express_are_named(sdpa_export, attribute, value, fragment):
    _, path = sdpa_export("hf:llama", "dynamo-opset23")
    model = onnx.load(str(path))
    node = _first(model, "Attention")
    for attr in node.attribute:
        if attr.name == attribute:
            node.attribute.remove(attr)
            break
    node.attribute.append(onnx.helper.make_attribute(attribute, value))
    with pytest.raises(PassError, match=f"layer 0: node {node.name} \\(Attention\\) has {fragment}"):
        run_pipeline(model, ["kv-cache"], {"kv-cache": {"scheme": "int8"}})


def test_a_reshape_of_the_keys_that_is_not_a_transpose_is_named(sdpa_export):
    """The decomposition's shapes are checked, not assumed: a final Reshape to [B, H, T, D]
    (a view that does not swap the axes) is refused."""
    _, path = sdpa_export("hf:llama", "dynamo-opset21")
    model = onnx.load(str(path))
    by_output = {o: n for n in model.graph.node for o in n.output}
    transpose = next(n for n in model.graph.node if n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 2, 1])
    back = next(n for n in model.graph.node if n.op_type == "Reshape" and n.input[0] == transpose.output[0])
    concat = by_output[back.input[1]]
    assert concat.op_type == "Concat" and len(concat.input) == 3  # [B, H], D, T
    concat.input[1], concat.input[2] = concat.input[2], concat.input[1]
    with pytest.raises(PassError, match=r"layer 0: node \S+ \(Reshape\) reshapes the keys, but not as torch's SDPA"):
        run_pipeline(model, ["kv-cache"], {"kv-cache": {"scheme": "int8"}})


def test_the_shape_of_repeated_keys_used_elsewhere_is_named(sdpa_export):
    _, path = sdpa_export("hf:llama", "dynamo-opset21")
    model = onnx.load(str(path))
    transpose = next(n for n in model.graph.node if n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 2, 1])
    flatten = next(n for n in model.graph.node if n.output[0] == transpose.input[0])
    shape = next(n for n in model.graph.node if n.op_type == "Shape" and n.input[0] == flatten.input[0])
    model.graph.output.append(onnx.helper.make_tensor_value_info(shape.output[0], onnx.TensorProto.INT64, None))
    with pytest.raises(PassError, match=f"layer 0: the shape of the repeated keys \\(node {shape.name} \\(Shape\\)\\) "
                                        "is used outside the attention"):
        run_pipeline(model, ["kv-cache"], {"kv-cache": {"scheme": "int8"}})


def test_an_sdpa_export_passes_parity_against_the_eager_reference(sdpa_export):
    """`toolkit convert FILE.onnx --reference hf:llama` compares with the eager model. A
    query row whose keys are all masked (a left-padding position) gets the mean of the
    values in eager attention (a finite mask) and zeros in SDPA, and that reaches the next
    layer's cache at that position only, which no attention reads: parity compares the
    cache where the mask keeps it (it failed present.1 by 0.2 before), and still compares
    every layer's cache there."""
    from toolkit import parity, sources

    _, path = sdpa_export("hf:llama", "dynamo-opset23")
    src = sources.resolve("hf:llama")  # eager attention, the same weights
    report = parity.check(src, path)
    presents = [r for r in report.records if r.name.startswith("present.")]
    assert len(presents) == 4 * 2 * src.num_layers  # 2 phases x 2 batch sizes, key and value per layer
    assert report.passed, [(r.phase, r.name, r.max_abs) for r in report.records if not r.passed]
    assert max(r.max_abs for r in presents) < 1e-5


def _repeated_keys(model):
    """Per layer, (the keys' Transpose, the repeated keys it reads) in the TorchScript form."""
    producers = {o: n for n in model.graph.node for o in n.output}
    return [(n, n.input[0]) for n in model.graph.node
            if n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 1, 3, 2]
            and producers[n.input[0]].op_type == "Reshape"]


def _int64(model, name, values):
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(values, np.int64), name))


@pytest.mark.parametrize("passes,options", [
    (["kv-cache", "cleanup"], {"kv-cache": {"scheme": "kivi4", "group": "32", "residual": "64"}}),
    (["low-rank-kv", "cleanup"], {"low-rank-kv": {"rank_ratio": "1.0", "values": "false"}}),
])
def test_shapes_of_the_repeated_keys_read_elsewhere_are_rebuilt(sdpa_export, tmp_path, passes, options):
    """Live readers of Shape(repeated keys): the mask cut to the keys' length (what
    transformers 4.4x wrote: mask[..., :key.shape[-2]]) and the batch size as an output.
    The first crashed (the mask's Slice was taken for dead shape arithmetic), the second
    crashed low-rank-kv with keys only; both are now rebuilt, and the rewrite is exact."""
    _, path = sdpa_export("hf:llama", "torchscript")
    model = onnx.load(str(path))
    _int64(model, "t_axis", 2)
    _int64(model, "t_zero", [0])
    _int64(model, "t_last", [3])
    _int64(model, "t_batch", 0)
    for layer, (transpose, keys) in enumerate(_repeated_keys(model)):
        mul = next(n for n in model.graph.node if transpose.output[0] in n.input)
        matmul = next(n for n in model.graph.node if mul.output[0] in n.input)
        add = next(n for n in model.graph.node if n.op_type == "Add" and matmul.output[0] in n.input)
        p = f"t{layer}_"
        new = [onnx.helper.make_node("Shape", [keys], [p + "shape"]),
               onnx.helper.make_node("Gather", [p + "shape", "t_axis"], [p + "len"]),
               onnx.helper.make_node("Unsqueeze", [p + "len", "t_zero"], [p + "end"]),
               onnx.helper.make_node("Slice", [add.input[1], "t_zero", p + "end", "t_last"], [p + "mask"]),
               onnx.helper.make_node("Gather", [p + "shape", "t_batch"], [p + "batch"])]
        add.input[1] = p + "mask"
        at = list(model.graph.node).index(add)
        for j, node in enumerate(new):
            model.graph.node.insert(at + j, node)
        model.graph.output.append(onnx.helper.make_tensor_value_info(p + "batch", onnx.TensorProto.INT64, []))
    original = tmp_path / "mask_from_keys.onnx"
    onnx.save(model, str(original))
    rewritten, report = run_pipeline(onnx.load(str(original)), passes, options)
    assert report.counts[passes[0]] == 2
    ids, mask = prompts()
    ref, _ = run_steps(decoder(original), ids, mask, steps=6)
    got, _ = run_steps(decoder(rewritten), ids, mask, steps=6)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("opset", [22, 23])
@pytest.mark.parametrize("head", [{"k": "8"}, {"k": "8", "sample": "true", "top_p": "0.9"}])
def test_portable_bodies_at_opsets_22_and_23_run_without_the_op_library(sdpa_export, opset, head):
    """--portable on an opset-23 model: onnx.checker refused the bodies (opset 21 inside a
    model importing 23). The bodies now import the model's opset (22: the opset-21 export
    re-stamped; its ops changed only types), and ONNX Runtime without our library
    reproduces the op library: the int8 cache's logits within 1e-4, the sampling head's
    token ids exactly and its probabilities within 1e-5."""
    import onnxruntime as ort

    from toolkit.parity import OnnxDecoder

    _, path = sdpa_export("hf:llama", "dynamo-opset23" if opset == 23 else "dynamo-opset21")
    model = onnx.load(str(path))
    if opset == 22:
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 22
    model, report = run_pipeline(model, ["kv-cache", "sampling-head", "portable", "cleanup"],
                                 {"kv-cache": {"scheme": "int8"}, "sampling-head": head})
    assert report.counts["portable"] == 2  # QuantKVAttention and the head's op
    onnx.checker.check_model(model)
    blob = model.SerializeToString()
    bodies = OnnxDecoder(ort.InferenceSession(blob, providers=["CPUExecutionProvider"]))
    ids, mask = prompts(length=12)
    got, _ = run_steps(bodies, ids, mask, steps=6)
    ref, past = run_steps(decoder(model), ids, mask, steps=6)
    assert past["past_key_values.0.key_q"].shape[2] > 0
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    bodies = OnnxDecoder(ort.InferenceSession(blob, providers=["CPUExecutionProvider"]))  # call 0: same seed
    _, _, out_b = bodies.step(ids, mask, pos, bodies.empty_past(ids.shape[0]))
    kernels = decoder(model)
    _, _, out_k = kernels.step(ids, mask, pos, kernels.empty_past(ids.shape[0]))
    ids_name = "next_token_ids" if "next_token_ids" in out_k else "next_token"  # top-k or sampled
    np.testing.assert_array_equal(out_b[ids_name], out_k[ids_name])
    probs = next(n for n in out_k if n.startswith("next_token_prob"))
    np.testing.assert_allclose(out_b[probs], out_k[probs], atol=1e-5, rtol=0)


def test_portable_names_a_model_opset_its_bodies_were_not_checked_at(sdpa_export):
    _, path = sdpa_export("hf:llama", "dynamo-opset23")
    model = onnx.load(str(path))
    model.opset_import[0].version = 24
    with pytest.raises(PassError, match="bodies are written in ONNX opsets 21 to 23, and the model imports opset 24"):
        run_pipeline(model, ["kv-cache", "portable"], {"kv-cache": {"scheme": "int8"}})


def test_a_raw_torchscript_export_of_eager_attention_is_rewritten_exactly(sdpa_export):
    """TorchScript writes eager attention's softmax(dtype=float32).to(float32) as two Casts,
    and the cache through an identity Concat: both are looked through (they stopped the
    pass before)."""
    src, path = sdpa_export("hf:llama", "torchscript-raw-eager")
    ops_before = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "IsNaN" not in ops_before and ops_before.count("Cast") > 2 * src.num_layers
    model, report = convert(path, "kivi4", group=32, residual=64)
    assert report.counts["kv-cache"] == src.num_layers
    ids, mask = prompts()
    ref, _ = run_steps(decoder(path), ids, mask, steps=8)
    np.testing.assert_allclose(ref, _reference_logits(src, ids, mask), atol=1e-4, rtol=0)
    got, _ = run_steps(decoder(model), ids, mask, steps=8)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
