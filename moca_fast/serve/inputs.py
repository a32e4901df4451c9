"""Parsed inputs -> encoded sequences for the batcher (run in the server's thread pool, off the event loop): each
image source resolved, the token limit checked from text and image headers before any pixel is decoded, then the
embedder's own preprocessing (decode, resize, patchify, tokenise). Errors name the input.

An image is a data URL (`data:image/png;base64,...`), bare base64 data, a path under --image-root (refused without
one, and outside it), or an http(s) URL fetched only with --allow-remote-images (no server-side request forgery by
default).
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from pathlib import Path

from ..data.processor import EncodedSequence
from ..embed import EmbedInput, MocaEmbedder, encode_input
from .parsing import RequestError
from .settings import ServeSettings

FETCH_TIMEOUT_S = 10.0


def prepare(item: EmbedInput, embedder: MocaEmbedder, settings: ServeSettings) -> EncodedSequence:
    """One input resolved, checked against the token limit and encoded."""
    item = EmbedInput(item.text, tuple(resolve_image(source, item.id, settings) for source in item.images), item.id)
    try:
        cost = embedder.cost(item)
        if cost > settings.max_input_tokens:
            raise RequestError(413, f"{item.id}: {cost} tokens, over the limit of {settings.max_input_tokens} tokens "
                                    "per input", "input")
        return encode_input(embedder.processor, item)
    except ValueError as error:  # unreadable image, empty sequence, ...: the message names the input
        raise RequestError(400, str(error), "input") from None


def resolve_image(source: str, name: str, settings: ServeSettings) -> bytes | Path:
    """The bytes or the file behind one image string of a request."""
    if source.startswith("data:"):
        header, comma, data = source.partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError(400, f"{name}: a data URL must read data:<type>;base64,<data>", "input")
        decoded = _base64(data)
        if decoded is None:
            raise RequestError(400, f"{name}: the data URL's data is not valid base64", "input")
        return decoded
    if source.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise RequestError(400, f"{name}: image URLs are not fetched (the server allows them with "
                                    "--allow-remote-images)", "input")
        return fetch(source, name, settings.max_body_bytes)
    decoded = _base64(source)  # a path holds '.' or other characters base64 never has
    if decoded is not None:
        return decoded
    if settings.image_root is None:
        raise RequestError(400, f"{name}: the image is not a data URL or base64 data (paths are read only under "
                                "the server's --image-root)", "input")
    return path_under(settings.image_root, source, name)


def path_under(root: Path, source: str, name: str) -> Path:
    """`source` as a file under `root` (symbolic links followed first): nothing outside it is ever read."""
    root = root.resolve()
    path = (root / source).resolve()
    if not path.is_relative_to(root):
        raise RequestError(400, f"{name}: image path {source!r} is outside the server's --image-root", "input")
    if not path.is_file():
        raise RequestError(400, f"{name}: image file not found under the server's --image-root: {source}", "input")
    return path


def fetch(url: str, name: str, limit: int) -> bytes:
    """An image URL's bytes (at most `limit`), or a 400 naming the input."""
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise RequestError(400, f"{name}: cannot fetch {url}: {getattr(error, 'reason', error)}", "input") from None
    if len(data) > limit:
        raise RequestError(413, f"{name}: the image at {url} is over {limit} bytes", "input")
    return data


def _base64(data: str) -> bytes | None:
    try:
        return base64.b64decode(data, validate=True) or None
    except (binascii.Error, ValueError):
        return None
