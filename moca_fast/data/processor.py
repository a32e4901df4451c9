"""Processor: text with image placeholders + PIL images -> token ids, pixel patches, grids and M-RoPE positions.

One call encodes one sequence; the collator (data/batch.py) packs many. The text carries the placeholder
triple `<|vision_start|><|image_pad|><|vision_end|>` at each image; the pad is expanded to one token per
merged 2 x 2 patch block. Positions are computed here, on the CPU, never in the model's forward.
`count_tokens` gives the exact encoded length from image sizes alone, for packing without decoding pixels.
`save_pretrained` writes the tokenizer and a transformers `preprocessor_config.json` beside a checkpoint, so the
settings it was trained with (pixel budget, max length) travel with it and `AutoProcessor` loads it;
`saved_settings` reads them back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .image_patches import CLIP_MEAN, CLIP_STD, MAX_PIXELS, MIN_PIXELS, image_to_patches, resized_size
from .positions import mrope_position_ids
from .tokens import IMAGE_PAD_TOKEN, IMAGE_PLACEHOLDER, MASK_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN

log = logging.getLogger(__name__)

# The memo of tokenised pieces: at most this many, each at most this long (a query, a caption, a prompt).
_RECENT_PIECES, _RECENT_PIECE_CHARS = 4096, 2048

SAVED_BY = "moca_fast"  # marks the preprocessor_config.json whose settings a checkpoint was trained with


@dataclass
class EncodedSequence:
    """One sequence ready for packing: ids [L], positions [3, L], patch rows [P, 1176], grids [I, 3]."""

    sample_id: str
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    dropped_images: int = 0  # images cut part-way by max_length and removed with their pixels
    # Stage 1 (data/masking.py): masked text rows and their original ids; masked image-token rows and
    # their original patch rows [4K, 1176].
    mlm_positions: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None
    mae_positions: torch.Tensor | None = None
    mae_targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.numel()


@dataclass(frozen=True)
class SequenceSize:
    """An encoded sequence's size: all its tokens, the image tokens among them, and its images."""

    tokens: int
    image_tokens: int
    images: int


class Processor:
    """Tokenizer + Qwen2.5-VL image preprocessing with the reference's pixel budget (256..1024 tokens/image)."""

    def __init__(
        self,
        tokenizer,
        *,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
        max_length: int | None = None,
        patch_size: int = 14,
        spatial_merge_size: int = 2,
        temporal_patch_size: int = 2,
    ):
        self.tokenizer = tokenizer
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.max_length = max_length
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.temporal_patch_size = temporal_patch_size
        ids = {
            tok: tokenizer.convert_tokens_to_ids(tok) for tok in (VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_PAD_TOKEN)
        }
        missing = [tok for tok, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.vision_start_id = ids[VISION_START_TOKEN]
        self.vision_end_id = ids[VISION_END_TOKEN]
        self.image_token_id = ids[IMAGE_PAD_TOKEN]
        mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
        self.mask_token_id = None if mask_id in (None, tokenizer.unk_token_id) else mask_id
        # Never MLM-masked: every special token, the image tokens and the mask itself.
        self.special_ids = torch.tensor(
            sorted(
                set(tokenizer.all_special_ids)
                | set(ids.values())
                | ({mask_id} if self.mask_token_id is not None else set())
            )
        )
        self._recent_ids: dict[str, torch.Tensor] = {}  # short pieces tokenised lately: see _token_ids
        self._recent_lock = threading.Lock()  # the server prepares requests in several threads

    def __getstate__(self) -> dict:  # to a DataLoader worker or a copy: without the lock and the memo
        return {**self.__dict__, "_recent_ids": {}, "_recent_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _recent_lock=threading.Lock())

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The tokenizer (`model_max_length` = max_length when set) and the image processor's settings as
        transformers' Qwen2-VL image processor reads them."""
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        if self.max_length is not None:
            config = json.loads((path / "tokenizer_config.json").read_text())
            (path / "tokenizer_config.json").write_text(
                json.dumps({**config, "model_max_length": self.max_length}, indent=2)
            )
        # The PIL backend: it needs no torchvision and writes image_processor_type "Qwen2VLImageProcessor", which
        # AutoImageProcessor loads with whichever backend is installed.
        from transformers import Qwen2VLImageProcessorPil

        image = Qwen2VLImageProcessorPil(
            size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
            patch_size=self.patch_size,
            temporal_patch_size=self.temporal_patch_size,
            merge_size=self.spatial_merge_size,
        )
        image.min_pixels, image.max_pixels = self.min_pixels, self.max_pixels  # the keys of transformers 4.x
        image.saved_by = SAVED_BY
        image.save_pretrained(path)

    def encode(self, text: str, images: list[Image.Image] | tuple = (), sample_id: str = "?") -> EncodedSequence:
        """Encode one sequence; every error names `sample_id` and the problem."""
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"sample {sample_id}: image {i} is a {type(image).__name__}, not a PIL image")
        pieces, image_tokens = self._layout(text, [im.size for im in images], sample_id)
        kept = self._images_kept(pieces, image_tokens)
        patches, grids, ids = [], [], [pieces[0]]
        for i in range(kept):
            try:
                rows, grid = image_to_patches(
                    images[i],
                    patch_size=self.patch_size,
                    merge_size=self.spatial_merge_size,
                    temporal_patch_size=self.temporal_patch_size,
                    min_pixels=self.min_pixels,
                    max_pixels=self.max_pixels,
                )
            except ValueError as err:
                raise ValueError(f"sample {sample_id}: image {i}: {err}") from err
            ids += [self._image_block(image_tokens[i]), pieces[i + 1]]
            patches.append(rows)
            grids.append(grid)
        input_ids = torch.cat(ids)
        if self.max_length is not None:
            input_ids = input_ids[: self.max_length]
        dropped = len(images) - kept
        if dropped:
            log.info(
                "sample %s: %d image(s) cut by max_length=%d dropped with their pixels",
                sample_id,
                dropped,
                self.max_length,
            )
        grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
        pixel_values = torch.cat(patches) if patches else torch.zeros(0, self._patch_dim)
        try:
            positions = mrope_position_ids(input_ids, grid_thw, self.image_token_id, self.spatial_merge_size)
        except ValueError as error:
            raise ValueError(f"sample {sample_id}: {error}") from None
        return EncodedSequence(sample_id, input_ids, positions, pixel_values, grid_thw, dropped)

    def count_tokens(self, text: str, image_sizes: list[tuple[int, int]], sample_id: str = "?") -> int:
        """The length `encode` will produce, from image (width, height) sizes alone: no pixel is decoded."""
        return self.measure(text, image_sizes, sample_id).tokens

    def measure(self, text: str, image_sizes: list[tuple[int, int]], sample_id: str = "?") -> SequenceSize:
        """What `encode` will produce, from image (width, height) sizes alone: its length, image tokens and images."""
        pieces, image_tokens = self._layout(text, image_sizes, sample_id)
        kept = self._images_kept(pieces, image_tokens)
        length = len(pieces[0]) + sum(2 + image_tokens[i] + len(pieces[i + 1]) for i in range(kept))
        length = length if self.max_length is None else min(length, self.max_length)
        return SequenceSize(length, sum(image_tokens[:kept]), kept)

    @property
    def _patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def _layout(self, text: str, image_sizes: list[tuple[int, int]], sample_id: str):
        """Token ids of the text pieces between images, and each image's number of LLM tokens."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(image_sizes):
            raise ValueError(
                f"sample {sample_id}: {len(pieces) - 1} image placeholders in the text but {len(image_sizes)} images"
            )
        factor = self.patch_size * self.spatial_merge_size
        image_tokens = []
        for i, (width, height) in enumerate(image_sizes):
            try:
                h_bar, w_bar = resized_size(width, height, factor, self.min_pixels, self.max_pixels)
            except ValueError as err:
                raise ValueError(f"sample {sample_id}: image {i}: {err}") from err
            image_tokens.append(h_bar * w_bar // factor**2)
        ids = self._token_ids(pieces)
        if any((piece == self.image_token_id).any() for piece in ids):
            raise ValueError(
                f"sample {sample_id}: the text holds a bare {IMAGE_PAD_TOKEN} outside an image "
                f"placeholder ({IMAGE_PLACEHOLDER!r} marks an image); remove it or give its image"
            )
        if sum(map(len, ids)) + sum(image_tokens) == 0:
            raise ValueError(f"sample {sample_id}: empty sequence (no tokens and no images)")
        return ids, image_tokens

    def _token_ids(self, pieces: list[str]) -> list[torch.Tensor]:
        """Token ids of text pieces, no special tokens added: one call of the tokenizer for all new pieces (its
        per-call overhead is most of the cost of a short query; the call, not its backend directly, so that no
        padding or truncation state a caller left in the backend applies). A batch is measured (for packing) before
        it is encoded, so short pieces seen lately are kept: the second tokenisation of a query is a lookup."""
        with self._recent_lock:
            known = {p: self._recent_ids[p] for p in pieces if p in self._recent_ids}
        new = list(dict.fromkeys(p for p in pieces if p not in known))
        encoded = self.tokenizer(new, add_special_tokens=False).input_ids if new else []
        fresh = {p: torch.tensor(e, dtype=torch.long) for p, e in zip(new, encoded)}
        with self._recent_lock:
            for piece, tensor in fresh.items():
                if len(piece) <= _RECENT_PIECE_CHARS:
                    if len(self._recent_ids) >= _RECENT_PIECES:
                        del self._recent_ids[next(iter(self._recent_ids))]  # the oldest
                    self._recent_ids[piece] = tensor
        return [known[p] if p in known else fresh[p] for p in pieces]

    def _images_kept(self, pieces: list[torch.Tensor], image_tokens: list[int]) -> int:
        """How many leading images fit whole within max_length (the reference drops a cut image)."""
        if self.max_length is None:
            return len(image_tokens)
        end = len(pieces[0])
        for i, n in enumerate(image_tokens):
            if end + n + 2 > self.max_length:
                return i
            end += n + 2 + len(pieces[i + 1])
        return len(image_tokens)

    def _image_block(self, n_tokens: int) -> torch.Tensor:
        return torch.tensor([self.vision_start_id] + [self.image_token_id] * n_tokens + [self.vision_end_id])


def saved_settings(path: str | os.PathLike) -> dict:
    """The processor settings a checkpoint directory carries (`Processor.save_pretrained`): min_pixels, max_pixels
    and max_length where saved; {} without moca_fast's preprocessor_config.json (e.g. the published MoCa
    checkpoints, which embed with the reference's budget, whatever image processor files sit beside them)."""
    path = Path(path)
    if not (path / "preprocessor_config.json").is_file():
        return {}
    image = json.loads((path / "preprocessor_config.json").read_text())
    if image.get("saved_by") != SAVED_BY:
        return {}
    size = image.get("size") or {}
    settings = {
        "min_pixels": size.get("shortest_edge", image.get("min_pixels")),
        "max_pixels": size.get("longest_edge", image.get("max_pixels")),
    }
    if (path / "tokenizer_config.json").is_file():
        length = json.loads((path / "tokenizer_config.json").read_text()).get("model_max_length")
        settings["max_length"] = length if isinstance(length, int) and length < 10**9 else None  # unset: ~1e30
    return {key: value for key, value in settings.items() if value is not None}
