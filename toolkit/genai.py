"""``genai_config.json`` for a bundle, so onnxruntime-genai loads and generates from it.

onnxruntime-genai (``og.Model(DIR)``) does not inspect the ONNX graph to learn how to
drive it: it reads ``DIR/genai_config.json`` (format documented at
https://onnxruntime.ai/docs/genai/reference/config.html) for the model type, the
special token ids, the decoder file, the KV-cache geometry (``head_size``,
``num_key_value_heads``, ``num_hidden_layers``), the name templates of the cache
I/O (``past_key_values.%d.key`` ...) and the session options — among them
``custom_ops_library``, the op library ONNX Runtime must register before it can
load a graph with ``com.toolkit`` ops. ``og.Tokenizer`` (onnxruntime-extensions)
reads ``tokenizer.json`` plus ``tokenizer_config.json``, whose ``tokenizer_class``
selects the tokenizer; the toolkit ships only ``tokenizer.json``, so this module
writes the second file too.

The exported layout (``toolkit/export.py``) is already the one genai's generic
decoder-only loop drives: it allocates empty ``[B, kv_heads, 0, head_size]`` past
tensors for prefill, feeds ``present.*`` back as ``past_key_values.*`` and grows
``attention_mask`` / ``position_ids`` each step. Greedy token ids from genai equal
those of :func:`toolkit.generate.greedy` (``tests/test_genai.py``).

What genai cannot drive, and so gets no config (:func:`unsupported_reason` says why;
the reason is recorded in ``manifest.json`` under ``genai`` and logged):

* a quantized KV cache (``--kv-cache``): its per-layer I/O is ``key_q``,
  ``key_scale``, ``key_res`` (and ``key_zero`` for asymmetric/KIVI schemes) with
  separate quantized and residual length axes. genai's cache knows one tensor per
  key/value (plus its own ``key_scale`` for GroupQueryAttention's int8 cache) on a
  single sequence axis, and has no template for the residual or zero-point tensors:
  a run fails with ``Missing Input: past_key_values.N.key_res`` (measured with
  onnxruntime-genai 0.18.0, also when ``key_q`` / ``key_scale`` are mapped to
  ``past_key_names`` / ``past_key_scale_names``).
* any other input genai does not know, except ``sampling_seed`` (``--sampling-head K
  --sample``): genai samples from ``logits`` itself, so the model's seeded head is
  only an extra output, but ONNX Runtime still needs the seed; the config is
  written and the manifest lists it under ``genai.host_inputs`` — feed it once with
  ``generator.set_model_input("sampling_seed", np.array([seed], np.int64))``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from toolkit.errors import InvalidModelError, ModelNotFoundError

GENAI_CONFIG = "genai_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER = "tokenizer.json"

log = logging.getLogger(__name__)

# toolkit family -> genai ``model.type``. genai's dedicated types only select
# decoder-only handling here (RoPE, norms and attention are inside our graph), so
# any Llama-like family maps to its own name. GPT-2 does not use genai's "gpt2"
# type: that one expects the legacy combined ``past_%d`` [2, B, H, S, D] cache
# (with our config, 0.18.0 fails with "Model input was not found: "), while our export
# has separate key/value tensors, which the generic "decoder" type drives. Mixtral has no genai type of its own; "decoder" drives it the same way.
MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "gpt2": "decoder",
    "hf:llama": "llama",
    "hf:qwen2": "qwen2",
    "hf:mistral": "mistral",
    "hf:phi3": "phi3",
    "hf:gpt2": "decoder",
    "hf:mixtral": "decoder",
}

# Inputs the model may have beyond genai's own, which a host feeds once per
# generator; value: what to tell the user.
HOST_INPUTS: dict[str, str] = {
    "sampling_seed": "int64 [1] (or one per row): seed of the model's SampleTopKTopP head; genai samples from logits itself "
    "and only needs some value here: generator.set_model_input('sampling_seed', np.array([0], np.int64))",
}

_BASE_INPUTS = ("input_ids", "attention_mask", "position_ids")
_PAST = re.compile(r"^past_key_values\.(\d+)\.(\w+)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(\w+)$")

# Special-token spellings, most specific first, for tokenizers whose source gives no ids.
_EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "</s>", "<eos>", "<|end|>")
_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")


def unsupported_reason(info: dict[str, Any]) -> str | None:
    """Why onnxruntime-genai cannot drive a model, or ``None`` when it can.

    Args:
        info: :func:`toolkit.model_info.describe` of the model.

    Returns:
        A one-sentence reason naming the tensor that genai cannot feed or read.
    """
    meta = info["metadata"]
    family = meta.get("toolkit.family")
    if family not in MODEL_TYPES:
        return (f"model family {family!r} has no onnxruntime-genai model type here "
                f"(supported: {', '.join(sorted(MODEL_TYPES))})")
    inputs = {vi["name"]: vi for vi in info["inputs"]}
    outputs = {vi["name"]: vi for vi in info["outputs"]}
    kinds = sorted({m.group(2) for m in map(_PAST.match, inputs) if m})
    if "toolkit.low_rank_kv" in meta or any("_latent" in k for k in kinds):
        return (f"low-rank latent KV cache: per-layer cache tensors {kinds} of shape [batch, tokens, rank]; "
                "onnxruntime-genai allocates and feeds [batch, kv_heads, tokens, head_size] key/value tensors, "
                "so it cannot feed past_key_values.N.key_latent")
    if "toolkit.kv_quant" in meta or any(k not in ("key", "value") for k in kinds):
        return (f"quantized KV cache ({meta.get('toolkit.kv_cache', 'quantized')}): per-layer cache tensors "
                f"{kinds}; onnxruntime-genai's KV cache has templates only for one key and one value tensor "
                "(+ its own GQA key_scale/value_scale) on one shared sequence axis, and none for the residual "
                "window or zero points, so it cannot feed past_key_values.N.key_res")
    for name in _BASE_INPUTS:
        if name not in inputs:
            return f"the model has no {name!r} input, which onnxruntime-genai feeds every step"
        if inputs[name]["dtype"] not in ("int64", "int32"):
            return f"input {name!r} is {inputs[name]['dtype']}; onnxruntime-genai feeds int32 or int64"
    layers = sorted({int(m.group(1)) for m in map(_PAST.match, inputs) if m})
    if not layers or layers != list(range(len(layers))):
        return f"past_key_values.N.key/value inputs are missing or not numbered 0..N-1 (found layers {layers})"
    for i in layers:
        for kind in ("key", "value"):
            if f"past_key_values.{i}.{kind}" not in inputs or f"present.{i}.{kind}" not in outputs:
                return f"layer {i} lacks past_key_values.{i}.{kind} or present.{i}.{kind}"
    if "logits" not in outputs:
        return "the model has no 'logits' output, which onnxruntime-genai's search reads"
    unknown = [n for n in inputs if n not in _BASE_INPUTS and not _PAST.match(n) and n not in HOST_INPUTS]
    if unknown:
        return f"inputs {unknown} are not ones onnxruntime-genai feeds"
    return None


def source_config(meta: dict[str, str]) -> dict[str, Any]:
    """Model hyper-parameters and special token ids from the source the model records.

    Reads the configuration only (no weights), through the same dispatch that loads
    the model (:func:`toolkit.sources.resolve_config`): a toolkit preset plus
    overrides, a toolkit checkpoint's or Hugging Face directory's ``config.json`` (and
    ``generation_config.json``), or the tiny ``hf:<arch>`` config.

    Args:
        meta: The model's ``toolkit.*`` metadata properties.

    Returns:
        ``hidden_size``, ``num_attention_heads``, ``context_length`` and, where the
        source states them, ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``
        and ``source_dir`` (for its tokenizer files).

    Raises:
        InvalidModelError: the metadata names a source that no longer resolves.
    """
    from toolkit.sources import resolve_config

    spec = meta.get("toolkit.source") or ""
    overrides = json.loads(meta.get("toolkit.config_overrides") or "{}")
    try:
        config = resolve_config(spec, meta.get("toolkit.preset") or "tiny", overrides)
    except ModelNotFoundError as exc:
        raise InvalidModelError(f"cannot find the source {spec!r} recorded in the model's metadata: {exc}",
                                hint="run `toolkit convert` where the source model is available") from None
    if config.hf_config is not None:
        out = _from_hf_config(config.hf_config)
        out.update({k: config.generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                    if config.generation.get(k) is not None})
    else:
        out = _from_toolkit_fields(config.family, config.fields)
    if config.directory is not None:
        out["source_dir"] = str(config.directory)
    return out


def _from_toolkit_fields(family: str, fields: dict[str, Any]) -> dict[str, Any]:
    import dataclasses

    import models

    known = {f.name for f in dataclasses.fields(models.FAMILIES[family][0])}
    config = models.config_from_dict(family, {k: v for k, v in fields.items() if k in known})
    return {"hidden_size": config.hidden_size, "num_attention_heads": config.num_heads,
            "context_length": config.max_position_embeddings}


def _from_hf_config(config: Any) -> dict[str, Any]:
    out = {
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "context_length": getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if value is not None:
            out[key] = value
    return out


def _tokenizer_ids(tokenizer_path: Path) -> dict[str, tuple[int, str]]:
    """(id, text) of the bos / eos / pad tokens a tokenizer.json declares as special."""
    data = json.loads(tokenizer_path.read_text())
    special = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    out: dict[str, tuple[int, str]] = {}
    for key, spellings in (("bos", _BOS_TOKENS), ("eos", _EOS_TOKENS), ("pad", _PAD_TOKENS)):
        for text in spellings:
            if text in special:
                out[key] = (special[text], text)
                break
    return out


def build_config(info: dict[str, Any], source: dict[str, Any], special: dict[str, Any],
                 op_library: str | None, model_file: str = "model.onnx") -> dict[str, Any]:
    """The ``genai_config.json`` document for a model genai can drive.

    Args:
        info: :func:`toolkit.model_info.describe` of the model.
        source: :func:`source_config` of its source.
        special: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (ints or, for
            eos, a list of ints; missing keys are allowed).
        op_library: File name of the bundled op library, relative to the bundle
            (genai resolves it against the config's directory), or ``None``.
        model_file: The decoder's file name inside the bundle.

    Returns:
        The configuration as a JSON-able dict.
    """
    meta = info["metadata"]
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if op_library:
        session_options["custom_ops_library"] = op_library
    context = int(source["context_length"])
    eos = special.get("eos_token_id")
    model: dict[str, Any] = {
        "type": MODEL_TYPES[meta["toolkit.family"]],
        "context_length": context,
        "vocab_size": int(meta["toolkit.vocab_size"]),
        "decoder": {
            "session_options": session_options,
            "filename": model_file,
            "head_size": int(meta["toolkit.head_dim"]),
            "hidden_size": int(source["hidden_size"]),
            "num_attention_heads": int(source["num_attention_heads"]),
            "num_key_value_heads": int(meta["toolkit.num_kv_heads"]),
            "num_hidden_layers": int(meta["toolkit.num_layers"]),
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "position_ids": "position_ids",
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
        },
    }
    # genai requires eos/pad/bos ids inside [0, vocab_size). A source that names no
    # end-of-sequence token (the random-weight hf:qwen2 config, toolkit presets without a
    # tokenizer) gets 0 for the missing ones: generation then also stops if the model
    # emits token 0; write() records that in the manifest.
    model["eos_token_id"] = eos if eos is not None else 0
    first_eos = model["eos_token_id"][0] if isinstance(model["eos_token_id"], list) else model["eos_token_id"]
    model["pad_token_id"] = special.get("pad_token_id", first_eos)
    model["bos_token_id"] = special.get("bos_token_id", first_eos)
    return {
        "model": model,
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # Our present.* is [B, H, P + S, D] (a growing cache), not a max-length buffer
            # shared with past: genai must allocate a new present each step.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def tokenizer_config(special_text: dict[str, str], context_length: int) -> dict[str, Any]:
    """A minimal ``tokenizer_config.json`` for a ``tokenizer.json``-only tokenizer.

    ``PreTrainedTokenizerFast`` makes onnxruntime-extensions build the tokenizer from
    ``tokenizer.json`` alone (model, pre-tokenizer, added tokens), as transformers
    does; no BOS/EOS is added beyond what its post-processor says.
    """
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special_text.get("bos"),
        "eos_token": special_text.get("eos"),
        "pad_token": special_text.get("pad"),
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }


def write(directory: Path, info: dict[str, Any], op_library: str | None) -> dict[str, Any]:
    """Write ``genai_config.json`` (and ``tokenizer_config.json``) into a bundle directory.

    Called by :func:`toolkit.bundle.write` inside the staging directory, after the
    model, tokenizer and op library are in place, so the files are published
    atomically with the rest of the bundle.

    Args:
        directory: The bundle (staging) directory holding ``model.onnx``.
        info: :func:`toolkit.model_info.describe` of the model.
        op_library: File name of the bundled op library, or ``None`` when the model
            uses no custom ops.

    Returns:
        The manifest record: ``{"config": "genai_config.json", "model_type": ...,
        "tokenizer_config": ... | None, "host_inputs": {...}}``, or ``{"config":
        None, "reason": ...}`` when genai cannot drive the model (also logged).
    """
    directory = Path(directory)
    reason = unsupported_reason(info)
    if reason is not None:
        log.warning("%s not written: %s", GENAI_CONFIG, reason)
        return {"config": None, "reason": reason}
    source = source_config(info["metadata"])
    special: dict[str, Any] = {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                               if source.get(k) is not None}
    tokenizer_path = directory / TOKENIZER
    special_text: dict[str, str] = {}
    if tokenizer_path.is_file():
        for key, (token_id, text) in _tokenizer_ids(tokenizer_path).items():
            special.setdefault(f"{key}_token_id", token_id)
            special_text[key] = text
    config = build_config(info, source, special, op_library)
    record: dict[str, Any] = {"config": GENAI_CONFIG, "model_type": config["model"]["type"],
                              "tokenizer_config": None,
                              "host_inputs": {n: HOST_INPUTS[n] for n in
                                              (vi["name"] for vi in info["inputs"]) if n in HOST_INPUTS}}
    notes = []
    if "eos_token_id" not in special:
        notes.append("the source names no end-of-sequence token; onnxruntime-genai requires one in "
                     "[0, vocab_size), so eos/pad/bos = 0 were written: generation also stops at token 0")
    if not tokenizer_path.is_file():
        notes.append(f"no {TOKENIZER} in the bundle (the source has no tokenizer, e.g. a random-weight hf: config): "
                     "og.Tokenizer(model) cannot load; feed token ids (generator.append_tokens([...]))")
    if notes:
        record["notes"] = notes
        for note in notes:
            log.warning("%s: %s", GENAI_CONFIG, note)
    if tokenizer_path.is_file():
        shipped = Path(source["source_dir"]) / TOKENIZER_CONFIG if source.get("source_dir") else None
        if shipped is not None and shipped.is_file():
            shutil.copy2(shipped, directory / TOKENIZER_CONFIG)  # the source's own (chat template, flags)
        else:
            (directory / TOKENIZER_CONFIG).write_text(
                json.dumps(tokenizer_config(special_text, config["model"]["context_length"]), indent=2))
        record["tokenizer_config"] = TOKENIZER_CONFIG
    (directory / GENAI_CONFIG).write_text(json.dumps(config, indent=2))
    return record
