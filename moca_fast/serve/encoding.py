"""A request's embeddings -> the response body (orjson, in the thread pool: thousands of floats would hold up the
event loop). Pooled vectors are finished as `encode` finishes them (the first `dimensions`, normalised), then kept
in float32, rounded to float16, or quantised with sentence-transformers' semantics over the request's embeddings
(moca_fast.embed.quantize: int8 / uint8 from the batch's ranges, binary / ubinary packed bits); multi-vectors go as
the head gives them, per input a [tokens, dim] block. `float` sends JSON numbers; `base64` the little-endian bytes
of that dtype (OpenAI's own base64 is float32), row-major for a multi-vector block, whose `shape` says how to fold it.
"""

from __future__ import annotations

import base64

import numpy as np
import orjson
import torch

from ..embed import finish_embeddings, quantize
from .parsing import ParsedRequest, RequestError

_FLOAT_DTYPES = {"float32": "<f4", "float16": "<f2"}


def response_body(request: ParsedRequest, rows: list[torch.Tensor], model: str, tokens: int) -> bytes:
    if request.output == "multi_vector":
        data = [_multi_vector(i, row, request) for i, row in enumerate(rows)]
    else:
        values = pooled_values(torch.stack(rows), request)
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(row, request.encoding_format)}
            for i, row in enumerate(values)
        ]
    return orjson.dumps(
        {"object": "list", "model": model, "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def pooled_values(raw: torch.Tensor, request: ParsedRequest) -> np.ndarray:
    """The pooled embeddings [N, d] in the request's precision (what `encode(..., precision=...)` returns)."""
    embeddings = finish_embeddings(raw, request.dimensions).numpy()
    if request.precision in _FLOAT_DTYPES:
        return embeddings.astype(_FLOAT_DTYPES[request.precision])
    try:
        return quantize(embeddings, request.precision)
    except ImportError as error:  # the serve extra leaves sentence-transformers out
        raise RequestError(
            400, f"precision: {request.precision!r} is not available on this server ({error})", "precision"
        ) from None


def _multi_vector(index: int, block: torch.Tensor, request: ParsedRequest) -> dict:
    values = block.float().numpy().astype(_FLOAT_DTYPES[request.precision])
    return {
        "object": "embedding",
        "index": index,
        "embedding": _encoded(values, request.encoding_format),
        "shape": list(values.shape),
    }


def _encoded(values: np.ndarray, encoding_format: str):
    if encoding_format == "base64":
        little_endian = values.astype(values.dtype.newbyteorder("<"), copy=False)
        return base64.b64encode(np.ascontiguousarray(little_endian).tobytes()).decode("ascii")
    if values.dtype == np.float16:  # orjson writes float32 and float64 arrays; float16 values are exact in float32
        return values.astype(np.float32)
    return np.ascontiguousarray(values)
