"""A /v1/embeddings request body (OpenAI's shape, plus the reference's instructions) -> inputs for the embedder, or a
RequestError whose message names the field or the item (`input[3]`) and the problem."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .. import prompts
from ..embed import EmbedInput, as_input, with_instructions
from .settings import ServeSettings

FIELDS = ("model", "input", "encoding_format", "dimensions", "user", "prompt_name", "prompt", "input_type")
ENCODINGS = ("float", "base64")
ROLES = ("query", "document")


class RequestError(Exception):
    """A refused request: its HTTP status and a message naming what is wrong, sent in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: list[EmbedInput]  # instructions applied; images still the request's strings (inputs.py resolves them)
    encoding_format: str
    dimensions: int | None


def parse_request(body: bytes, settings: ServeSettings, dim: int) -> EmbeddingRequest:
    """Check every field of a request body against the settings and the model's dimension `dim`."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; the fields are {list(FIELDS)}", unknown[0])
    if not isinstance(request.get("model"), str):
        raise RequestError(400, "model: required, a string", "model")
    if request["model"] != settings.model_name:
        raise RequestError(404, f"model {request['model']!r} is not served here; this server serves "
                                f"{settings.model_name!r}", "model", "model_not_found")
    encoding = request.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise RequestError(400, f"encoding_format: {encoding!r}, expected one of {list(ENCODINGS)}", "encoding_format")
    dimensions = request.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or not 1 <= dimensions <= dim):
        raise RequestError(400, f"dimensions: {dimensions!r}, expected an integer from 1 to {dim}", "dimensions")
    raw = request.get("input")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise RequestError(400, "input: required, a string or a non-empty list of strings or {\"text\", \"image\"} "
                                "objects", "input")
    if len(items) > settings.max_request_inputs:
        raise RequestError(413, f"input: {len(items)} items, over the limit of {settings.max_request_inputs} per "
                                "request", "input")
    inputs = [parse_item(item, f"input[{i}]") for i, item in enumerate(items)]
    return EmbeddingRequest(with_instructions(inputs, _prompt(request), _role(request)), encoding, dimensions)


def parse_item(item, name: str) -> EmbedInput:
    """One element of `input`: a string, or {"text": ..., "image": ...} with the image as a string."""
    if isinstance(item, str):
        if not item:
            raise RequestError(400, f"{name}: empty string", "input")
        return EmbedInput(item, (), name)
    if isinstance(item, dict):
        image = item.get("image")
        if image is not None and not isinstance(image, str):
            raise RequestError(400, f"{name}: 'image' must be a string (a data URL, base64 data, a path or a URL)",
                               "input")
        if not item.get("text") and not image:
            raise RequestError(400, f"{name}: neither 'text' nor 'image'", "input")
        try:
            return as_input(item, name)
        except ValueError as error:
            raise RequestError(400, str(error), "input") from None
    if isinstance(item, (int, list)) and not isinstance(item, bool):
        raise RequestError(400, f"{name}: token-id inputs are not supported; send text", "input")
    raise RequestError(400, f"{name}: expected a string or an object with 'text' and/or 'image', got "
                            f"{type(item).__name__}", "input")


def _prompt(request: dict) -> str | None:
    """`prompt` (an instruction; "{}" takes the text) or `prompt_name` (one of the reference's), as encode takes."""
    prompt, name = request.get("prompt"), request.get("prompt_name")
    if prompt is not None and name is not None:
        raise RequestError(400, "give prompt or prompt_name, not both", "prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError(400, "prompt: must be a string", "prompt")
    if name is None:
        return prompt
    try:
        return prompts.prompt_named(name)
    except (ValueError, TypeError) as error:
        raise RequestError(400, f"prompt_name: {error}", "prompt_name") from None


def _role(request: dict) -> str | None:
    """`input_type`: "query" or "document" gives each input the reference's instruction for its kind, as
    encode_query / encode_document do."""
    role = request.get("input_type")
    if role is not None and role not in ROLES:
        raise RequestError(400, f"input_type: {role!r}, expected one of {list(ROLES)}", "input_type")
    return role
