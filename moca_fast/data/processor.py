"""Processor: text with image placeholders + PIL images -> token ids, pixel patches, grids and M-RoPE positions.

One call encodes one sequence; the collator (data/batch.py) packs many. The text carries the placeholder
triple `<|vision_start|><|image_pad|><|vision_end|>` at each image; the pad is expanded to one token per
merged 2 x 2 patch block. Positions are computed here, on the CPU, never in the model's forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from PIL import Image

from .image_patches import MAX_PIXELS, MIN_PIXELS, image_to_patches
from .positions import mrope_position_ids
from .tokens import IMAGE_PAD_TOKEN, IMAGE_PLACEHOLDER, VISION_END_TOKEN, VISION_START_TOKEN

log = logging.getLogger(__name__)


@dataclass
class EncodedSequence:
    """One sequence ready for packing: ids [L], positions [3, L], patch rows [P, 1176], grids [I, 3]."""

    sample_id: str
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    dropped_images: int = 0  # images cut part-way by max_length and removed with their pixels

    def __len__(self) -> int:
        return self.input_ids.numel()


class Processor:
    """Tokenizer + Qwen2.5-VL image preprocessing with the reference's pixel budget (256..1024 tokens/image)."""

    def __init__(self, tokenizer, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                 max_length: int | None = None, patch_size: int = 14, spatial_merge_size: int = 2,
                 temporal_patch_size: int = 2):
        self.tokenizer = tokenizer
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.max_length = max_length
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.temporal_patch_size = temporal_patch_size
        ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_PAD_TOKEN)}
        missing = [tok for tok, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.vision_start_id = ids[VISION_START_TOKEN]
        self.vision_end_id = ids[VISION_END_TOKEN]
        self.image_token_id = ids[IMAGE_PAD_TOKEN]

    def encode(self, text: str, images: list[Image.Image] | tuple = (), sample_id: str = "?") -> EncodedSequence:
        """Encode one sequence; every error names `sample_id` and the problem."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"sample {sample_id}: {len(pieces) - 1} image placeholders in the text "
                             f"but {len(images)} images")
        patches, grids, ids = [], [], []
        for i, piece in enumerate(pieces):
            ids.append(self._tokenize(piece))
            if i == len(images):
                break
            image = images[i]
            if not isinstance(image, Image.Image):
                raise ValueError(f"sample {sample_id}: image {i} is a {type(image).__name__}, not a PIL image")
            try:
                rows, grid = image_to_patches(image, patch_size=self.patch_size, merge_size=self.spatial_merge_size,
                                              temporal_patch_size=self.temporal_patch_size,
                                              min_pixels=self.min_pixels, max_pixels=self.max_pixels)
            except ValueError as err:
                raise ValueError(f"sample {sample_id}: image {i}: {err}") from err
            n_tokens = grid[0] * grid[1] * grid[2] // self.spatial_merge_size**2
            ids.append(torch.tensor([self.vision_start_id] + [self.image_token_id] * n_tokens + [self.vision_end_id]))
            patches.append(rows)
            grids.append(grid)
        input_ids = torch.cat(ids).to(torch.long)
        if input_ids.numel() == 0:
            raise ValueError(f"sample {sample_id}: empty sequence (no tokens and no images)")
        dropped = 0
        if self.max_length is not None and input_ids.numel() > self.max_length:
            input_ids, kept = self._truncate(input_ids, grids)
            dropped = len(grids) - kept
            if dropped:
                log.info("sample %s: %d image(s) cut by max_length=%d dropped with their pixels",
                         sample_id, dropped, self.max_length)
            patches, grids = patches[:kept], grids[:kept]
        grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
        pixel_values = torch.cat(patches) if patches else torch.zeros(0, self._patch_dim)
        positions = mrope_position_ids(input_ids, grid_thw, self.image_token_id, self.spatial_merge_size)
        return EncodedSequence(sample_id, input_ids, positions, pixel_values, grid_thw, dropped)

    @property
    def _patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def _tokenize(self, piece: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(piece, add_special_tokens=False).input_ids, dtype=torch.long)

    def _truncate(self, input_ids: torch.Tensor, grids: list) -> tuple[torch.Tensor, int]:
        """Cut to max_length; an image whose block would be cut is removed from its vision-start token on."""
        cut = self.max_length
        starts = torch.nonzero(input_ids == self.vision_start_id).flatten().tolist()
        kept = len(grids)
        for i, start in enumerate(starts):
            block_end = start + 2 + grids[i][0] * grids[i][1] * grids[i][2] // self.spatial_merge_size**2
            if block_end > cut:
                cut, kept = min(cut, start), i
                break
        return input_ids[:cut], kept
