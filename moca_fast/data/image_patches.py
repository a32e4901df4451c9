"""Qwen2.5-VL image preprocessing: smart-resize to 28-multiples within a pixel budget, normalise, patchify.

Produces exactly what transformers' Qwen2-VL image processor produces (PIL bicubic resize, CLIP mean/std,
patch rows of 3 * 2 * 14 * 14 values in 2 x 2 merge-block order), with tensor ops instead of per-image numpy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .images import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 256 * 28 * 28  # the reference's budget: 256..1024 LLM tokens per image
MAX_PIXELS = 1024 * 28 * 28
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """Height and width rounded to multiples of `factor`, scaled so their product lies in the pixel budget."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of a {width}x{height} image exceeds {MAX_ASPECT_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar * w_bar > max_pixels:
        raise ValueError(f"a {width}x{height} image cannot fit the pixel budget of {max_pixels} pixels")
    return h_bar, w_bar


def resized_size(
    width: int, height: int, factor: int = 28, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) an image of this size is resized to; a side under `factor` is first raised to it
    (as the reference's processor does), then smart-resize applies."""
    return smart_resize(max(height, factor), max(width, factor), factor, min_pixels, max_pixels)


def image_to_patches(
    image: Image.Image,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One RGB image -> (pixel patch rows [t*h*w, 3*tp*p*p] float32, patch grid (t, h, w))."""
    factor = patch_size * merge_size
    image = to_rgb(image)
    width, height = image.size
    h_bar, w_bar = resized_size(width, height, factor, min_pixels, max_pixels)
    if min(width, height) < factor:  # raised first, as the reference does, then smart-resized
        width, height = max(width, factor), max(height, factor)
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    if (w_bar, h_bar) != (width, height):
        image = image.resize((w_bar, h_bar), resample=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    # Same arithmetic order as transformers: rescale by 1/255, then (x - mean) / std, in float32.
    pixels = (pixels * (1 / 255) - mean) / std
    channels = pixels.shape[0]
    gh, gw = h_bar // patch_size, w_bar // patch_size
    frames = pixels.unsqueeze(0).expand(temporal_patch_size, -1, -1, -1)  # a still image fills both frames
    patches = frames.reshape(
        1,
        temporal_patch_size,
        channels,
        gh // merge_size,
        merge_size,
        patch_size,
        gw // merge_size,
        merge_size,
        patch_size,
    )
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = patches.reshape(gh * gw, channels * temporal_patch_size * patch_size * patch_size)
    return rows.contiguous(), (1, gh, gw)
