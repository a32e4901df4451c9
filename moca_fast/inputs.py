"""Embedder inputs: the forms a user gives, normalised to EmbedInput, instructions (prompts) applied, and one
input's images decoded and its sequence encoded.

Inputs (`MocaEmbedder.encode` takes one, or a list of them):
  str                              text (give the instruction yourself, or use moca_fast.prompts)
  PIL image, pathlib.Path, bytes   an image alone (no instruction)
  {"text": ..., "image": ...}      text and one image (PIL, path string or Path, bytes); the image goes where the
                                   text holds IMAGE_PLACEHOLDER, else at the start, as in the reference's prompts
  [str | image, ...]               an interleaved sequence: strings are text, everything else is an image
  EmbedInput                       already normalised; its `id` names it in errors (what the harnesses use)

A prompt is an instruction template: "{}" takes the input's text, otherwise the prompt goes before it; an image
stays first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import prompts
from .data.images import load_image
from .data.processor import EncodedSequence, Processor
from .data.tokens import IMAGE_PLACEHOLDER

_IMAGE_TYPES = (Image.Image, Path, bytes, bytearray)


@dataclass(frozen=True)
class EmbedInput:
    """One input, normalised: text with IMAGE_PLACEHOLDER at each image, its images in order, a name for errors."""

    text: str
    images: tuple = ()
    id: str = "?"


def as_input(item, name: str) -> EmbedInput:
    """Normalise one user input (see the module docstring); `name` identifies it in error messages."""
    if isinstance(item, EmbedInput):
        return item
    if isinstance(item, str):
        return EmbedInput(item, (), name)
    if isinstance(item, _IMAGE_TYPES):
        return EmbedInput(IMAGE_PLACEHOLDER, (item,), name)
    if isinstance(item, Mapping):
        unknown = set(item) - {"text", "image"}
        if unknown:
            raise ValueError(f"{name}: unknown keys {sorted(unknown)}; an input dict has 'text' and/or 'image'")
        text, image = item.get("text") or "", item.get("image")
        if not isinstance(text, str):
            raise ValueError(f"{name}: 'text' must be a string, got {type(text).__name__}")
        if image is None or (isinstance(image, str) and not image):
            return EmbedInput(text, (), name)
        return EmbedInput(text if IMAGE_PLACEHOLDER in text else IMAGE_PLACEHOLDER + text, (image,), name)
    if isinstance(item, (list, tuple)):
        pieces, images = [], []
        for part in item:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, _IMAGE_TYPES):
                pieces.append(IMAGE_PLACEHOLDER)
                images.append(part)
            else:
                raise ValueError(f"{name}: an interleaved input holds strings and images, not {type(part).__name__}")
        return EmbedInput("".join(pieces), tuple(images), name)
    raise ValueError(f"{name}: unsupported input of type {type(item).__name__}")


def apply_prompt(item: EmbedInput, prompt: str) -> EmbedInput:
    """`item` with an instruction: `prompt` with the input's text at "{}", or, without "{}", before the text (the
    sentence-transformers convention). An image at the start of the input stays at the start, as in the reference's
    prompts: `apply_prompt(<image>, IMAGE_TARGET_INSTRUCTION)` is the reference's image target."""

    def fill(text: str) -> str:
        return prompt.replace("{}", text, 1) if "{}" in prompt else prompt + text

    if len(item.images) == 1 and item.text.startswith(IMAGE_PLACEHOLDER):
        rest = fill(item.text[len(IMAGE_PLACEHOLDER) :])
        # A prompt holding IMAGE_PLACEHOLDER places the image itself (ColQwen2.5's visual prompt).
        return EmbedInput(rest if IMAGE_PLACEHOLDER in prompt else IMAGE_PLACEHOLDER + rest, item.images, item.id)
    return EmbedInput(fill(item.text), item.images, item.id)


def with_instructions(
    items: list[EmbedInput],
    prompt: str | None = None,
    role: str | None = None,
    document_pages: bool = False,
    role_prompt=prompts.role_prompt,
) -> list[EmbedInput]:
    """`prompt` applied to every input; without one, each gets the instruction for its kind as a query or a document
    (`role`; `role_prompt`: the reference's, moca_fast.prompts.role_prompt, or a checkpoint's own, as
    MocaEmbedder.role_prompt), or none when `role` is None too."""
    if prompt:
        return [apply_prompt(item, prompt) for item in items]
    if role is None:
        return items
    return [
        apply_prompt(item, p) if (p := role_prompt(role, item.text, len(item.images), document_pages)) else item
        for item in items
    ]


def encode_input(processor: Processor, item: EmbedInput) -> EncodedSequence:
    """One input's images decoded and its sequence encoded: the CPU work before packing (errors name the input)."""
    return processor.encode(item.text, [load_image(image, item.id) for image in item.images], item.id)
