"""Image loading for both stages: encoded bytes, an HF `Image` dict, a path or a PIL image -> an RGB PIL image.

Every failure is a ValueError that names the sample and the problem. Unlike the reference, a truncated or
unreadable image is an error, never a silently substituted black square.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(source, sample_id: str) -> Image.Image:
    """Decode `source` (bytes, {"bytes", "path"} dict, str/Path path, or PIL image) into an RGB image."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, dict):  # the HF datasets Image feature stored without decoding
            source = source.get("bytes") if source.get("bytes") is not None else source.get("path")
        if isinstance(source, (bytes, bytearray, memoryview)):
            what, stream = "image bytes", io.BytesIO(source)
        elif isinstance(source, (str, Path)):
            if not Path(source).is_file():
                raise ValueError(f"sample {sample_id}: image file not found: {source}")
            what, stream = f"image file {source}", source
        else:
            raise ValueError(f"sample {sample_id}: unsupported image source of type {type(source).__name__}")
        try:
            image = Image.open(stream)
            image.load()
        except _DECODE_ERRORS as error:
            raise ValueError(f"sample {sample_id}: cannot decode {what}: {error}") from error
    return image if image.mode == "RGB" else image.convert("RGB")
