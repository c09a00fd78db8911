"""Tests for the from-scratch decoders in :mod:`models` (llama and gpt2 families).

Covers the shared forward contract relied on by export and parity code: cache
consistency (prefill == token-by-token decode), left padding, empty past
(``P = 0``), grouped-query attention, NaN-free fully padded rows, the registry
(:func:`models.build` and its errors), checkpoint round trips, and numerical
agreement with the Hugging Face ``transformers`` reference implementations.
"""

from __future__ import annotations

import pytest
import torch

import models
from models import position_ids_from_mask

FAMILIES = ["llama", "gpt2"]
ATOL = 1e-5


def _ids(batch: int, seq: int, vocab: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, seq), generator=gen)


def _full(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        logits, _ = model(ids, mask, position_ids_from_mask(mask, ids.shape[1]))
    return logits


def _empty_past(model: torch.nn.Module, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    c = model.config
    shape = (batch, c.num_kv_heads, 0, c.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(c.num_layers)]


@pytest.fixture(params=FAMILIES)
def tiny(request: pytest.FixtureRequest) -> torch.nn.Module:
    return models.build(request.param, "tiny", seed=0)


def test_position_ids_from_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids_from_mask(mask, 2).tolist() == [[1, 2], [3, 4]]


def test_output_contract(tiny: torch.nn.Module) -> None:
    c = tiny.config
    ids = _ids(2, 7, c.vocab_size)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits, presents = tiny(ids, mask, position_ids_from_mask(mask, 7))
    assert logits.shape == (2, 7, c.vocab_size) and logits.dtype == torch.float32
    assert len(presents) == c.num_layers
    for k, v in presents:
        assert k.shape == v.shape == (2, c.num_kv_heads, 7, c.head_dim)
    assert tiny.family in ("llama", "gpt2") and not tiny.training


def test_prefill_matches_token_by_token_decode(tiny: torch.nn.Module) -> None:
    ids = _ids(2, 9, tiny.config.vocab_size)
    ref = _full(tiny, ids)
    past, steps = None, []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            mask = torch.ones(2, t + 1, dtype=torch.long)
            logits, past = tiny(ids[:, t : t + 1], mask, position_ids_from_mask(mask, 1), past)
            steps.append(logits)
            assert past[0][0].shape[2] == t + 1
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=ATOL, rtol=0)


def test_chunked_prefill_then_decode(tiny: torch.nn.Module) -> None:
    ids = _ids(2, 10, tiny.config.vocab_size)
    ref = _full(tiny, ids)
    with torch.no_grad():
        m1 = torch.ones(2, 6, dtype=torch.long)
        l1, past = tiny(ids[:, :6], m1, position_ids_from_mask(m1, 6))
        m2 = torch.ones(2, 10, dtype=torch.long)
        l2, past = tiny(ids[:, 6:], m2, position_ids_from_mask(m2, 4), past)
    torch.testing.assert_close(torch.cat([l1, l2], dim=1), ref, atol=ATOL, rtol=0)
    assert past[-1][1].shape[2] == 10


def test_left_padding_matches_unpadded(tiny: torch.nn.Module) -> None:
    vocab = tiny.config.vocab_size
    long_row, short_row = _ids(1, 8, vocab, seed=2), _ids(1, 5, vocab, seed=3)
    pad = 3
    ids = torch.cat([long_row, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_row], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    batched = _full(tiny, ids, mask)
    torch.testing.assert_close(batched[0:1], _full(tiny, long_row), atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1:2, pad:], _full(tiny, short_row), atol=ATOL, rtol=0)

    # Continue decoding with the padded cache: still equal to the lone row.
    nxt = _ids(2, 1, vocab, seed=4)
    with torch.no_grad():
        _, past = tiny(ids, mask, position_ids_from_mask(mask, ids.shape[1]))
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step, _ = tiny(nxt, mask2, position_ids_from_mask(mask2, 1), past)
    alone = _full(tiny, torch.cat([short_row, nxt[1:2]], dim=1))[:, -1:]
    torch.testing.assert_close(step[1:2], alone, atol=ATOL, rtol=0)


def test_fully_padded_row_is_finite(tiny: torch.nn.Module) -> None:
    ids = _ids(2, 4, tiny.config.vocab_size)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])
    logits = _full(tiny, ids, mask)
    assert torch.isfinite(logits).all()


def test_empty_past_equals_none(tiny: torch.nn.Module) -> None:
    ids = _ids(3, 5, tiny.config.vocab_size)
    mask = torch.ones_like(ids)
    pos = position_ids_from_mask(mask, 5)
    with torch.no_grad():
        a, pa = tiny(ids, mask, pos, None)
        b, pb = tiny(ids, mask, pos, _empty_past(tiny, 3))
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    for (ka, va), (kb, vb) in zip(pa, pb):
        assert kb.shape == (3, tiny.config.num_kv_heads, 5, tiny.config.head_dim)
        torch.testing.assert_close(ka, kb, atol=ATOL, rtol=0)
        torch.testing.assert_close(va, vb, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_shapes_and_cache(kv_heads: int) -> None:
    model = models.build("llama", "tiny", num_kv_heads=kv_heads)
    c = model.config
    assert c.num_heads == 4 and c.num_kv_heads == kv_heads and c.head_dim == 16
    assert model.layers[0].attn.k_proj.weight.shape == (kv_heads * c.head_dim, c.hidden_size)
    ids = _ids(2, 6, c.vocab_size)
    ref = _full(model, ids)
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        _, past = model(ids[:, :5], mask[:, :5], position_ids_from_mask(mask[:, :5], 5))
        last, past = model(ids[:, 5:], mask, position_ids_from_mask(mask, 1), past)
    assert past[0][0].shape == (2, kv_heads, 6, c.head_dim)
    torch.testing.assert_close(last, ref[:, 5:], atol=ATOL, rtol=0)


def test_gqa_equals_mha_with_repeated_kv_weights() -> None:
    gqa = models.build("llama", "tiny", num_kv_heads=2)
    mha = models.build("llama", "tiny", num_kv_heads=4)
    state = gqa.state_dict()
    d = gqa.config.head_dim
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            heads = value.view(2, d, -1)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(4 * d, -1)
    mha.load_state_dict(state)
    ids = _ids(2, 7, gqa.config.vocab_size)
    torch.testing.assert_close(_full(gqa, ids), _full(mha, ids), atol=ATOL, rtol=0)


def test_gpt2_rejects_gqa() -> None:
    with pytest.raises(ValueError):
        models.GPT2Config(num_heads=4, num_kv_heads=2)


def test_build_unknown_name_raises() -> None:
    from toolkit.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError) as err:
        models.build("no-such-model")
    text = str(err.value)
    assert "no-such-model" in text
    for name in models.list_models():
        assert name in text


def test_build_unknown_preset_and_field_raise() -> None:
    from toolkit.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="tiny"):
        models.build("llama", "huge")
    with pytest.raises(ModelNotFoundError, match="num_layers"):
        models.build("gpt2", "tiny", num_layerz=3)


def test_list_models_and_presets() -> None:
    assert set(models.list_models()) == {"llama", "gpt2", "llama-stdlib"}
    for family in ("llama", "gpt2"):
        assert set(models.PRESETS[family]) >= {"tiny", "small", "base"}
        base = models.PRESETS[family]["base"]
        # Parameter count of "base" from its shapes, without allocating it.
        config = models.config_from_dict(family, base)
        assert config.vocab_size * config.hidden_size < 50_000_000


def test_build_is_deterministic_and_keeps_global_rng() -> None:
    state = torch.random.get_rng_state()
    a = models.build("llama", "tiny", seed=5)
    b = models.build("llama", "tiny", seed=5)
    c = models.build("llama", "tiny", seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (_, vb), (_, vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert not torch.equal(a.embed_tokens.weight, c.embed_tokens.weight)


@pytest.mark.parametrize("name,overrides", [("llama", {}), ("llama", {"tie_word_embeddings": False}), ("gpt2", {})])
def test_checkpoint_round_trip(tmp_path, name: str, overrides: dict) -> None:
    model = models.build(name, "tiny", seed=3, **overrides)
    models.save_checkpoint(model, tmp_path)
    loaded = models.load_checkpoint(tmp_path)
    assert loaded.family == name and loaded.config == model.config
    ids = _ids(1, 6, model.config.vocab_size)
    torch.testing.assert_close(_full(loaded, ids), _full(model, ids), atol=0, rtol=0)


def test_load_checkpoint_missing_dir_raises(tmp_path) -> None:
    from toolkit.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="config.json"):
        models.load_checkpoint(tmp_path / "nothing")


def test_llama_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    model = models.build("llama", "tiny", tie_word_embeddings=False, rope_theta=500.0)
    c = model.config
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
            max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
            rope_theta=c.rope_theta, tie_word_embeddings=False, attn_implementation="eager",
        )
    ).eval()
    rename = {"input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm", "attn": "self_attn"}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("layers."):
            parts = key.split(".")
            parts[2] = rename.get(parts[2], parts[2])
            key = "model." + ".".join(parts)
        elif key != "lm_head.weight":
            key = "model." + key
        state[key] = value
    hf.load_state_dict(state, strict=True)
    ids = _ids(2, 11, c.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    torch.testing.assert_close(_full(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_gpt2_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    model = models.build("gpt2", "tiny")
    c = model.config
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=c.vocab_size, n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads,
            n_inner=c.intermediate_size, n_positions=c.max_position_embeddings,
            layer_norm_epsilon=c.layer_norm_eps, bos_token_id=0, eos_token_id=0,
            attn_implementation="eager",
        )
    ).eval()
    state = {}
    for key, value in model.state_dict().items():
        new = "transformer." + key.replace("blocks.", "h.")
        if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            value = value.t()  # HF GPT-2 uses Conv1D with [in, out] weights
        state[new] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith("attn.bias") for k in missing)
    ids = _ids(2, 11, c.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    torch.testing.assert_close(_full(model, ids), expected, atol=1e-5, rtol=1e-5)
