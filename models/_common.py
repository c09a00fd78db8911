"""Shared building blocks for the decoder models in :mod:`models`.

Implements the pieces both families need with an identical contract:

* :func:`position_ids_from_mask` -- position ids derived from a (left-padded)
  attention mask, as in Hugging Face ``generate`` for decoder-only models.
* :func:`build_attention_bias` -- the additive causal + padding mask used by
  eager attention (Vaswani et al., 2017, "Attention Is All You Need", with the
  large-finite-negative trick so fully padded rows stay NaN-free).
* :func:`eager_attention` -- scaled dot-product attention written with plain
  matmul / softmax ops so it exports with ``torch.onnx.export(dynamo=True)``.
* :func:`repeat_kv` -- key/value head sharing for grouped-query attention
  (Ainslie et al., 2023, "GQA: Training Generalized Multi-Query Transformer
  Models from Multi-Head Checkpoints").

No function here branches in Python on tensor *values*, so every one of them
traces cleanly with symbolic batch, sequence and past lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor

KVCache = list[tuple[Tensor, Tensor]]


def position_ids_from_mask(attention_mask: Tensor, seq_len: int) -> Tensor:
    """Compute position ids for the last ``seq_len`` slots of a padding mask.

    Each real token gets the count of real tokens before it; padding slots get
    0 (their value does not matter because they are masked out).

    Args:
        attention_mask: ``[B, P+S]`` integer mask, 1 for real tokens, 0 for pad.
        seq_len: ``S``, the number of tokens in the current chunk.

    Returns:
        ``[B, S]`` int64 position ids.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -seq_len:]


def build_attention_bias(attention_mask: Tensor, seq_len: int, dtype: torch.dtype) -> Tensor:
    """Build the additive causal + padding bias for eager attention.

    Query ``i`` of the current chunk sits at absolute slot ``P+i`` (``P`` being
    the past length, ``P = T - S`` with ``T = attention_mask.shape[1]``) and may
    attend to key slot ``j`` iff ``j <= P+i`` and ``attention_mask[b, j] == 1``.
    Disallowed positions get ``torch.finfo(dtype).min`` (finite, never ``-inf``)
    so a fully padded query row yields a uniform softmax instead of NaN.

    Args:
        attention_mask: ``[B, T]`` mask over past + current tokens.
        seq_len: ``S``, number of query tokens.
        dtype: floating dtype of the attention scores.

    Returns:
        ``[B, 1, S, T]`` additive bias in ``dtype``.
    """
    total = attention_mask.shape[-1]
    device = attention_mask.device
    key_pos = torch.arange(total, device=device)
    query_pos = torch.arange(seq_len, device=device) + (total - seq_len)
    causal = key_pos[None, :] <= query_pos[:, None]  # [S, T]
    allowed = causal[None, None, :, :] & (attention_mask[:, None, None, :] != 0)
    zero = torch.zeros((), dtype=dtype, device=device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed, zero, neg)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """Repeat key/value heads for grouped-query attention.

    Args:
        x: ``[B, num_kv_heads, T, head_dim]``.
        n_rep: ``num_heads // num_kv_heads``.

    Returns:
        ``[B, num_kv_heads * n_rep, T, head_dim]`` where head ``h`` uses kv head
        ``h // n_rep``.
    """
    if n_rep == 1:
        return x
    b, kv, t, d = x.shape
    return x.unsqueeze(2).expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """Scaled dot-product attention with plain ops and a float32 softmax.

    Args:
        q: ``[B, H, S, D]`` queries.
        k: ``[B, H, T, D]`` keys (already repeated for GQA).
        v: ``[B, H, T, D]`` values.
        bias: ``[B, 1, S, T]`` additive mask from :func:`build_attention_bias`.
        scale: score multiplier, normally ``head_dim ** -0.5``.

    Returns:
        ``[B, H, S, D]`` attention output in the dtype of ``q``.
    """
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores + bias
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def split_past(past_key_values: KVCache | None, layer: int) -> tuple[Tensor, Tensor] | None:
    """Return the cached ``(key, value)`` of one layer, or ``None``.

    Args:
        past_key_values: per-layer cache or ``None``.
        layer: layer index.

    Returns:
        The layer's cache entry or ``None`` if no cache was given.
    """
    if past_key_values is None:
        return None
    return past_key_values[layer]
