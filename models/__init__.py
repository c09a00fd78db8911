"""Model registry for the ONNX deployment toolkit.

Provides from-scratch decoder-only language models with one shared forward
contract (``forward(input_ids, attention_mask, position_ids, past_key_values)
-> (logits, presents)``), size presets, deterministic random construction, and
safetensors checkpoint I/O (``config.json`` with a ``"family"`` key plus
``model.safetensors``; pickle is never used).

Families:
    * ``"llama"`` -- :class:`models.llama.LlamaForCausalLM` (RMSNorm, RoPE, GQA, SwiGLU).
    * ``"gpt2"`` -- :class:`models.gpt2.GPT2ForCausalLM` (LayerNorm, learned positions, GELU).

Reference checkpoints (trained weights shipped in ``models/checkpoints``):
    * ``"llama-stdlib"`` -- a small Llama trained on the Python standard library
      by :mod:`models.train_reference`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models._common import position_ids_from_mask
from models.gpt2 import GPT2Config, GPT2ForCausalLM
from models.llama import LlamaConfig, LlamaForCausalLM

if TYPE_CHECKING:
    import tokenizers

__all__ = [
    "CHECKPOINT_ROOT",
    "FAMILIES",
    "PRESETS",
    "REFERENCES",
    "GPT2Config",
    "GPT2ForCausalLM",
    "LlamaConfig",
    "LlamaForCausalLM",
    "build",
    "build_from_config",
    "config_from_dict",
    "evaluate_perplexity",
    "list_models",
    "load_checkpoint",
    "load_reference",
    "position_ids_from_mask",
    "reference_heldout_text",
    "save_checkpoint",
]

CHECKPOINT_ROOT = Path(__file__).resolve().parent / "checkpoints"

FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "gpt2": (GPT2Config, GPT2ForCausalLM),
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "llama": {
        # ~0.1M params: unit tests.
        "tiny": dict(
            vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=176, max_position_embeddings=128, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
        ),
        # ~4.9M params: the architecture of the llama-stdlib reference.
        "small": dict(
            vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
            intermediate_size=704, max_position_embeddings=512, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
        ),
        # ~40M params.
        "base": dict(
            vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
            intermediate_size=1408, max_position_embeddings=1024, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
        ),
    },
    "gpt2": {
        "tiny": dict(
            vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
            intermediate_size=256, max_position_embeddings=128, layer_norm_eps=1e-5,
        ),
        "small": dict(
            vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8,
            intermediate_size=1024, max_position_embeddings=512, layer_norm_eps=1e-5,
        ),
        # ~42M params.
        "base": dict(
            vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
            intermediate_size=2048, max_position_embeddings=1024, layer_norm_eps=1e-5,
        ),
    },
}

# Trained checkpoints: name -> directory under CHECKPOINT_ROOT.
REFERENCES: dict[str, str] = {"llama-stdlib": "llama-stdlib"}

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
HELDOUT_FILE = "heldout.txt"


def _not_found(message: str, hint: str) -> Exception:
    """Create a :class:`toolkit.errors.ModelNotFoundError` (imported lazily)."""
    from toolkit.errors import ModelNotFoundError

    return ModelNotFoundError(message, hint=hint)


def list_models() -> list[str]:
    """Return the names accepted by :func:`build`.

    Returns:
        Family names (random init from a preset) followed by reference names
        (trained checkpoints).
    """
    return [*FAMILIES, *REFERENCES]


def config_from_dict(family: str, fields: dict[str, Any]) -> LlamaConfig | GPT2Config:
    """Create the config dataclass of ``family`` from a dict of fields.

    Args:
        family: ``"llama"`` or ``"gpt2"``.
        fields: config fields; unknown keys raise.

    Returns:
        The config instance.

    Raises:
        ModelNotFoundError: for an unknown family or field.
    """
    if family not in FAMILIES:
        raise _not_found(f"unknown model family {family!r}", f"use one of: {', '.join(FAMILIES)}")
    config_cls = FAMILIES[family][0]
    known = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise _not_found(
            f"unknown config field(s) {', '.join(map(repr, unknown))} for model family {family!r}",
            f"known fields: {', '.join(known)}",
        )
    return config_cls(**fields)


def build_from_config(config: LlamaConfig | GPT2Config, seed: int = 0) -> nn.Module:
    """Create a randomly initialised model for ``config`` in eval mode.

    The global torch RNG state is left untouched.

    Args:
        config: a :class:`LlamaConfig` or :class:`GPT2Config`.
        seed: initialisation seed; the same seed gives identical weights.

    Returns:
        The model, float32, in eval mode.
    """
    model_cls = LlamaForCausalLM if isinstance(config, LlamaConfig) else GPT2ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        model.init_weights()
    return model.eval()


def registry_config(name: str, preset: str = "tiny",
                    overrides: dict[str, Any] | None = None) -> tuple[str, dict[str, Any], Path | None]:
    """Resolve a registry name to its configuration without building the model.

    Args:
        name: one of :func:`list_models`.
        preset: size preset of a family name (ignored for a reference).
        overrides: config fields replacing the preset's values (none for a reference).

    Returns:
        ``(family, fields, directory)``: for a family name, the preset's fields with
        the overrides and ``directory`` None; for a reference, its checkpoint's
        ``config.json`` as written (it holds ``family`` too) and its directory.

    Raises:
        ModelNotFoundError: unknown name or preset, overrides for a reference, or a
            reference whose config cannot be read.
    """
    overrides = dict(overrides or {})
    if name in REFERENCES:
        if overrides:
            raise _not_found(
                f"reference model {name!r} is a trained checkpoint and takes no config overrides "
                f"(got {', '.join(sorted(overrides))})",
                "use the random-weight family instead (CLI: `llama --preset small --config num_layers=4`; "
                "Python: build('llama', preset='small', ...))",
            )
        directory = _reference_dir(name)
        try:
            fields = json.loads((directory / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise _not_found(f"reference model {name!r}: cannot read {directory / CONFIG_FILE}: {exc}",
                             "re-create it with: python -m models.train_reference --out " + str(directory)) from exc
        return fields["family"], fields, directory
    if name not in FAMILIES:
        raise _not_found(f"unknown model {name!r}", f"known models: {', '.join(list_models())}")
    presets = PRESETS[name]
    if preset not in presets:
        raise _not_found(
            f"unknown preset {preset!r} for model {name!r}", f"known presets: {', '.join(presets)}"
        )
    return name, {**presets[preset], **overrides}, None


def build(name: str, preset: str = "tiny", seed: int = 0, **overrides: Any) -> nn.Module:
    """Build a model by registry name.

    For a family name (``"llama"``, ``"gpt2"``) the model is randomly
    initialised from ``PRESETS[name][preset]`` updated with ``overrides``. For a
    reference name (``"llama-stdlib"``) the trained checkpoint is loaded; then
    ``preset`` and ``seed`` are ignored and ``overrides`` must be empty.

    Args:
        name: one of :func:`list_models`.
        preset: ``"tiny"``, ``"small"`` or ``"base"``.
        seed: initialisation seed.
        **overrides: config fields replacing the preset's values.

    Returns:
        The model in eval mode.

    Raises:
        ModelNotFoundError: unknown name, preset or override field.
    """
    family, fields, directory = registry_config(name, preset, overrides)
    if directory is not None:
        return load_reference(name)[0]
    return build_from_config(config_from_dict(family, fields), seed=seed)


def save_checkpoint(model: nn.Module, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Save ``model`` as ``config.json`` + ``model.safetensors``.

    Args:
        model: a model from this package (has ``family`` and ``config``).
        directory: output directory (created if missing).
        dtype: optional storage dtype for floating weights (e.g.
            ``torch.float16`` to halve the file); ``None`` keeps the model's.

    Returns:
        The directory path.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    config = {"family": model.family, **model.config.to_dict()}
    if dtype is not None:
        config["storage_dtype"] = str(dtype).removeprefix("torch.")
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"family": model.family})
    return directory


def load_checkpoint(directory: str | Path) -> nn.Module:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Weights are converted to float32 regardless of the storage dtype.

    Args:
        directory: directory holding ``config.json`` and ``model.safetensors``.

    Returns:
        The model, float32, in eval mode.

    Raises:
        ModelNotFoundError: if the directory lacks either file or the config is
            not a known family.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise _not_found(
            f"{directory} does not hold a model checkpoint (missing {', '.join(missing)})",
            "point at a directory written by models.save_checkpoint",
        )
    fields = json.loads(config_path.read_text())
    family = fields.pop("family", None)
    fields.pop("storage_dtype", None)
    if family is None:
        raise _not_found(f"{config_path} has no 'family' key", f"add \"family\": one of {', '.join(FAMILIES)}")
    config = config_from_dict(family, fields)
    model = FAMILIES[family][1](config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights_path)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _reference_dir(name: str) -> Path:
    """Return the checkpoint directory of a reference model, validating the name."""
    if name not in REFERENCES:
        raise _not_found(
            f"unknown reference model {name!r}", f"known reference models: {', '.join(REFERENCES)}"
        )
    return CHECKPOINT_ROOT / REFERENCES[name]


def load_reference(name: str = "llama-stdlib") -> tuple[nn.Module, tokenizers.Tokenizer]:
    """Load a trained reference checkpoint and its tokenizer.

    Args:
        name: a key of :data:`REFERENCES`.

    Returns:
        ``(model, tokenizer)``; the model is float32 in eval mode.

    Raises:
        ModelNotFoundError: unknown name or missing files.
    """
    import tokenizers

    directory = _reference_dir(name)
    tok_path = directory / TOKENIZER_FILE
    if not tok_path.is_file():
        raise _not_found(
            f"reference model {name!r} has no tokenizer at {tok_path}",
            "re-create it with: python -m models.train_reference --out " + str(directory),
        )
    model = load_checkpoint(directory)
    return model, tokenizers.Tokenizer.from_file(str(tok_path))


def reference_heldout_text(name: str = "llama-stdlib") -> str:
    """Return the held-out evaluation text shipped with a reference model.

    Args:
        name: a key of :data:`REFERENCES`.

    Returns:
        The contents of ``heldout.txt`` (text never seen in training).

    Raises:
        ModelNotFoundError: unknown name or missing file.
    """
    path = _reference_dir(name) / HELDOUT_FILE
    if not path.is_file():
        raise _not_found(f"reference model {name!r} has no {HELDOUT_FILE} at {path}",
                         "re-create it with: python -m models.train_reference")
    return path.read_text(encoding="utf-8")


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, token_ids: list[int], chunk_len: int = 256) -> float:
    """Perplexity of ``model`` on a token sequence, scored in independent chunks.

    The sequence is cut into consecutive non-overlapping chunks of
    ``chunk_len`` tokens (the last may be shorter); within a chunk every token
    after the first is predicted from its prefix. The result is
    ``exp(total NLL / number of predicted tokens)``.

    Args:
        model: a model from this package.
        token_ids: token ids to score (at least 2).
        chunk_len: chunk length (at most the model's max positions).

    Returns:
        The perplexity.
    """
    total_nll, count = 0.0, 0
    for start in range(0, len(token_ids), chunk_len):
        chunk = token_ids[start : start + chunk_len]
        if len(chunk) < 2:
            continue
        ids = torch.tensor([chunk], dtype=torch.long)
        mask = torch.ones_like(ids)
        pos = torch.arange(ids.shape[1])[None]
        logits, _ = model(ids, mask, pos)
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total_nll += float(nll)
        count += ids.shape[1] - 1
    return math.exp(total_nll / count)
