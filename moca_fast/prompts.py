"""The reference's instruction prompts (REFERENCE.md, exact strings), and helpers that build embedder inputs.

The image sits at the start of every prompt that has one; the instruction text follows it. Each `*_INSTRUCTION`
is the text after the image, with `{}` where the question or caption goes. ViDoRe queries and plain text
targets carry no instruction: pass them as bare strings. The helpers return inputs for `MocaEmbedder.encode`:
a string (text only) or a {"text", "image"} dict whose text holds IMAGE_PLACEHOLDER at the image.
"""

from __future__ import annotations

from .data.tokens import IMAGE_PLACEHOLDER

IMAGE_QUESTION_INSTRUCTION = "Represent the given image with the following question: {}\n"
TEXT_TO_IMAGE_INSTRUCTION = "Find me an everyday image that matches the given caption: {}\n"
IMAGE_TARGET_INSTRUCTION = "Represent the given image.\n"
DOCUMENT_PAGE_INSTRUCTION = "\nRepresent the given document image."


def image_question_query(image, question: str) -> dict:
    """A query made of an image and a question about it."""
    return {"text": IMAGE_PLACEHOLDER + IMAGE_QUESTION_INSTRUCTION.format(question), "image": image}


def text_to_image_query(caption: str) -> str:
    """A caption used to find an everyday image."""
    return TEXT_TO_IMAGE_INSTRUCTION.format(caption)


def image_target(image) -> dict:
    """An image as a retrieval target."""
    return {"text": IMAGE_PLACEHOLDER + IMAGE_TARGET_INSTRUCTION, "image": image}


def document_page(image) -> dict:
    """A document page image as a retrieval target (ViDoRe corpus)."""
    return {"text": IMAGE_PLACEHOLDER + DOCUMENT_PAGE_INSTRUCTION, "image": image}
