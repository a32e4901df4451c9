"""Position bookkeeping done once on the CPU: M-RoPE ids of a sequence and the vision tower's window layout.

Nothing here runs in the model's forward: the collator calls these and the results travel in PackedBatch,
so the forward needs no host synchronisation and no per-row Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def mrope_position_ids(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor, image_token_id: int, spatial_merge_size: int = 2
) -> torch.Tensor:
    """M-RoPE (t, h, w) position ids [3, L] of one unpadded sequence.

    Text tokens advance all three axes by one. An image block of t x h' x w' merged tokens (h' = h / merge)
    starts at the running position p and takes (p + t_i, p + h_i, p + w_i); the next token then starts at
    p + max(h', w') (images have t = 1). Vectorised: one cumulative sum over per-token advances.
    """
    length = input_ids.numel()
    is_image = input_ids == image_token_id
    n_image_tokens = int(is_image.sum())
    grids = image_grid_thw.reshape(-1, 3).to(torch.long)
    merged = grids.clone()
    merged[:, 1:] //= spatial_merge_size
    per_image = merged.prod(-1)
    if int(per_image.sum()) != n_image_tokens:
        raise ValueError(
            f"{n_image_tokens} image tokens in the sequence but the image grids account for {int(per_image.sum())}"
        )
    # Each token's advance of the running position: 1 for text; for an image block, 0 everywhere but
    # its last token, which carries the whole block's advance max(h', w').
    advance = torch.ones(length, dtype=torch.long)
    advance[is_image] = 0
    image_pos = torch.nonzero(is_image).flatten()
    block_ends = image_pos[per_image.cumsum(0) - 1] if len(per_image) else image_pos[:0]
    advance[block_ends] = torch.maximum(merged[:, 1], merged[:, 2])
    start = torch.cumsum(advance, 0) - advance  # running position before each token
    positions = start.expand(3, length).clone()
    if n_image_tokens:
        # Within-image offsets, images concatenated in order: (t_i, h_i, w_i) of a row-major t x h' x w' grid.
        image_ids = torch.repeat_interleave(torch.arange(len(per_image)), per_image)
        first = torch.cumsum(per_image, 0) - per_image
        local = torch.arange(n_image_tokens) - first[image_ids]
        hw = merged[image_ids, 1] * merged[image_ids, 2]
        w = merged[image_ids, 2]
        offsets = torch.stack([local // hw, (local % hw) // w, local % w])
        # An image block's start is the running position at its first token.
        block_start = start[image_pos[first]][image_ids]
        positions[:, is_image] = block_start + offsets
    return positions


@dataclass(frozen=True)
class VisionLayout:
    """How the vision tower walks the patches of a batch of images.

    `window_index` [P/4] orders merged units window by window; `reverse_index` undoes it; `position_ids`
    [P, 2] are the (h, w) rotary coordinates of each patch in window order; `cu_window_seqlens` and
    `cu_seqlens` bound the windows and the images (in patches) for varlen attention.
    """

    window_index: torch.Tensor
    reverse_index: torch.Tensor
    position_ids: torch.Tensor
    cu_window_seqlens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_window_seqlen: int
    max_seqlen: int


def vision_layout(
    image_grid_thw: torch.Tensor, spatial_merge_size: int = 2, window_size: int = 112, patch_size: int = 14
) -> VisionLayout:
    """Window order, rotary coordinates and varlen bounds for images with patch grids [I, 3] (t, h, w)."""
    merge = spatial_merge_size
    unit = merge * merge
    window = window_size // merge // patch_size  # merged tokens per window side (4 for Qwen2.5-VL)
    window_index, window_lens, pos_ids = [], [], []
    offset = 0
    for t, h, w in image_grid_thw.reshape(-1, 3).tolist():
        if h % merge or w % merge:
            raise ValueError(f"image grid {(t, h, w)} is not divisible by the merge size {merge}")
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        nh, nw = -(-gh // window), -(-gw // window)
        padded = torch.full((t, nh * window, nw * window), -1, dtype=torch.long)
        padded[:, :gh, :gw] = idx
        padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
        lens = (padded >= 0).sum(-1).flatten()
        flat = padded.flatten()
        window_index.append(flat[flat >= 0] + offset)
        window_lens.append(lens[lens > 0] * unit)
        offset += t * gh * gw
        # (h, w) coordinates of each patch in merge-block order (the order pixel_values rows come in).
        hpos = torch.arange(h).unsqueeze(1).expand(h, w)
        wpos = torch.arange(w).unsqueeze(0).expand(h, w)
        blocks = [p.reshape(gh, merge, gw, merge).permute(0, 2, 1, 3).flatten() for p in (hpos, wpos)]
        pos_ids.append(torch.stack(blocks, dim=-1).repeat(t, 1))
    grids = image_grid_thw.reshape(-1, 3).to(torch.long)
    if len(window_index):
        window_index_t = torch.cat(window_index)
        window_lens_t = torch.cat(window_lens)
        pos = torch.cat(pos_ids)
    else:
        window_index_t = torch.zeros(0, dtype=torch.long)
        window_lens_t = torch.zeros(0, dtype=torch.long)
        pos = torch.zeros(0, 2, dtype=torch.long)
    # Rotary coordinates follow the patches into window order (groups of `unit` patches move together).
    pos = pos.reshape(-1, unit, 2)[window_index_t].reshape(-1, 2)
    image_lens = torch.repeat_interleave(grids[:, 1] * grids[:, 2], grids[:, 0])
    return VisionLayout(
        window_index=window_index_t,
        reverse_index=torch.argsort(window_index_t),
        position_ids=pos,
        cu_window_seqlens=_cumulative(window_lens_t),
        cu_seqlens=_cumulative(image_lens),
        max_window_seqlen=int(window_lens_t.max()) if len(window_lens_t) else 0,
        max_seqlen=int(image_lens.max()) if len(image_lens) else 0,
    )


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
