"""Export of every supported model family: ONNX Runtime vs PyTorch within 1e-4 (fp32).

Checks a left-padded prefill (batch 2, rows of different length, P = 0 empty
past) and then two decode steps feeding the ONNX model its own cache.
"""

from __future__ import annotations

import errno
import os
import re

import numpy as np
import onnx
import pytest
import torch

from toolkit.export import input_names, output_names

FAMILIES = ["llama", "gpt2", "hf:gpt2", "hf:llama", "hf:qwen2", "hf:mistral", "hf:phi3", "hf:mixtral"]
# fp32 end to end; ORT and PyTorch reduce in different orders (MatMul blocking,
# Softmax), which moves tiny random-weight logits by ~1e-6. 1e-4 is the bound.
ATOL = 1e-4


def _positions(mask: np.ndarray, seq: int) -> np.ndarray:
    return np.clip(np.cumsum(mask, -1) - 1, 0, None)[:, -seq:].astype(np.int64)


@pytest.mark.parametrize("spec", FAMILIES)
def test_export_matches_pytorch(spec, exported):
    import onnxruntime as ort

    src, path = exported(spec)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == input_names(src.num_layers)
    assert [o.name for o in model.graph.output] == output_names(src.num_layers)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["toolkit.opset"] == "21" and meta["toolkit.num_layers"] == str(src.num_layers)

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, src.vocab_size, (2, 7)).astype(np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0  # left padding on row 1
    past_t = src.empty_past(2)
    past_o = {f"past_key_values.{i}.{n}": np.zeros((2, src.num_kv_heads, 0, src.head_dim), np.float32)
              for i in range(src.num_layers) for n in ("key", "value")}
    for step in range(3):
        pos = _positions(mask, ids.shape[1])
        with torch.no_grad():
            ref_logits, ref_past = src.forward(torch.from_numpy(ids), torch.from_numpy(mask),
                                               torch.from_numpy(pos), past_t)
        outs = dict(zip(output_names(src.num_layers),
                        sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past_o})))
        keep = mask[:, -ids.shape[1]:].astype(bool)
        np.testing.assert_allclose(outs["logits"][keep], ref_logits.numpy()[keep], atol=ATOL, rtol=0,
                                   err_msg=f"{spec} logits, step {step}")
        for i, (k, v) in enumerate(ref_past):
            np.testing.assert_allclose(outs[f"present.{i}.key"], k.numpy(), atol=ATOL, rtol=0)
            np.testing.assert_allclose(outs[f"present.{i}.value"], v.numpy(), atol=ATOL, rtol=0)
        # Next step: the reference's greedy token, each side keeps its own cache.
        ids = ref_logits[:, -1].argmax(-1).numpy().astype(np.int64)[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        past_t = ref_past
        past_o = {f"past_key_values.{i}.{n}": outs[f"present.{i}.{n}"]
                  for i in range(src.num_layers) for n in ("key", "value")}


def test_export_error_names_the_model(tmp_path):
    from toolkit import export, sources
    from toolkit.errors import ExportError

    src = sources.resolve("llama")

    def broken(*args, **kwargs):  # data-dependent control flow the exporter cannot trace
        if args[0].sum() > 0:
            raise AssertionError
        return src.module(*args)

    src.forward = lambda ids, mask, pos, past: broken(ids, mask, pos, past or None)
    with pytest.raises(ExportError, match="llama"):
        export.export(src, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_large_models_use_external_data(monkeypatch, tmp_path):
    """Weights over the protobuf limit go to model.onnx.data; ORT loads them back."""
    import onnxruntime as ort

    from toolkit import export, sources

    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 0)  # treat the tiny model as "large"
    src = sources.resolve("gpt2")
    out = tmp_path / "m.onnx"
    returned = export.export(src, out)
    # the returned model still holds its weights (saving moved them out of it; convert
    # runs its passes on it, saves it again and deletes this file)
    assert all(t.data_location == onnx.TensorProto.DEFAULT and not t.external_data
               for t in returned.graph.initializer)
    assert sum(len(t.raw_data) for t in returned.graph.initializer) > 100_000
    data = tmp_path / "m.onnx.data"
    assert data.is_file() and data.stat().st_size > out.stat().st_size
    model = onnx.load(str(out), load_external_data=False)
    # tensors under 1 KiB stay inline (save_model's size_threshold); all larger ones are external
    big = [t for t in model.graph.initializer if np.prod(t.dims) * 4 >= 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()][0] == "logits"


def test_a_large_model_converts_into_a_bundle_with_its_weights(monkeypatch, tmp_path):
    """convert on a model over the external-data threshold: the bundle holds model.onnx.data
    (and not the exporter's deleted exported.onnx.data), passes and parity ran on the
    weights, and the published bundle loads and decodes like the source model."""
    import torch

    from toolkit import bundle, export, sources
    from toolkit.cli import main
    from toolkit.generate import generate

    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "b"
    old_mask = os.umask(0o022)
    try:
        assert main(["convert", "llama", "-o", str(out), "--sampling-head", "4"]) == 0
    finally:
        os.umask(old_mask)
    assert (out / "model.onnx.data").is_file() and not list(out.glob("exported.onnx*"))
    # readable by a server of another account, like model.onnx (onnx writes the data 0600)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir() if f.name.startswith("model")} == {
        "model.onnx": 0o644, "model.onnx.data": 0o644}
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    refs = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert refs == {"model.onnx.data"}
    session = bundle.load(out, threads=1)
    tokens = generate(session, [5, 17, 42], 4).token_ids
    src = sources.resolve("llama")  # the same seeded weights, greedy in PyTorch
    ids = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        for _ in range(4):
            logits, _ = src.forward(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], src.empty_past(1))
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tokens == ids[0, 3:].tolist()


def test_overwriting_a_large_export_with_a_small_one_removes_its_weights_file(monkeypatch, tmp_path):
    """export --overwrite of a model with external data by one without left the old
    m.onnx.data beside the new m.onnx (publish moves the new files over the old)."""
    from toolkit import export
    from toolkit.cli import main

    out = tmp_path / "m.onnx"
    with monkeypatch.context() as m:
        m.setattr(export, "EXTERNAL_DATA_THRESHOLD", 0)
        assert main(["export", "llama", "-o", str(out)]) == 0
    assert (tmp_path / "m.onnx.data").is_file()
    assert main(["export", "llama", "-o", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    import onnxruntime as ort

    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_dynamic_axes_have_runtime_names(exported):
    _, path = exported("hf:qwen2")
    model = onnx.load(str(path), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.0.key"][0] == "batch_size"
    assert dims["past_key_values.0.key"][2] == "past_sequence_length"
    assert dims["logits"][:2] == ["batch_size", "sequence_length"]


def test_source_config_dispatch_matches_resolve(tmp_path):
    """resolve_config (the config-only dispatch genai and resolve share) names each kind of
    MODEL argument, and the model resolve() then builds has that config."""
    import models
    from toolkit import sources
    from toolkit.errors import ModelNotFoundError

    preset = sources.resolve_config("llama", "tiny", {"num_layers": 3})
    assert preset.kind == "toolkit-preset" and preset.fields["num_layers"] == 3
    assert sources.resolve("llama", overrides={"num_layers": 3}).num_layers == 3
    ref = sources.resolve_config("llama-stdlib")
    assert ref.kind == "toolkit-reference" and ref.directory == models.CHECKPOINT_ROOT / "llama-stdlib"
    hf = sources.resolve_config("hf:qwen2", overrides={"num_hidden_layers": 3})
    assert hf.kind == "hf-random" and hf.hf_config.num_hidden_layers == 3
    models.save_checkpoint(models.build("gpt2"), tmp_path / "ckpt")
    ckpt = sources.resolve_config(str(tmp_path / "ckpt"))
    assert ckpt.kind == "toolkit-checkpoint" and ckpt.family == "gpt2"
    assert sources.resolve(str(tmp_path / "ckpt")).family == "gpt2"
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:  # a relative directory is recorded absolute (the manifest's and metadata's source)
        assert sources.resolve("ckpt").spec == str((tmp_path / "ckpt").resolve())
    finally:
        os.chdir(here)
    with pytest.raises(ModelNotFoundError, match="takes no config overrides"):
        sources.resolve_config("llama-stdlib", overrides={"num_layers": 1})
    with pytest.raises(ModelNotFoundError, match="unknown preset 'huge'"):
        sources.resolve_config("gpt2", "huge")
    with pytest.raises(ModelNotFoundError, match="unknown Hugging Face architecture"):
        sources.resolve_config("hf:nope")
    # A misspelt Hugging Face field is refused (transformers would keep it as a stray
    # attribute and build the default model), with the nearest field; aliases work.
    with pytest.raises(ModelNotFoundError, match="has no config field 'num_hiden_layers'") as err:
        sources.resolve_config("hf:qwen2", overrides={"num_hiden_layers": 3})
    assert "num_hidden_layers" in err.value.hint
    assert sources.resolve_config("hf:gpt2", overrides={"num_hidden_layers": 1}).hf_config.n_layer == 1
    # Legacy RoPE names that transformers folds into rope_parameters are fields too (they
    # were refused, audit), and a misspelt one points at rope_parameters.
    assert sources.resolve_config("hf:llama", overrides={"rope_theta": 1e6}).hf_config.rope_parameters[
        "rope_theta"] == 1e6
    scaled = sources.resolve_config("hf:llama", overrides={"rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert scaled.hf_config.rope_parameters["factor"] == 2.0
    assert sources.resolve_config("hf:phi3", overrides={"partial_rotary_factor": 0.5}).hf_config.rope_parameters[
        "partial_rotary_factor"] == 0.5
    assert sources.resolve_config("hf:llama", overrides={"rope_theta": 10000.0})  # the default value too
    for key in ("rope_thetaa", "rope_type"):
        with pytest.raises(ModelNotFoundError, match=f"has no config field '{key}'") as err:
            sources.resolve_config("hf:llama", overrides={key: 3})
        assert "rope_parameters" in err.value.hint
    # Shapes transformers accepts but no decoder exports with (a torch.export broadcast error before).
    for overrides, message in (({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of "
                                                            r"num_key_value_heads \(3\)"),
                               ({"num_key_value_heads": 0}, "num_key_value_heads must be >= 1, got 0"),
                               ({"num_hidden_layers": 0}, "num_hidden_layers must be >= 1, got 0")):
        with pytest.raises(ModelNotFoundError, match=message):
            sources.resolve_config("hf:llama", overrides=overrides)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="neither 'model_type'"):
        sources.resolve_config(str(tmp_path / "bad"))


@pytest.mark.parametrize("opset", [13, 17, 99])
def test_unsupported_opset_is_refused_before_export(opset, tmp_path):
    """Opsets outside 18..onnx's newest used to come out as opset 18 with exit 0 (the
    exporter's fallback after a failed version conversion)."""
    from toolkit import sources
    from toolkit.errors import ExportError
    from toolkit.export import export

    with pytest.raises(ExportError, match=f"opset {opset} is not supported: the exporter writes opsets 18 to"):
        export(sources.resolve("llama"), tmp_path / "m.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


def test_export_prints_no_exporter_noise(tmp_path):
    """torch.onnx logged a warning per torchvision op it skipped (torchvision is not a
    dependency) and pytree's LeafSpec FutureWarning on every export. A fresh process:
    the registration warnings come once per process."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from toolkit import export, sources; "
            "export.export(sources.resolve('gpt2'), Path(sys.argv[1]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx")], capture_output=True, text=True, check=False,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.onnx").is_file()
    assert "torchvision is not installed" not in r.stderr and "LeafSpec" not in r.stderr, r.stderr


def test_hf_directories_that_are_not_complete_causal_lms_are_refused(tmp_path, caplog):
    """A base model without its head, an encoder-decoder, an encoder, or a checkpoint
    missing weights used to convert with random weights in their place (and pass parity
    against the same random draw) or fail with a list of a hundred config classes."""
    import safetensors.torch
    import transformers

    from toolkit import sources
    from toolkit.errors import ModelNotFoundError

    small = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32}
    llama = transformers.LlamaConfig(**small, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama).save_pretrained(tmp_path / "ok")
    assert sources.resolve(str(tmp_path / "ok")).num_layers == 1  # the complete model loads
    transformers.LlamaModel(llama).save_pretrained(tmp_path / "base")
    bart = transformers.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                   decoder_ffn_dim=32, max_position_embeddings=32)
    transformers.BartForConditionalGeneration(bart).save_pretrained(tmp_path / "bart")
    bert = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(bert).save_pretrained(tmp_path / "bert")
    transformers.BertLMHeadModel(bert).save_pretrained(tmp_path / "bert-lm")  # an LM head, still an encoder
    (tmp_path / "partial").mkdir()
    for f in (tmp_path / "ok").iterdir():
        (tmp_path / "partial" / f.name).write_bytes(f.read_bytes())
    weights = safetensors.torch.load_file(str(tmp_path / "partial" / "model.safetensors"))
    del weights["lm_head.weight"]
    safetensors.torch.save_file(weights, str(tmp_path / "partial" / "model.safetensors"), metadata={"format": "pt"})
    transformers.LlamaForCausalLM(llama).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with caplog.at_level("WARNING", logger="toolkit.sources"):  # the upcast is said, not silent
        assert sources.resolve(str(tmp_path / "bf16")).num_layers == 1
    assert "stores bfloat16 weights: they are upcast to float32" in caplog.text
    for name, message in (("base", "holds LlamaModel (llama), not a causal LM with its head"),
                          ("bart", "is an encoder-decoder model (bart)"),
                          ("bert", "is a bidirectional encoder (bert)"),
                          ("bert-lm", "is a bidirectional encoder (bert)"),
                          ("partial", "lacks 1 weight(s) its LlamaForCausalLM needs: lm_head.weight")):
        with pytest.raises(ModelNotFoundError, match=re.escape(message)):
            sources.resolve(str(tmp_path / name))


def test_exports_carry_no_paths_of_the_exporting_machine(exported):
    """torch.onnx writes each node's Python stack trace, with absolute paths of the
    checkout and virtualenv, so one conversion on two machines gave two model hashes
    (an audit: 175 of 177 nodes, 30% of the file). The stack traces are dropped."""
    import sys
    from pathlib import Path

    _, path = exported("hf:qwen2")
    data = Path(path).read_bytes()
    model = onnx.load(str(path), load_external_data=False)
    keys = {p.key for n in model.graph.node for p in n.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys
    assert "pkg.torch.onnx.name_scopes" in keys  # (the path-free debugging metadata stays)
    for where in {str(Path(__file__).resolve().parents[1]), sys.prefix, "site-packages"}:
        assert where.encode() not in data, where


@pytest.mark.parametrize("opset, ir_version", [(20, 9), (21, 10)])
def test_export_stamps_the_oldest_ir_version_its_opset_allows(opset, ir_version, tmp_path):
    """The exporter stamped IR 10 whatever the opset, and ONNX Runtime 1.17 (which reads
    IR 9 / opset 20) refused an --opset 20 model by its stamp alone. The reference is
    onnx's own release table; the model must still load and check."""
    import onnxruntime as ort

    from toolkit import sources
    from toolkit.export import export

    model = export(sources.resolve("llama"), tmp_path / "m.onnx", opset=opset)
    assert model.ir_version == ir_version
    assert onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)]) == ir_version
    saved = onnx.load(str(tmp_path / "m.onnx"))
    assert saved.ir_version == ir_version
    # graph / node metadata_props are IR 10 fields: kept from IR 10 on, absent before
    has_node_metadata = any(n.metadata_props for n in saved.graph.node)
    assert has_node_metadata == (ir_version >= 10)
    assert {p.key for p in saved.metadata_props} >= {"toolkit.source", "toolkit.opset"}
    onnx.checker.check_model(saved, full_check=True)
    ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])


def _digests(directory) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_overwrite_keeps_the_old_model_when_the_save_fails(monkeypatch, tmp_path):
    """export --overwrite whose save fails halfway (a full disk) leaves the previous
    model and its weights byte for byte, and no temporary file beside them."""
    from toolkit import export
    from toolkit.cli import main

    out = tmp_path / "m.onnx"
    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 0)
    assert main(["export", "llama", "-o", str(out)]) == 0
    before = _digests(tmp_path)
    assert set(before) == {"m.onnx", "m.onnx.data"}

    def half_written(model, path, keep_weights=True):
        path.write_bytes(b"\x08\x0a partial")
        (path.parent / (path.name + ".data")).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_model", half_written)
    assert main(["export", "llama", "-o", str(out), "--overwrite", "--seed", "1"]) != 0
    assert _digests(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_overwrite_never_pairs_a_model_with_the_other_exports_weights(monkeypatch, tmp_path):
    """export --overwrite of a model with external data by another: at every rename the
    directory holds the old pair, the new pair or no model (publish moved the new
    weights beside the old model first), and a failed rename puts the old pair back
    (the old model was left for good beside the new weights)."""
    from toolkit import export
    from toolkit.cli import main

    out = tmp_path / "m.onnx"
    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 0)
    assert main(["export", "llama", "-o", str(out)]) == 0
    old = _digests(tmp_path)
    real_replace = os.replace
    seen: list[dict[str, str]] = []

    def watched(src, dst):
        real_replace(src, dst)
        seen.append({k: v for k, v in _digests(tmp_path).items() if k.startswith("m.onnx")})

    monkeypatch.setattr(os, "replace", watched)
    assert main(["export", "llama", "-o", str(out), "--overwrite", "--seed", "1"]) == 0
    new = _digests(tmp_path)
    assert new["m.onnx"] != old["m.onnx"] and new["m.onnx.data"] != old["m.onnx.data"]
    assert seen
    for state in seen:
        if "m.onnx" in state:
            assert state in (old, new), "a model beside the other export's weights"

    def failing(src, dst):  # the model's own rename fails, after its weights were moved
        if str(dst) == str(out) and ".toolkit-export-" in str(src) and not str(src).endswith(".old-m.onnx"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    assert main(["export", "llama", "-o", str(out), "--overwrite", "--seed", "2"]) != 0
    assert _digests(tmp_path) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_overwrite_of_a_large_export_from_its_own_directory(monkeypatch, tmp_path):
    """export -o m.onnx --overwrite run in m.onnx's directory, for a model with external
    data: onnx.save_model refused the location m.onnx.data because it existed relative
    to the current directory (FileExistsError), though the new file goes to staging."""
    import onnxruntime as ort

    from toolkit import export
    from toolkit.cli import main

    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.chdir(tmp_path)
    assert main(["export", "llama", "-o", "m.onnx"]) == 0
    first = _digests(tmp_path)
    assert main(["export", "llama", "-o", "m.onnx", "--overwrite", "--seed", "1"]) == 0
    second = _digests(tmp_path)
    assert set(second) == {"m.onnx", "m.onnx.data"} and second["m.onnx.data"] != first["m.onnx.data"]
    ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
