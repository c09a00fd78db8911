"""A GPT-2-style decoder-only transformer written from scratch in PyTorch.

Implements the architecture of Radford et al., 2019, "Language Models are
Unsupervised Multitask Learners": pre-LayerNorm blocks, learned absolute
position embeddings, multi-head attention, a GELU (tanh approximation) MLP and
an LM head tied to the token embedding.

The forward contract is shared with :mod:`models.llama` and is relied upon by
the ONNX export and parity code; see :meth:`GPT2ForCausalLM.forward`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models._common import KVCache, build_attention_bias, eager_attention, split_past


@dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters of :class:`GPT2ForCausalLM`.

    Attributes:
        vocab_size: number of token ids.
        hidden_size: model width.
        num_layers: number of decoder blocks.
        num_heads: number of attention heads.
        num_kv_heads: must equal ``num_heads`` (plain multi-head attention);
            ``None`` means "same as num_heads".
        intermediate_size: MLP hidden width (4 * hidden in GPT-2).
        max_position_embeddings: size of the learned position table.
        layer_norm_eps: LayerNorm epsilon.
    """

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 256
    max_position_embeddings: int = 128
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        """Fill ``num_kv_heads`` and validate sizes.

        Raises:
            ValueError: if the sizes are inconsistent.
        """
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"GPT-2 needs num_kv_heads == num_heads, got {self.num_kv_heads} != {self.num_heads}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def tie_word_embeddings(self) -> bool:
        """GPT-2 always ties the LM head to the token embedding."""
        return True

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


class GPT2Attention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection and cache."""

    def __init__(self, config: GPT2Config) -> None:
        """Create the projections.

        Args:
            config: model configuration.
        """
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, x: Tensor, bias: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend over past + current tokens.

        Args:
            x: ``[B, S, hidden]``.
            bias: additive mask ``[B, 1, S, P+S]``.
            past: cached ``(key, value)`` each ``[B, H, P, D]`` or ``None``.

        Returns:
            Output ``[B, S, hidden]`` and the updated ``(key, value)`` cache.
        """
        b, s, h = x.shape
        q, k, v = self.c_attn(x).split(h, dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        if past is not None:
            k = torch.cat((past[0].to(k.dtype), k), dim=2)
            v = torch.cat((past[1].to(v.dtype), v), dim=2)
        out = eager_attention(q, k, v, bias, self.scale)
        out = out.transpose(1, 2).reshape(b, s, h)
        return self.c_proj(out), (k, v)



class GPT2MLP(nn.Module):
    """Feed-forward block ``c_proj(gelu_tanh(c_fc(x)))``."""

    def __init__(self, config: GPT2Config) -> None:
        """Create the projections.

        Args:
            config: model configuration.
        """
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to ``[B, S, hidden]``."""
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    """One pre-LayerNorm GPT-2 block."""

    def __init__(self, config: GPT2Config) -> None:
        """Create the sub-layers.

        Args:
            config: model configuration.
        """
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(
        self, x: Tensor, bias: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run the block; see :meth:`GPT2Attention.forward` for arguments."""
        attn_out, present = self.attn(self.ln_1(x), bias, past)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT2ForCausalLM(nn.Module):
    """GPT-2-style causal language model with a key/value cache."""

    family = "gpt2"

    def __init__(self, config: GPT2Config) -> None:
        """Create the model (call :meth:`init_weights` for GPT-2 initialisation).

        Args:
            config: model configuration.
        """
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(GPT2Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 initialisation: normal(0, std), residual projections scaled by depth.

        Args:
            std: standard deviation of the normal initialiser.
        """
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.startswith("ln") or ".ln_" in name:
                if name.endswith("weight"):
                    nn.init.ones_(p)
                else:
                    nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def output_weight(self) -> Tensor:
        """Return the ``[vocab, hidden]`` LM-head matrix (tied to ``wte``)."""
        return self.wte.weight

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
            position_ids: ``[B, S]`` indices into the learned position table
                (see :func:`models.position_ids_from_mask`).
            past_key_values: ``None`` or, per layer, ``(key, value)`` each
                ``[B, num_heads, P, head_dim]`` (``P`` may be 0).

        Returns:
            ``(logits, presents)``: ``logits`` is ``[B, S, vocab]`` float32 and
            ``presents[i]`` is ``(key, value)`` each
            ``[B, num_heads, P+S, head_dim]``.
        """
        x = self.wte(input_ids) + self.wpe(position_ids)
        bias = build_attention_bias(attention_mask, input_ids.shape[1], x.dtype)
        presents: KVCache = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, bias, split_past(past_key_values, i))
            presents.append(present)
        x = self.ln_f(x)
        logits = F.linear(x, self.output_weight())
        return logits.float(), presents
