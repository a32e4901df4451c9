"""Qwen2.5-VL vision tower on packed patches: patch embedding, window/full attention blocks, 2x2 patch merger."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionSpec
from ..data.positions import VisionLayout
from .attention import Segments, varlen_attention
from .layers import RMSNorm, SwiGLU, apply_rotary
from .rope import inverse_frequencies, vision_angles


class PatchEmbed(nn.Module):
    """The Conv3d with kernel = stride = (2, 14, 14) of the reference, applied as the matmul it equals."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        kernel = (spec.temporal_patch_size, spec.patch_size, spec.patch_size)
        self.proj = nn.Conv3d(spec.in_channels, spec.hidden_size, kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.flatten(1))


class VisionAttention(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.qkv = nn.Linear(spec.hidden_size, 3 * spec.hidden_size, bias=True)
        self.proj = nn.Linear(spec.hidden_size, spec.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = varlen_attention(q, k, v, segments, self.head_dim**-0.5)
        return self.proj(out.reshape(x.shape[0], -1))


class VisionBlock(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.norm1 = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = VisionAttention(spec)
        self.norm2 = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = SwiGLU(spec.hidden_size, spec.intermediate_size, bias=True)

    def forward(self, x, cos, sin, segments: Segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each 2x2 block of patches (4 consecutive rows) -> one LLM-width token through an MLP."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        width = spec.hidden_size * spec.merge_unit
        self.ln_q = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, spec.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


class VisionTower(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        self.blocks = nn.ModuleList(VisionBlock(spec) for _ in range(spec.depth))
        self.merger = PatchMerger(spec)

    def forward(self, pixel_values: torch.Tensor, layout: VisionLayout, backend: str = "sdpa") -> torch.Tensor:
        """Patch rows [P, 1176] in image order -> merged tokens [P/4, out_hidden] in image order."""
        unit = self.spec.merge_unit
        x = self.patch_embed(pixel_values)
        total = x.shape[0]
        x = x.view(total // unit, unit, -1)[layout.window_index].view(total, -1)
        inv_freq = inverse_frequencies(self.spec.head_dim // 2, self.spec.rope_theta, x.device)
        cos, sin = vision_angles(layout.position_ids, inv_freq)
        full = Segments.build(layout.cu_seqlens, layout.max_seqlen, total, backend)
        windows = Segments.build(layout.cu_window_seqlens, layout.max_window_seqlen, total, backend)
        full_blocks = set(self.spec.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in full_blocks else windows)
        return self.merger(x)[layout.reverse_index]
