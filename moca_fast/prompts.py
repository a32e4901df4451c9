"""The reference's instruction prompts (exact strings of the public MoCa code, arXiv 2506.23115), and helpers that
build embedder inputs.

The image sits at the start of every prompt that has one; the instruction text follows it. Each `*_INSTRUCTION`
is the text after the image, with `{}` where the question or caption goes. ViDoRe queries and plain text
targets carry no instruction: pass them as bare strings. The helpers return inputs for `MocaEmbedder.encode`:
a string (text only) or a {"text", "image"} dict whose text holds IMAGE_PLACEHOLDER at the image. `PROMPTS` names
the instructions for `encode(prompt_name=...)` (and sentence-transformers' prompts); `role_prompt` picks the one a
query or a document gets by its kind (`encode_query`, `encode_document`, the mteb wrapper).
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


PROMPTS = {
    "image_question": IMAGE_QUESTION_INSTRUCTION,
    "text_to_image": TEXT_TO_IMAGE_INSTRUCTION,
    "image_target": IMAGE_TARGET_INSTRUCTION,
    "document_page": DOCUMENT_PAGE_INSTRUCTION,
}


def prompt_named(name: str) -> str:
    if name not in PROMPTS:
        raise ValueError(f"unknown prompt_name {name!r}; the reference's prompts are {sorted(PROMPTS)}")
    return PROMPTS[name]


def role_prompt(role: str, text: str, images: int, document_pages: bool = False) -> str | None:
    """The reference's instruction for an input of that kind as a query or a document (None: as it is). Queries:
    an image with text is an image question, an image alone an image target, text goes bare (ViDoRe queries).
    Documents: an image alone is an image target, or a document page with `document_pages`; the rest goes bare."""
    if role not in ("query", "document"):
        raise ValueError(f"role must be 'query' or 'document', got {role!r}")
    if images != 1:
        return None
    alone = not text.replace(IMAGE_PLACEHOLDER, "").strip()
    if role == "query":
        return IMAGE_TARGET_INSTRUCTION if alone else IMAGE_QUESTION_INSTRUCTION
    if alone:
        return DOCUMENT_PAGE_INSTRUCTION if document_pages else IMAGE_TARGET_INSTRUCTION
    return None
