"""A validated /v1/embeddings request (schemas.EmbeddingRequest) -> inputs for the embedder and what to answer, or a
RequestError whose message names the field or the item (`input[3]`) and the problem: the checks that need the
model or the server's settings (the served name, the input count, Matryoshka dimensions, the multi-vector head)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import prompts
from ..data.tokens import IMAGE_PLACEHOLDER
from ..embed import MocaEmbedder
from ..inputs import EmbedInput, as_input, with_instructions
from .schemas import EmbeddingRequest, ImagePart
from .settings import ServeSettings

ROLES = ("query", "document")  # also prompt names: the checkpoint's sentence-transformers config names them


class RequestError(Exception):
    """A refused request: its HTTP status and a message naming what is wrong, sent in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ParsedRequest:
    inputs: list[EmbedInput]  # instructions applied; images still the request's strings (inputs.py resolves them)
    encoding_format: str
    precision: str
    dimensions: int | None  # None: all
    output: str  # "pooled" or "multi_vector"
    truncate: bool


def parse_request(request: EmbeddingRequest, settings: ServeSettings, embedder: MocaEmbedder) -> ParsedRequest:
    """Check a validated request against the settings and the model."""
    if request.model != settings.model_name:
        raise RequestError(
            404,
            f"model {request.model!r} is not served here; this server serves {settings.model_name!r}",
            "model",
            "model_not_found",
        )
    if request.messages is not None:
        inputs = [from_messages(request)]
    else:
        items = [request.input] if isinstance(request.input, str) else request.input
        if len(items) > settings.max_request_inputs:
            raise RequestError(
                413,
                f"input: {len(items)} items, over the limit of {settings.max_request_inputs} "
                "per request (--max-request-inputs)",
                "input",
            )
        inputs = [
            as_input(item if isinstance(item, str) else item.model_dump(exclude_none=True), f"input[{i}]")
            for i, item in enumerate(items)
        ]
    if len(inputs) > settings.max_queue_inputs:  # never admitted, however long it waits: not a 429
        raise RequestError(
            413,
            f"input: {len(inputs)} items, more than the server ever holds at once "
            f"({settings.max_queue_inputs}, --max-queue)",
            "input",
        )
    _check_output(request, embedder)
    dimensions = _dimensions(request, settings, embedder)
    prompt, role = _instruction(request)
    inputs = with_instructions(inputs, prompt, role, role_prompt=embedder.role_prompt)
    return ParsedRequest(
        inputs,
        request.encoding_format,
        request.precision,
        dimensions,
        request.output,
        request.truncate or settings.auto_truncate,
    )


def from_messages(request: EmbeddingRequest) -> EmbedInput:
    """vLLM's chat-style input: every message's text and image_url parts, in order, as one interleaved input."""
    text, images = [], []
    for message in request.messages:
        parts = [message.content] if isinstance(message.content, str) else message.content
        for part in parts:
            if isinstance(part, str):
                text.append(part)
            elif isinstance(part, ImagePart):
                text.append(IMAGE_PLACEHOLDER)
                images.append(part.image_url.url)
            else:
                text.append(part.text)
    if not images and not "".join(text):
        raise RequestError(400, "messages: no text and no image", "messages")
    return EmbedInput("".join(text), tuple(images), "messages")


def _check_output(request: EmbeddingRequest, embedder: MocaEmbedder) -> None:
    if request.output != "multi_vector":
        return
    if embedder.multi_vector_dim is None:
        raise RequestError(
            400,
            "output: 'multi_vector' needs a checkpoint with a multi-vector head; this one gives pooled vectors only",
            "output",
        )
    if request.precision not in ("float32", "float16"):
        raise RequestError(
            400,
            f"precision: {request.precision!r} quantises pooled vectors; multi-vectors come as float32 or float16",
            "precision",
        )
    if request.dimensions is not None:
        raise RequestError(400, "dimensions: applies to pooled vectors, not to multi-vectors", "dimensions")


def _dimensions(request: EmbeddingRequest, settings: ServeSettings, embedder: MocaEmbedder) -> int | None:
    """The requested dimensions if the checkpoint was trained for them (Matryoshka), as vLLM decides it."""
    wanted, dim = request.dimensions, embedder.dim
    if wanted is None or wanted == dim:
        return None
    if wanted > dim:
        raise RequestError(400, f"dimensions: {wanted}, more than the model's {dim}", "dimensions")
    trained = tuple(embedder.matryoshka_dims)
    if wanted in trained or settings.allow_truncated_dimensions:
        return wanted
    if not trained:
        raise RequestError(
            400,
            f"dimensions: this checkpoint was not trained for Matryoshka truncation, so its "
            f"first {wanted} dimensions are not a usable embedding; omit dimensions (the server "
            "allows it anyway with --allow-truncated-dimensions)",
            "dimensions",
        )
    raise RequestError(
        400,
        f"dimensions: {wanted}, not one the checkpoint was trained for; its Matryoshka "
        f"dimensions are {sorted(trained, reverse=True)}",
        "dimensions",
    )


def _instruction(request: EmbeddingRequest) -> tuple[str | None, str | None]:
    """(prompt, role): `prompt` (a template), `prompt_name` (one of the reference's, or a role), or `input_type`."""
    name, role = request.prompt_name, request.input_type
    if name in ROLES:
        if role is not None and role != name:
            raise RequestError(400, f"prompt_name {name!r} and input_type {role!r} disagree", "prompt_name")
        return None, name
    if name is None:
        return request.prompt, role
    try:
        return prompts.prompt_named(name), role
    except ValueError as error:
        raise RequestError(400, f"prompt_name: {error} (or 'query' / 'document')", "prompt_name") from None
