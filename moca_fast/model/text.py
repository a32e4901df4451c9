"""Qwen2.5-VL text decoder run bidirectionally on packed tokens, with M-RoPE and grouped-query attention."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextSpec
from .attention import Segments, varlen_attention
from .layers import RMSNorm, SwiGLU, apply_rotary
from .rope import inverse_frequencies, mrope_angles


def text_rotary(spec: TextSpec, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE cos, sin [T, head_dim] of the decoder for position ids [3, T]."""
    inv_freq = inverse_frequencies(spec.head_dim, spec.rope_theta, position_ids.device)
    return mrope_angles(position_ids, inv_freq, spec.mrope_section)


class SelfAttention(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * spec.head_dim, bias=True)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=True)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=True)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: Segments,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output for every row of x, or only for the rows `query_index` (keys/values: all rows)."""
        xq, qcos, qsin = (x, cos, sin) if query_index is None else (x[query_index], cos[query_index], sin[query_index])
        q = apply_rotary(self.q_proj(xq).view(xq.shape[0], self.num_heads, self.head_dim), qcos, qsin)
        k = apply_rotary(self.k_proj(x).view(x.shape[0], self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(x.shape[0], self.num_kv_heads, self.head_dim)
        out = varlen_attention(q, k, v, segments, self.head_dim**-0.5)
        return self.o_proj(out.flatten(1))


class DecoderLayer(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = SelfAttention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = SwiGLU(spec.hidden_size, spec.intermediate_size, bias=False)

    def forward(self, x, cos, sin, segments: Segments, query_index: torch.Tensor | None = None):
        """x [T, H] -> [T, H]; with `query_index` [K], only those rows come out ([K, H]), attending to all."""
        residual = x if query_index is None else x[query_index]
        h = residual + self.self_attn(self.input_layernorm(x), cos, sin, segments, query_index)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextDecoder(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, segments: Segments) -> torch.Tensor:
        """Embeddings [T, H] of packed sequences -> final-norm hidden states [T, H]."""
        cos, sin = text_rotary(self.spec, position_ids)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, segments)
        return self.norm(x)
