"""What a running server is allowed to do: its limits (body, inputs per request, tokens per input, queue, time), its
batching wait, and where images may come from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeSettings:
    model_name: str  # what requests must name in "model"
    max_input_tokens: int  # per input, after the processor's max_length; beyond it: 413 naming the input
    max_wait_ms: float = 5.0  # how long the first queued input waits for others to share its forward
    max_queue_inputs: int = 1024  # inputs admitted at once (being prepared, queued or in a forward); beyond: 429
    max_request_inputs: int = 256  # inputs per request; beyond: 413
    max_body_bytes: int = 32 * 2**20  # request body; beyond: 413 (also the cap on one fetched remote image)
    request_timeout_s: float = 60.0  # from admission to answer; beyond: 504, and its queued inputs are dropped
    image_root: Path | None = None  # image paths are read only from under this folder (none: paths refused)
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: no server-side request forgery)
    preprocess_workers: int = 4  # threads parsing JSON and decoding/patchifying images, off the event loop
