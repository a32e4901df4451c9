"""Image loading for both stages: encoded bytes, an HF `Image` dict, a path or a PIL image -> an RGB PIL image.

Every failure is a ValueError that names the sample and the problem. Unlike the reference, a truncated or
unreadable image is an error, never a silently substituted black square. Transparency is composited onto white,
as transformers does.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(source, sample_id: str) -> Image.Image:
    """Decode `source` (bytes, {"bytes", "path"} dict, str/Path path, or PIL image) into an RGB image."""
    image = open_image(source, sample_id)
    if not isinstance(source, Image.Image):
        try:
            image.load()
        except _DECODE_ERRORS as error:
            raise ValueError(f"sample {sample_id}: cannot decode {_describe(source)}: {error}") from error
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' Qwen image processor makes it (`convert_to_rgb`): any other mode is composited onto
    a white background through its alpha (transparent pixels become white, not black)."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba).convert("RGB")


def image_size(source, sample_id: str) -> tuple[int, int]:
    """(width, height) of an image from its header alone: no pixel is decoded (for packing by cost)."""
    return open_image(source, sample_id).size


def open_image(source, sample_id: str) -> Image.Image:
    """Open `source` lazily (header read, pixels not yet decoded); errors name the sample."""
    if isinstance(source, Image.Image):
        return source
    source = _unwrap(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise ValueError(f"sample {sample_id}: image file not found: {source}")
        stream = source
    else:
        raise ValueError(f"sample {sample_id}: unsupported image source of type {type(source).__name__}")
    try:
        return Image.open(stream)
    except UnidentifiedImageError:  # its own message shows the stream object (<_io.BytesIO object at 0x...>)
        raise ValueError(
            f"sample {sample_id}: cannot decode {_describe(source)}: not an image format Pillow reads"
        ) from None
    except _DECODE_ERRORS as error:
        raise ValueError(f"sample {sample_id}: cannot decode {_describe(source)}: {error}") from error


def _unwrap(source):
    """The bytes or path inside an HF datasets Image dict ({"bytes", "path"}); anything else as it is."""
    if isinstance(source, dict):
        return source.get("bytes") if source.get("bytes") is not None else source.get("path")
    return source


def _describe(source) -> str:
    source = _unwrap(source)
    return f"image file {source}" if isinstance(source, (str, Path)) else "image bytes"
