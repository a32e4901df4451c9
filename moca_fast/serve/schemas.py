"""The HTTP bodies as pydantic models (FastAPI validates requests with them and documents them in /openapi.json):
OpenAI's embeddings request and response, with the reference's instructions, vLLM's chat-style `messages`, TEI's
`truncate`, and the output options of late interaction and quantisation; the error shape of OpenAI on every route.

`input` items are checked by a before-validator so that a refusal names the item (`input[3]: empty string`), not
the union's branches; everything else is plain pydantic typing (an unknown field or a wrong type is refused).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextImageInput(_Strict):
    """One input of text and/or an image (a data URL, a path under --image-root, or an http(s) URL)."""

    text: str | None = None
    image: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(
        description="a data URL (data:image/png;base64,...), a path under --image-root, or an http(s) "
        "URL (with --allow-remote-images)"
    )
    detail: str | None = Field(None, description="accepted for OpenAI compatibility; not used")


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(_Strict):
    """An OpenAI chat message; its content parts, in order, become text and images of one input."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]


InputItem = str | TextImageInput


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings: OpenAI's fields, plus this server's (sent through the OpenAI client's `extra_body`)."""

    model: str = Field(description="the served model name (--served-model-name)")
    input: str | list[InputItem] | None = Field(
        None, description='a string, or a list of strings and {"text", "image"} objects; or give `messages`'
    )
    messages: list[ChatMessage] | None = Field(
        None,
        description="vLLM's chat-style input: the messages' text and image_url parts, in order, form ONE "
        "input (roles are not rendered: MoCa embeds without a chat template)",
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: the little-endian bytes of `precision`'s dtype"
    )
    dimensions: int | None = Field(
        None,
        ge=1,
        description="keep the first dimensions (normalised again); only the checkpoint's Matryoshka "
        "dimensions, unless the server runs with --allow-truncated-dimensions",
    )
    user: str | None = None
    prompt_name: str | None = Field(
        None,
        description="an instruction by name: the reference's text_to_image, image_question, image_target, "
        "document_page, or query / document (the instruction of each input's kind in that role)",
    )
    prompt: str | None = Field(None, description='an instruction template; "{}" takes the text, else it goes before')
    input_type: Literal["query", "document"] | None = Field(
        None, description="each input gets the reference's instruction for its kind in that role"
    )
    truncate: bool = Field(
        False, description="cut an input over the server's token limit instead of refusing it (413), as TEI and vLLM do"
    )
    output: Literal["pooled", "multi_vector"] = Field(
        "pooled",
        description="pooled: one vector per input; multi_vector: one vector per token (late interaction, "
        "on checkpoints with that head), `embedding` a list of rows and `shape` [tokens, dim]",
    )
    precision: Literal[PRECISIONS] = Field(  # type: ignore[valid-type]
        "float32",
        description="float16 rounds to half precision; int8, uint8, binary, ubinary quantise as "
        "sentence-transformers' quantize_embeddings does over the request's embeddings",
    )

    @field_validator("input", mode="before")
    @classmethod
    def _items_named(cls, value):
        if isinstance(value, list):
            for i, item in enumerate(value):
                _check_item(item, f"input[{i}]")
            if not value:
                raise ValueError("input: an empty list; give at least one input")
        elif isinstance(value, str) and not value:
            raise ValueError("input: empty string")
        elif value is not None and not isinstance(value, str):
            raise ValueError(f"input: a string or a list, got {type(value).__name__}")
        return value

    @model_validator(mode="after")
    def _one_source(self):
        if (self.input is None) == (self.messages is None):
            raise ValueError(
                'input: required, a string or a non-empty list of strings or {"text", "image"} '
                "objects (or `messages`, but not both)"
            )
        if self.prompt is not None and self.prompt_name is not None:
            raise ValueError("prompt: give prompt or prompt_name, not both")
        return self


def _check_item(item, name: str) -> None:
    if isinstance(item, str):
        if not item:
            raise ValueError(f"{name}: empty string")
    elif isinstance(item, dict):
        unknown = sorted(set(item) - {"text", "image"})
        if unknown:
            raise ValueError(f"{name}: unknown keys {unknown}; an input object has 'text' and/or 'image'")
        if item.get("image") is not None and not isinstance(item["image"], str):
            raise ValueError(f"{name}: 'image' must be a string (a data URL, a path or a URL)")
        if item.get("text") is not None and not isinstance(item["text"], str):
            raise ValueError(f"{name}: 'text' must be a string")
        if not item.get("text") and not item.get("image"):
            raise ValueError(f"{name}: neither 'text' nor 'image'")
    elif isinstance(item, (int, list)) and not isinstance(item, bool):
        raise ValueError(f"{name}: token-id inputs are not supported; send text")
    else:
        raise ValueError(
            f"{name}: expected a string or an object with 'text' and/or 'image', got {type(item).__name__}"
        )


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | list[list[float]] | str = Field(
        description="numbers (pooled), rows of numbers (multi_vector), or base64 of the little-endian values"
    )
    shape: list[int] | None = Field(None, description="multi_vector: [tokens, dim] of this input's vectors")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "moca-fast"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Status(BaseModel):
    status: str
    model: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, on every route and every status."""

    error: ErrorDetail


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503, 504)}
