"""onnxruntime-genai drives converted bundles through the genai_config.json we write.

The check is token-exact: greedy ids from ``og.Generator`` must equal those of the
toolkit's own loop (:func:`toolkit.generate.greedy`) on the same bundle, for a plain
model, for models whose graph holds our custom ops (loaded through
``custom_ops_library``), for every model family we map to a genai type, and the
quantized-KV model must get no config but a recorded reason.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the test extra: pip install -e .[test]")

from toolkit import bundle, genai, generate
from toolkit.model_info import describe
from toolkit.parity import make_session

NEW_TOKENS = 16
PROMPT = "def main(args):\n    "


@pytest.fixture(scope="module")
def convert(tmp_path_factory):
    """``convert(name, *flags) -> bundle dir`` of llama-stdlib, converted once per module."""
    from toolkit.cli import main

    root = tmp_path_factory.mktemp("genai")
    done: dict[str, object] = {}

    def get(name: str, *flags: str):
        if name not in done:
            out = root / name
            assert main(["convert", "llama-stdlib", "-o", str(out), "--no-parity", *flags]) == 0
            done[name] = out
        return done[name]

    return get


def genai_greedy(directory, prompt_ids: list[int], n: int, host_inputs=()) -> list[int]:
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + n)
    generator = og.Generator(model, params)
    for name in host_inputs:
        generator.set_model_input(name, np.array([0], dtype=np.int64))
    generator.append_tokens(prompt_ids)
    out: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def prompt_ids(directory) -> list[int]:
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")).encode(PROMPT).ids


def test_plain_bundle_generates_the_toolkit_greedy_tokens(convert):
    out = convert("plain", "--passes", "none")
    manifest = bundle.read_manifest(out)
    assert manifest["genai"] == {"config": "genai_config.json", "model_type": "llama",
                                 "tokenizer_config": "tokenizer_config.json", "host_inputs": {}}
    config = json.loads((out / "genai_config.json").read_text())
    assert "custom_ops_library" not in config["model"]["decoder"]["session_options"]
    ids = prompt_ids(out)
    expected = generate.greedy(bundle.load(out, threads=1), ids, NEW_TOKENS).token_ids
    assert genai_greedy(out, ids, NEW_TOKENS) == expected


def test_tokenizer_matches_the_tokenizers_library(convert):
    """og.Tokenizer (onnxruntime-extensions) reads tokenizer.json + our tokenizer_config.json."""
    import tokenizers

    out = convert("plain", "--passes", "none")
    ours = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = og.Tokenizer(og.Model(str(out)))
    from models import reference_heldout_text

    held = reference_heldout_text("llama-stdlib")[:12000]
    samples = [held[i:i + 400] for i in range(0, len(held), 400)] + [PROMPT, "é ü 中文\t\n  x", "a<eos><pad>b"]
    for s in samples:
        ids = ours.encode(s).ids
        assert list(theirs.encode(s)) == ids, s
        assert theirs.decode(ids) == ours.decode(ids, skip_special_tokens=True), s
    # Known onnxruntime-extensions quirk (0.18.0): a sequence of special tokens only decodes
    # to U+FFFD instead of "" (with any normal token in it, specials are skipped as above).
    assert theirs.decode(ours.encode("<eos>").ids) in ("", "\ufffd")


def test_custom_op_bundle_loads_the_bundled_library(convert, tmp_path, monkeypatch):
    """--sampling-head 50 adds FusedSoftmaxTopK; genai registers libtoolkit_ops.so from the config."""
    out = convert("head", "--sampling-head", "50")
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == bundle.LIBRARY_NAME
    ids = prompt_ids(out)
    expected = generate.greedy(bundle.load(out, threads=1), ids, NEW_TOKENS).token_ids
    monkeypatch.chdir(tmp_path)  # the library path is relative to the bundle, not the working directory
    assert genai_greedy(out, ids, NEW_TOKENS) == expected
    # the plain and the fused model agree too (the head does not change logits)
    assert expected == generate.greedy(bundle.load(convert("plain", "--passes", "none"), threads=1),
                                       ids, NEW_TOKENS).token_ids


def test_without_the_library_entry_the_custom_op_model_does_not_load(convert, tmp_path):
    """Shows the entry is what makes it work (and that our test would notice its absence)."""
    out = tmp_path / "head"
    shutil.copytree(convert("head", "--sampling-head", "50"), out)
    config = json.loads((out / "genai_config.json").read_text())
    del config["model"]["decoder"]["session_options"]["custom_ops_library"]
    (out / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="FusedSoftmaxTopK"):
        og.Model(str(out))


def test_sampling_head_model_needs_its_seed_as_a_host_input(convert):
    """--sample adds a sampling_seed input: genai ignores the draw, greedy from logits still agrees."""
    out = convert("sample", "--sampling-head", "50", "--sample")
    record = bundle.read_manifest(out)["genai"]
    assert list(record["host_inputs"]) == ["sampling_seed"]
    ids = prompt_ids(out)
    plain = convert("plain", "--passes", "none")
    expected = generate.greedy(bundle.load(plain, threads=1), ids, NEW_TOKENS).token_ids
    assert genai_greedy(out, ids, NEW_TOKENS, host_inputs=record["host_inputs"]) == expected
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 2)
    with pytest.raises(Exception, match="SampleTopKTopP"):  # without the seed ORT refuses to run
        generator = og.Generator(model, params)
        generator.append_tokens(ids)


def test_quantized_kv_cache_gets_no_config_and_a_reason(convert):
    out = convert("kv8", "--kv-cache", "int8")
    record = bundle.read_manifest(out)["genai"]
    assert record["config"] is None
    assert "key_res" in record["reason"] and "quantized KV cache" in record["reason"]
    assert not (out / "genai_config.json").exists()


def test_latent_kv_cache_gets_no_config_and_its_own_reason(convert):
    out = convert("latent", "--kv-rank-ratio", "0.5")
    record = bundle.read_manifest(out)["genai"]
    assert record["config"] is None
    assert "latent" in record["reason"] and "key_res" not in record["reason"]
    assert not (out / "genai_config.json").exists()


@pytest.mark.parametrize("spec, model_type", [
    ("llama", "llama"), ("gpt2", "decoder"), ("hf:gpt2", "decoder"), ("hf:llama", "llama"),
    ("hf:qwen2", "qwen2"), ("hf:mistral", "mistral"), ("hf:phi3", "phi3"), ("hf:mixtral", "decoder"),
])
def test_every_family_config_is_structurally_right_and_generates(exported, tmp_path, spec, model_type):
    src, path = exported(spec)
    model = onnx.load(str(path))
    if spec == "hf:mixtral":  # the default pipeline fuses its routers: a custom-op model
        from passes import run_pipeline

        model, _ = run_pipeline(model)
    onnx.save(model, str(tmp_path / "model.onnx"))
    info = describe(tmp_path / "model.onnx", model)
    lib = None
    if info["custom_ops"]:
        from toolkit import ops

        shutil.copy2(ops.library_path(), tmp_path / bundle.LIBRARY_NAME)
        lib = bundle.LIBRARY_NAME
    record = genai.write(tmp_path, info, lib)
    assert record["config"] == "genai_config.json" and record["model_type"] == model_type
    # No tokenizer.json here (random-weight configs have none): said, as og.Tokenizer would fail.
    assert any("no tokenizer.json in the bundle" in n for n in record["notes"])
    config = json.loads((tmp_path / "genai_config.json").read_text())
    m, dec = config["model"], config["model"]["decoder"]
    assert m["type"] == model_type and m["vocab_size"] == src.vocab_size
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (
        src.num_layers, src.num_kv_heads, src.head_dim)
    assert dec["num_attention_heads"] * src.head_dim == dec["hidden_size"]
    assert dec["inputs"]["past_key_names"] % 0 in {vi["name"] for vi in info["inputs"]}
    assert dec["outputs"]["present_value_names"] % (src.num_layers - 1) in {vi["name"] for vi in info["outputs"]}
    assert config["search"]["past_present_share_buffer"] is False
    assert all(0 <= m[k] < m["vocab_size"] for k in ("bos_token_id", "pad_token_id"))
    assert ("custom_ops_library" in dec["session_options"]) == bool(lib)

    ids = [3, 17, 42, 7, 99]
    session = make_session(tmp_path / "model.onnx", threads=1)
    expected = generate.greedy(session, ids, 8).token_ids
    eos = m["eos_token_id"]
    if eos in expected:  # genai stops at eos (random weights may emit it)
        expected = expected[:expected.index(eos) + 1]
    assert genai_greedy(tmp_path, ids, 8) == expected


def test_sliding_window_model_runs_in_genai_past_the_window(tmp_path):
    """A Mistral with a sliding window exports the whole past (the window is in the
    attention mask), so onnxruntime-genai grows its buffers as the model does: its greedy
    tokens past the window equal toolkit's (the capped cache of before failed at step 2)."""
    from toolkit.cli import main

    out = tmp_path / "sw"
    assert main(["convert", "hf:mistral", "--config", "sliding_window=8", "-o", str(out), "--no-parity"]) == 0
    assert bundle.read_manifest(out)["genai"]["config"] == "genai_config.json"
    ids = [5, 6, 7]
    expected = generate.greedy(bundle.load(out, threads=1), ids, 20).token_ids
    assert genai_greedy(out, ids, 20) == expected
