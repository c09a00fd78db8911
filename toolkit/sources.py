"""Resolve a MODEL argument into a PyTorch decoder with one calling convention.

A MODEL is one of:

* a name from ``models/`` (``llama``, ``gpt2``, ``llama-stdlib`` — the trained
  reference checkpoint), with a size preset;
* ``hf:<arch>`` — a Hugging Face transformers architecture built from its config
  with random weights (no hub access), e.g. ``hf:llama``, ``hf:qwen2``;
* a local directory: a Hugging Face model directory (``config.json`` with
  ``model_type``) or a toolkit checkpoint (``config.json`` with ``family``).

Whatever the source, :class:`SourceModel.forward` takes flat tensors and returns
``(logits, [(key, value), ...])`` with keys/values shaped
``[batch, kv_heads, past + seq, head_dim]``. That single convention is what
export (:mod:`toolkit.export`) and parity (:mod:`toolkit.parity`) build on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from toolkit.errors import ModelNotFoundError

# Tiny random-weight configurations of Hugging Face architectures. They keep every
# structural feature of the family (GQA, MoE routing, fused qkv in Phi-3, ...) at
# a size that exports in seconds. Users override any field with --config k=v.
HF_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256, bos_token_id=1, eos_token_id=1),
    "llama": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
    ),
    "qwen2": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
    ),
    "mistral": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, sliding_window=None,
    ),
    "phi3": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
        original_max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "mixtral": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
    ),
}


@dataclasses.dataclass
class SourceModel:
    """A PyTorch decoder resolved from a MODEL argument.

    Attributes:
        spec: The MODEL argument as the user wrote it, a directory as its absolute path
            (recorded in metadata: parity and genai find the source from anywhere).
        module: The underlying ``torch.nn.Module`` (eval mode, float32).
        family: Architecture family (``llama``, ``gpt2``, ``hf:qwen2``, ...).
        num_layers: Decoder layers, i.e. number of (key, value) cache pairs.
        num_kv_heads: Key/value heads per layer.
        head_dim: Size of one attention head.
        vocab_size: Logit width.
        forward: ``(input_ids, attention_mask, position_ids, past) -> (logits, presents)``.
        tokenizer: A ``tokenizers.Tokenizer`` when the source ships one.
        heldout_text: Held-out text for perplexity when the source ships one.
    """

    spec: str
    module: Any
    family: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    forward: Callable[..., Any]
    tokenizer: Any = None
    heldout_text: str | None = None
    preset: str | None = None
    seed: int = 0
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def empty_past(self, batch: int) -> list[tuple[Any, Any]]:
        """Zero-length past key/values for a prefill step."""
        import torch

        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(self.num_layers)]


def _parse_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    return dict(overrides or {})


def resolve_from_metadata(spec: str, metadata: dict[str, str]) -> SourceModel:
    """Rebuild the source of an exported model with the preset/seed/overrides it recorded."""
    preset = metadata.get("toolkit.preset") or "tiny"
    seed = int(metadata.get("toolkit.seed", "0"))
    overrides = json.loads(metadata.get("toolkit.config_overrides", "{}"))
    return resolve(spec, preset=preset, overrides=overrides, seed=seed)


def parse_config_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse ``--config key=value`` items; values are JSON when they parse as JSON."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ModelNotFoundError(
                f"config override {item!r} is not of the form key=value",
                hint="write e.g. --config num_hidden_layers=4",
            )
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """What a MODEL argument names, read without loading any weights.

    Attributes:
        spec: The MODEL argument.
        kind: ``hf-random`` (``hf:<arch>``), ``hf-directory``, ``toolkit-checkpoint``
            (a directory written by ``models.save_checkpoint``), ``toolkit-reference``
            (``llama-stdlib``) or ``toolkit-preset`` (a family name plus a preset).
        hf_config: The transformers config (``hf-*`` kinds).
        family: The toolkit model family (``toolkit-*`` kinds).
        fields: The toolkit config fields (``toolkit-*`` kinds; a checkpoint's
            ``config.json`` as written, so it may hold extra keys such as ``family``).
        directory: Where the config and tokenizer files live (directories, references).
        generation: A Hugging Face directory's ``generation_config.json``, if any.
    """

    spec: str
    kind: str
    hf_config: Any = None
    family: str | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    directory: Path | None = None
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)


def builtin_families() -> tuple[str, ...]:
    """The model families built from presets (``--preset``): the registry's random-weight ones."""
    import models

    return tuple(models.FAMILIES)


def is_builtin_family(spec: str) -> bool:
    return spec in builtin_families()


def resolve_config(spec: str, preset: str = "tiny", overrides: dict[str, Any] | None = None) -> SourceConfig:
    """Resolve a MODEL argument to its configuration (the dispatch of :func:`resolve`).

    Raises:
        ModelNotFoundError: unknown name, architecture, preset or directory, naming the
            known choices.
    """
    overrides = _parse_overrides(overrides)
    path = Path(spec)
    if spec.startswith("hf:"):
        return SourceConfig(spec, "hf-random", hf_config=_hf_tiny_config(spec[3:], overrides))
    if path.exists():
        return _directory_config(spec, path)
    if "/" in spec or spec.startswith("."):
        raise ModelNotFoundError(
            f"model path {spec!r} does not exist",
            hint="pass an existing model directory (with config.json), a toolkit model name "
            f"({', '.join(_toolkit_names())}) or hf:<arch> ({', '.join('hf:' + a for a in HF_TINY_CONFIGS)})",
        )
    import models

    names = models.list_models()
    if spec not in names:  # (models.registry_config checks too; this hint covers every MODEL form)
        raise ModelNotFoundError(
            f"unknown model {spec!r}",
            hint=f"use one of the built-in models ({', '.join(names)}), hf:<arch> "
            f"({', '.join('hf:' + a for a in HF_TINY_CONFIGS)}), or a local model directory",
        )
    family, fields, directory = models.registry_config(spec, preset, overrides)
    kind = "toolkit-reference" if directory is not None else "toolkit-preset"
    return SourceConfig(spec, kind, family=family, fields=fields, directory=directory)


def resolve(spec: str, preset: str = "tiny", overrides: dict[str, Any] | None = None,
            seed: int = 0) -> SourceModel:
    """Resolve a MODEL argument (see module docstring) into a :class:`SourceModel`.

    Raises:
        ModelNotFoundError: unknown name, architecture or directory, naming the
            known choices.
    """
    overrides = _parse_overrides(overrides)
    config = resolve_config(spec, preset, overrides)
    if config.kind == "hf-random":
        src = _hf_random(spec, config.hf_config, seed)
        src.seed, src.overrides = seed, overrides
        return src
    # A directory is recorded by its absolute path (the model's toolkit.source, the
    # bundle manifest): parity and genai resolve the source from any working directory.
    if config.kind == "toolkit-checkpoint":
        return _load_toolkit_checkpoint(str(config.directory.resolve()), config.directory)
    if config.kind == "hf-directory":
        return _load_hf_directory(str(config.directory.resolve()), config)
    src = _toolkit_model(spec, config, seed)
    if config.kind == "toolkit-preset":
        src.preset, src.seed, src.overrides = preset, seed, overrides
    return src


def _toolkit_names() -> list[str]:
    import models

    return models.list_models()


def _toolkit_model(spec: str, config: SourceConfig, seed: int) -> SourceModel:
    import models

    tokenizer = heldout = None
    if config.kind == "toolkit-reference":
        module, tokenizer = models.load_reference(spec)
        heldout = models.reference_heldout_text(spec)
    else:
        module = models.build_from_config(models.config_from_dict(config.family, config.fields), seed=seed)
    return _wrap_toolkit_module(spec, module, tokenizer, heldout)


def _wrap_toolkit_module(spec: str, module: Any, tokenizer: Any = None,
                         heldout: str | None = None) -> SourceModel:
    cfg = module.config

    def forward(input_ids, attention_mask, position_ids, past):
        return module(input_ids, attention_mask, position_ids, list(past) if past else None)

    return SourceModel(
        spec=spec, module=module, family=module.family, num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
        forward=forward, tokenizer=tokenizer, heldout_text=heldout,
    )


def _directory_config(spec: str, path: Path) -> SourceConfig:
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise ModelNotFoundError(
            f"{spec!r} is not a model directory: no config.json in it",
            hint="point at a Hugging Face model directory (config.json + weights) or a toolkit "
            "checkpoint directory written by models.save_checkpoint",
        )
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"cannot read {config_file}: {exc}",
                                 hint="check the file is valid JSON") from exc
    if "family" in raw:
        return SourceConfig(spec, "toolkit-checkpoint", family=raw["family"], fields=raw, directory=path)
    if "model_type" in raw:
        import transformers

        try:
            hf_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # transformers raises many types; report them uniformly
            raise ModelNotFoundError(
                f"transformers could not read the config of {spec!r}: {exc}",
                hint="check config.json is a Hugging Face causal LM config",
            ) from exc
        _check_causal_lm(spec, hf_config)
        generation_file = path / "generation_config.json"
        generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
        return SourceConfig(spec, "hf-directory", hf_config=hf_config, directory=path, generation=generation)
    raise ModelNotFoundError(
        f"{config_file} has neither 'model_type' (Hugging Face) nor 'family' (toolkit checkpoint)",
        hint="point at a Hugging Face causal LM directory or a toolkit checkpoint",
    )


# Encoder families that transformers will also load as a causal LM (BertLMHeadModel,
# ...), which only makes sense for a checkpoint trained as a decoder (is_decoder).
_ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "albert", "distilbert",
                  "deberta", "deberta-v2", "megatron-bert", "mpnet", "xlnet")
# Class-name endings of the saved architectures that carry a language-model head.
_LM_HEAD_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


def _check_causal_lm(spec: str, hf_config: Any) -> None:
    """Refuse a Hugging Face directory that is not a decoder-only causal LM with its
    head, by name, before loading it: transformers would build a causal LM around it
    anyway (BART as BartForCausalLM without its encoder, a base LlamaModel with a random
    lm_head, BERT as BertLMHeadModel) or fail with a list of a hundred config classes."""
    model_type = getattr(hf_config, "model_type", "?")
    supported = "the toolkit converts decoder-only causal language models (Llama, Qwen2, Mistral, GPT-2, ...)"
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ModelNotFoundError(f"{spec!r} is an encoder-decoder model ({model_type}); {supported}",
                                 hint="convert a decoder-only checkpoint")
    if model_type in _ENCODER_TYPES and not getattr(hf_config, "is_decoder", False):
        raise ModelNotFoundError(f"{spec!r} is a bidirectional encoder ({model_type}); {supported}",
                                 hint="convert a decoder-only checkpoint")
    archs = list(getattr(hf_config, "architectures", None) or [])
    if archs and not any(a.endswith(_LM_HEAD_ARCHITECTURES) for a in archs):
        raise ModelNotFoundError(
            f"{spec!r} holds {', '.join(archs)} ({model_type}), not a causal LM with its head; {supported}",
            hint="save the model with its language-model head (e.g. LlamaForCausalLM.save_pretrained): a base "
            "model's lm_head would be random")


def _directory_tokenizer(path: Path) -> Any:
    if not (path / "tokenizer.json").is_file():
        return None
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))


def _load_toolkit_checkpoint(spec: str, path: Path) -> SourceModel:
    import models

    module = models.load_checkpoint(path)
    heldout = (path / "heldout.txt").read_text() if (path / "heldout.txt").is_file() else None
    return _wrap_toolkit_module(spec, module, _directory_tokenizer(path), heldout)


def _load_hf_directory(spec: str, config: SourceConfig) -> SourceModel:
    import transformers

    try:
        module, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(config.directory), dtype="float32", local_files_only=True, output_loading_info=True,
            **_hf_impl_kwargs(config.hf_config))
    except Exception as exc:  # transformers raises many types; report them uniformly
        raise ModelNotFoundError(
            f"transformers could not load {spec!r}: {exc}",
            hint="check the directory holds config.json and safetensors/bin weights of a causal LM",
        ) from exc
    # Weights the checkpoint lacks are initialised at random: the export (and a parity
    # check against the same random draw) would pass with a model nobody trained.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelNotFoundError(
            f"{spec!r} lacks {len(missing)} weight(s) its {type(module).__name__} needs: {shown}; transformers "
            "would fill them with random values",
            hint="save the complete causal LM (with its lm_head) or point at the right directory")
    stored = getattr(config.hf_config, "dtype", None) or getattr(config.hf_config, "torch_dtype", None)
    stored = str(stored).removeprefix("torch.") if stored is not None else None
    if stored in ("float16", "bfloat16"):
        import logging

        logging.getLogger(__name__).warning(
            "%s stores %s weights: they are upcast to float32, the precision the export computes in and parity "
            "compares against (the ONNX model is float32)", spec, stored)
    return _wrap_hf_module(spec, module.eval(), _directory_tokenizer(config.directory))


def _hf_impl_kwargs(config: Any) -> dict[str, str]:
    """Implementation choices that the dynamo exporter can trace.

    Eager attention: the form every pass matches most directly (an SDPA export works
    through this wrapper too, which always passes a mask, and kv-cache takes torch's
    SDPA forms; without a mask SDPA's ``is_causal`` becomes a SymBool). For mixture-of-experts
    models, ``batched_mm`` experts: dense gathers of expert weights, while the
    default grouped-mm path is a custom op the exporter cannot translate and the
    eager path loops over data-dependent token sets.
    """
    kwargs = {"attn_implementation": "eager"}
    if any(getattr(config, a, None) for a in ("num_local_experts", "num_experts", "n_routed_experts")):
        kwargs["experts_implementation"] = "batched_mm"
    return kwargs


def _hf_tiny_config(arch: str, overrides: dict[str, Any]) -> Any:
    import transformers

    if arch not in HF_TINY_CONFIGS:
        raise ModelNotFoundError(
            f"unknown Hugging Face architecture {arch!r}",
            hint=f"use one of {', '.join('hf:' + a for a in HF_TINY_CONFIGS)}, or a local model directory",
        )
    _check_config_fields(arch, overrides)
    try:
        config = transformers.AutoConfig.for_model(arch, **{**HF_TINY_CONFIGS[arch], **overrides})
    except Exception as exc:
        raise ModelNotFoundError(f"invalid config for hf:{arch}: {exc}",
                                 hint="check the --config field names against the transformers config class") from exc
    # Shapes transformers accepts but no decoder can be built or exported with (they
    # failed deep inside torch.export with a broadcast error).
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    kv_heads = heads if kv_heads is None else kv_heads
    if isinstance(layers, int) and layers < 1:
        raise ModelNotFoundError(f"invalid config for hf:{arch}: num_hidden_layers must be >= 1, got {layers}",
                                 hint="e.g. --config num_hidden_layers=2")
    if isinstance(kv_heads, int) and kv_heads < 1:
        raise ModelNotFoundError(f"invalid config for hf:{arch}: num_key_value_heads must be >= 1, got {kv_heads}",
                                 hint="e.g. --config num_key_value_heads=1")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise ModelNotFoundError(
            f"invalid config for hf:{arch}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})",
            hint=f"e.g. --config num_key_value_heads={_largest_divisor(heads, kv_heads)}")
    return config


def _largest_divisor(n: int, at_most: int) -> int:
    return next(d for d in range(min(n, at_most), 0, -1) if n % d == 0)


# Names transformers (5.x) accepts and folds into rope_parameters.
LEGACY_ROPE_FIELDS = ("rope_theta", "rope_scaling", "partial_rotary_factor")


def _check_config_fields(arch: str, overrides: dict[str, Any]) -> None:
    """Refuse --config fields the architecture's config class does not have: transformers
    stores unknown keyword arguments as plain attributes, so a misspelt field would be
    ignored silently and the user would convert a different model than asked for."""
    if not overrides:
        return
    import difflib

    import transformers

    base = transformers.AutoConfig.for_model(arch, **HF_TINY_CONFIGS[arch])
    known = set(base.to_dict()) | set(getattr(type(base), "attribute_map", {}))
    before = base.to_dict()

    def folded(key: str) -> bool:
        """A legacy name the config folds into a field it has (rope_theta, rope_scaling and
        partial_rotary_factor into rope_parameters), whatever its value (a default value
        changes nothing); another key counts when it changes a field."""
        if key in LEGACY_ROPE_FIELDS and "rope_parameters" in known:
            return True
        try:
            after = transformers.AutoConfig.for_model(arch, **{**HF_TINY_CONFIGS[arch], key: overrides[key]}).to_dict()
        except (ValueError, TypeError, KeyError, AttributeError):  # an invalid value: the build names it
            return True
        return any(after.get(k) != before[k] for k in before)

    unknown = [key for key in overrides if key not in known and not folded(key)]
    if unknown:
        matches = [m for key in unknown for m in difflib.get_close_matches(key, sorted(known), n=1)]
        rope = any("rope" in key or "rotary" in key for key in unknown) and "rope_parameters" in known
        raise ModelNotFoundError(
            f"hf:{arch} ({type(base).__name__}) has no config field {', '.join(map(repr, unknown))}",
            hint="RoPE settings live in rope_parameters, e.g. --config 'rope_parameters={\"rope_type\": "
                 "\"linear\", \"factor\": 2.0, \"rope_theta\": 10000.0}'" if rope
            else f"did you mean {', '.join(matches)}?" if matches
            else f"use fields of transformers.{type(base).__name__}")


def _hf_random(spec: str, config: Any, seed: int) -> SourceModel:
    import torch
    import transformers

    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    module = transformers.AutoModelForCausalLM.from_config(config, **_hf_impl_kwargs(config))
    return _wrap_hf_module(spec, module.eval().float(), None)


def _wrap_hf_module(spec: str, module: Any, tokenizer: Any) -> SourceModel:
    import transformers

    cfg = module.config
    num_layers = cfg.num_hidden_layers
    num_heads = cfg.num_attention_heads
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads

    def forward(input_ids, attention_mask, position_ids, past):
        # Full-length layers for every layer type, sliding-window ones included: the window
        # is applied by the attention mask over the whole past. A sliding layer keeps only
        # window - 1 tokens, and refilled each call it counts only those, so its mask
        # offset read the mask's first columns (a batch's left padding) and the exported
        # graph was traced for one side of its "window full" branch (found by an audit).
        cache = transformers.DynamicCache()
        if past:
            for i, (k, v) in enumerate(past):
                cache.update(k, v, i)
        out = module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=cache, use_cache=True)
        kv = out.past_key_values
        presents = [(layer.keys, layer.values) for layer in kv.layers]
        return out.logits, presents

    return SourceModel(
        spec=spec, module=module, family=f"hf:{cfg.model_type}", num_layers=num_layers,
        num_kv_heads=num_kv, head_dim=head_dim, vocab_size=cfg.vocab_size, forward=forward,
        tokenizer=tokenizer,
    )
