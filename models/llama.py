"""A Llama-style decoder-only transformer written from scratch in PyTorch.

Implements the architecture of Touvron et al., 2023, "LLaMA: Open and Efficient
Foundation Language Models" (and Llama 2's grouped-query attention):

* RMSNorm pre-normalisation (Zhang & Sennrich, 2019, "Root Mean Square Layer
  Normalization"),
* rotary position embeddings in the rotate-half form (Su et al., 2021,
  "RoFormer: Enhanced Transformer with Rotary Position Embedding"),
* grouped-query attention (Ainslie et al., 2023),
* SwiGLU feed-forward (Shazeer, 2020, "GLU Variants Improve Transformer"),
* an LM head tied to the token embedding or a separate projection.

The forward contract is shared with :mod:`models.gpt2` and is relied upon by the
ONNX export and parity code; see :meth:`LlamaForCausalLM.forward`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models._common import KVCache, build_attention_bias, eager_attention, repeat_kv, split_past


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of :class:`LlamaForCausalLM`.

    Attributes:
        vocab_size: number of token ids.
        hidden_size: model width.
        num_layers: number of decoder blocks.
        num_heads: number of query heads.
        num_kv_heads: number of key/value heads (divides ``num_heads``).
        intermediate_size: SwiGLU hidden width.
        max_position_embeddings: longest supported position (informational for
            RoPE; used by callers to bound inputs).
        rope_theta: RoPE base frequency.
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: share the LM head with the token embedding.
    """

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 176
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        """Validate head counts and widths.

        Raises:
            ValueError: if the sizes are inconsistent.
        """
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned per-channel gain."""

    def __init__(self, dim: int, eps: float) -> None:
        """Create the norm.

        Args:
            dim: normalised (last) dimension.
            eps: added to the mean square before the reciprocal square root.
        """
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` over its last dimension (computed in float32)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables computed on the fly from position ids."""

    def __init__(self, head_dim: int, theta: float) -> None:
        """Create the inverse-frequency buffer.

        Args:
            head_dim: per-head width (even).
            theta: RoPE base.
        """
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Return ``cos`` and ``sin`` tables of shape ``[B, 1, S, head_dim]``.

        Args:
            position_ids: ``[B, S]`` absolute positions.
            dtype: dtype of the returned tables.
        """
        freqs = position_ids.float()[:, :, None] * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """Map ``[x1, x2]`` to ``[-x2, x1]`` over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (``[B, H, S, D]``) by the RoPE angles."""
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE and a key/value cache."""

    def __init__(self, config: LlamaConfig) -> None:
        """Create the projections.

        Args:
            config: model configuration.
        """
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.n_rep = config.num_heads // config.num_kv_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        bias: Tensor,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend over past + current tokens.

        Args:
            x: ``[B, S, hidden]``.
            cos: RoPE cosine table ``[B, 1, S, D]``.
            sin: RoPE sine table ``[B, 1, S, D]``.
            bias: additive mask ``[B, 1, S, P+S]``.
            past: cached ``(key, value)`` each ``[B, kv, P, D]`` or ``None``.

        Returns:
            Output ``[B, S, hidden]`` and the updated ``(key, value)`` cache.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0].to(k.dtype), k), dim=2)
            v = torch.cat((past[1].to(v.dtype), v), dim=2)
        out = eager_attention(q, repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep), bias, self.scale)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out), (k, v)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        """Create the three projections.

        Args:
            config: model configuration.
        """
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the feed-forward block to ``[B, S, hidden]``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """One pre-norm decoder block: attention then SwiGLU, each residual."""

    def __init__(self, config: LlamaConfig) -> None:
        """Create the sub-layers.

        Args:
            config: model configuration.
        """
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = LlamaAttention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run the block; see :meth:`LlamaAttention.forward` for arguments."""
        attn_out, present = self.attn(self.input_norm(x), cos, sin, bias, past)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x))
        return x, present


class LlamaForCausalLM(nn.Module):
    """Llama-style causal language model with a key/value cache."""

    family = "llama"

    def __init__(self, config: LlamaConfig) -> None:
        """Create the model (weights follow PyTorch defaults until :meth:`init_weights`).

        Args:
            config: model configuration.
        """
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def init_weights(self, std: float = 0.02) -> None:
        """Initialise weights: normal(0, std) matrices, residual outputs scaled by depth.

        Args:
            std: standard deviation of the normal initialiser.
        """
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def output_weight(self) -> Tensor:
        """Return the ``[vocab, hidden]`` LM-head matrix (tied or separate)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        past_key_values: KVCache | None = None,
    ) -> tuple[Tensor, KVCache]:
        """Run the decoder on one chunk of tokens.

        Args:
            input_ids: ``[B, S]`` token ids.
            attention_mask: ``[B, P+S]`` 1 for real tokens, 0 for padding,
                covering the cached past and the current chunk.
            position_ids: ``[B, S]`` positions for RoPE (see
                :func:`models.position_ids_from_mask`).
            past_key_values: ``None`` or, per layer, ``(key, value)`` each
                ``[B, num_kv_heads, P, head_dim]`` (``P`` may be 0).

        Returns:
            ``(logits, presents)``: ``logits`` is ``[B, S, vocab]`` float32 and
            ``presents[i]`` is ``(key, value)`` each
            ``[B, num_kv_heads, P+S, head_dim]``.
        """
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        bias = build_attention_bias(attention_mask, input_ids.shape[1], x.dtype)
        presents: KVCache = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, cos, sin, bias, split_past(past_key_values, i))
            presents.append(present)
        x = self.norm(x)
        logits = F.linear(x, self.output_weight())
        return logits.float(), presents
