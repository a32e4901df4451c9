"""Rotary angles: M-RoPE for the text decoder (t/h/w sections) and axial 2-D rope for the vision tower."""

from __future__ import annotations

import torch


def inverse_frequencies(dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2, in fp32 (computed per forward: dim/2 values, no buffer to keep)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def mrope_angles(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] from position ids [3, T]: frequency block j of each half takes axis j % 3."""
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [3, T, D/2]
    axis = torch.repeat_interleave(
        torch.arange(3, device=freqs.device),
        torch.tensor(mrope_section, device=freqs.device),
        output_size=freqs.shape[-1],
    )
    freqs = freqs.gather(0, axis.expand(1, freqs.shape[1], -1)).squeeze(0)  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def vision_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [P, head_dim] from patch (h, w) coordinates [P, 2]: [h-freqs, w-freqs] repeated twice."""
    freqs = (position_ids.float().unsqueeze(-1) * inv_freq).flatten(1)  # [P, 2 * D/4]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
