"""Parsed inputs -> encoded sequences for the batcher (run in the server's thread pool, off the event loop): each
image source resolved to bytes, its pixel count checked from the header before any pixel is decoded, the token
limit checked (or the input truncated) before the text is tokenised whole, then the embedder's own preprocessing
(decode, resize, patchify, tokenise). Errors name the input and never a server path.

An image string is exactly one of: a data URL (`data:image/png;base64,...`); an http(s) URL, fetched only with
--allow-remote-images and without following redirects (a redirect could reach any host); or a path under
--image-root. Nothing else is decoded as base64, so a file whose name happens to be valid base64 is read as a file.
"""

from __future__ import annotations

import base64
import binascii
import copy
import errno
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..data.images import open_image
from ..data.processor import EncodedSequence, Processor
from ..data.tokens import IMAGE_PLACEHOLDER
from ..inputs import EmbedInput, encode_input
from .parsing import RequestError
from .settings import ServeSettings

FETCH_TIMEOUT_S = 10.0
MAX_PATH_CHARS = 1024  # longer image paths are refused before the file system sees them
_OS_REASONS = {
    errno.ELOOP: "a symbolic link loop",
    errno.ENAMETOOLONG: "a name too long",
    errno.EACCES: "no permission",
}  # OSError's own text would name the server's path


@dataclass(frozen=True)
class Preparer:
    """The processors the server encodes with: `measure` counts an input's full length (no max_length), `encoder`
    cuts at the server's token limit (used only for requests that ask for truncation; an input within the limit is
    encoded identically by both)."""

    measure: Processor
    encoder: Processor
    settings: ServeSettings
    chars_per_token: int  # the longest token of the vocabulary in characters: tokens >= characters / this

    @classmethod
    def build(cls, processor: Processor, settings: ServeSettings) -> Preparer:
        limit = settings.max_input_tokens
        if processor.max_length is not None:
            limit = min(limit, processor.max_length)
        measure, encoder = copy.copy(processor), copy.copy(processor)
        measure.max_length, encoder.max_length = None, limit
        longest = max(map(len, processor.tokenizer.get_vocab()))
        return cls(measure, encoder, settings, longest)

    @property
    def max_tokens(self) -> int:
        return self.encoder.max_length

    def prepare(self, item: EmbedInput, truncate: bool) -> EncodedSequence:
        """One input resolved, checked against the limits (or cut to them) and encoded."""
        images = tuple(self.resolve_image(source, item.id) for source in item.images)
        sizes = [self.image_size(image, item.id) for image in images]
        item = EmbedInput(self._bounded_text(item, truncate), images, item.id)
        try:
            tokens = self.measure.count_tokens(item.text, sizes, item.id)
            if tokens > self.max_tokens and not truncate:
                raise RequestError(
                    413,
                    f"{item.id}: {tokens} tokens, over the limit of {self.max_tokens} tokens per "
                    'input; send "truncate": true to cut it',
                    "input",
                )
            return encode_input(self.encoder, item)
        except ValueError as error:  # unreadable image, empty sequence, ...: the message names the input
            raise RequestError(400, str(error).removeprefix("sample "), "input") from None

    def _bounded_text(self, item: EmbedInput, truncate: bool) -> str:
        """The text, refused (413) or cut before tokenising when its characters alone exceed the token limit:
        a text of more than chars_per_token x max_tokens characters holds more than max_tokens tokens."""
        bound = self.chars_per_token * (self.max_tokens + 1)
        pieces = item.text.split(IMAGE_PLACEHOLDER)
        if all(len(piece) <= bound for piece in pieces):
            return item.text
        if not truncate:
            raise RequestError(
                413,
                f"{item.id}: {len(item.text)} characters, more than the limit of "
                f'{self.max_tokens} tokens per input can hold; send "truncate": true to cut '
                "it",
                "input",
            )
        # a piece this long is cut past the limit, and so is everything after it: tokenise only a prefix of each
        return IMAGE_PLACEHOLDER.join(piece[:bound] for piece in pieces)

    def image_size(self, data: bytes, name: str) -> tuple[int, int]:
        """(width, height) from the header, refused (413) past --max-image-pixels before any pixel is decoded."""
        try:
            width, height = open_image(data, name).size
        except ValueError as error:
            raise RequestError(400, str(error).removeprefix("sample "), "input") from None
        if width * height > self.settings.max_image_pixels:
            raise RequestError(
                413,
                f"{name}: an image of {width} x {height} = {width * height} pixels, over the "
                f"server's limit of {self.settings.max_image_pixels} (--max-image-pixels)",
                "input",
            )
        return width, height

    def resolve_image(self, source: str, name: str) -> bytes:
        """The bytes behind one image string of a request."""
        settings = self.settings
        if source.startswith("data:"):
            header, comma, data = source.partition(",")
            if not comma or not header.endswith(";base64"):
                raise RequestError(400, f"{name}: a data URL must read data:<type>;base64,<data>", "input")
            try:
                return base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(400, f"{name}: the data URL's data is not valid base64", "input") from None
        if source.startswith(("http://", "https://")):
            if not settings.allow_remote_images:
                raise RequestError(
                    400,
                    f"{name}: image URLs are not fetched (the server allows them with --allow-remote-images)",
                    "input",
                )
            return fetch(source, name, settings.max_body_bytes)
        if settings.image_root is None:
            raise RequestError(
                400,
                f"{name}: the image is not a data URL (data:<type>;base64,<data>); paths are "
                "read only under the server's --image-root",
                "input",
            )
        return read_under(settings.image_root, source, name, settings.max_body_bytes)


def read_under(root: Path, source: str, name: str, limit: int) -> bytes:
    """The bytes of `source` as a file under `root` (symbolic links followed first): nothing outside it is read, and
    no error shows where the root is."""
    if len(source) > MAX_PATH_CHARS:
        raise RequestError(
            400,
            f"{name}: not an image path ({len(source)} characters, over {MAX_PATH_CHARS}); image "
            "data goes in a data URL (data:<type>;base64,<data>)",
            "input",
        )
    if "\0" in source:
        raise RequestError(400, f"{name}: not a valid image path (it holds a NUL byte)", "input")
    shown = source if len(source) <= 200 else source[:200] + "..."
    try:
        root = root.resolve()
        path = (root / source).resolve(strict=True)
        if not path.is_relative_to(root):
            raise RequestError(400, f"{name}: image path {shown!r} is outside the server's --image-root", "input")
        if not path.is_file():
            raise RequestError(400, f"{name}: image path {shown!r} is not a file", "input")
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except FileNotFoundError:
        raise RequestError(
            400, f"{name}: image file not found under the server's --image-root: {shown}", "input"
        ) from None
    except (OSError, RuntimeError) as error:  # a symlink loop, a name too long, no permission, ...
        reason = (
            "a symbolic link loop"
            if isinstance(error, RuntimeError)
            else _OS_REASONS.get(error.errno, error.strerror or type(error).__name__)
        )
        raise RequestError(400, f"{name}: image path {shown!r} cannot be read ({reason})", "input") from None
    if len(data) > limit:
        raise RequestError(413, f"{name}: the image file {shown!r} is over {limit} bytes", "input")
    return data


def fetch(url: str, name: str, limit: int) -> bytes:
    """An image URL's bytes (at most `limit`), without following redirects; a 400 naming the input otherwise."""
    try:
        with httpx.stream("GET", url, timeout=FETCH_TIMEOUT_S, follow_redirects=False) as response:
            if response.is_redirect:
                raise RequestError(
                    400,
                    f"{name}: {url} redirects (HTTP {response.status_code}); redirects are not "
                    "followed: give the final URL",
                    "input",
                )
            if response.status_code != 200:
                raise RequestError(400, f"{name}: cannot fetch {url}: HTTP {response.status_code}", "input")
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > limit:
                    raise RequestError(413, f"{name}: the image at {url} is over {limit} bytes", "input")
    except httpx.HTTPError as error:
        raise RequestError(400, f"{name}: cannot fetch {url}: {type(error).__name__}: {error}", "input") from None
    return bytes(data)
