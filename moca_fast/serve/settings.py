"""What a running server is allowed to do: its limits (body, inputs per request, tokens per input, image pixels,
queue, time), its batching wait, where images may come from, its API key and CORS origins; and the `serve` command's
flags that set them, refused before the model loads (a one-line error, exit 2) when a limit would admit nothing.

Light on purpose (no FastAPI import): the CLI builds its parser from here whether or not the `serve` extra is in.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_IMAGE_PIXELS = 32_000_000  # ~8000 x 4000: decoding one takes ~100 MB (RGB); the model uses <= max_pixels


@dataclass(frozen=True)
class ServeSettings:
    model_name: str  # what requests must name in "model"
    max_input_tokens: int  # per input; beyond it: 413 naming the input, or truncation when asked for
    max_wait_ms: float = 5.0  # how long the first queued input waits for others to share its forward
    max_queue_inputs: int = 1024  # inputs admitted at once (being prepared, queued or in a forward); beyond: 429
    max_request_inputs: int = 256  # inputs per request; beyond: 413
    max_body_bytes: int = 32 * 2**20  # request body; beyond: 413 (also the cap on one fetched remote image)
    request_timeout_s: float = 60.0  # from admission to answer; beyond: 504, and its queued inputs are dropped
    image_root: Path | None = None  # image paths are read only from under this folder (none: paths refused)
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: no server-side request forgery)
    preprocess_workers: int = 4  # threads decoding/patchifying images and encoding responses, off the event loop
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width x height from the header; beyond: 413, nothing decoded
    auto_truncate: bool = False  # cut over-long inputs to max_input_tokens as if every request said truncate: true
    allow_truncated_dimensions: bool = False  # `dimensions` on a checkpoint not trained for it (Matryoshka)
    api_key: str | None = None  # required as "Authorization: Bearer <key>" on every route but /health
    cors_allow_origins: tuple[str, ...] = ()  # browser origins allowed by CORS ("*": any)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` command's own flags (the model's come from the CLI's shared group)."""
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000")
    parser.add_argument("--served-model-name", help='the name requests give as "model" (default: --model)')
    parser.add_argument(
        "--api-key",
        help='require "Authorization: Bearer KEY" on every route but /health (401 otherwise); default: none',
    )
    parser.add_argument(
        "--cors-allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin allowed by CORS (repeatable; '*' for any); default: none",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a queued input waits for others to fill its forward (default: 5)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="inputs in flight at once; beyond it requests get 429 (default: 1024)",
    )
    parser.add_argument("--max-request-inputs", type=int, default=256, help="inputs per request (default: 256)")
    parser.add_argument(
        "--max-input-tokens",
        type=int,
        help="tokens per input (default: the smaller of --batch-tokens and the checkpoint's max "
        "length); a longer input gets 413 unless the request says truncate: true",
    )
    parser.add_argument(
        "--auto-truncate",
        action="store_true",
        help="truncate over-long inputs to --max-input-tokens instead of refusing them",
    )
    parser.add_argument(
        "--allow-truncated-dimensions",
        action="store_true",
        help="honour `dimensions` on a checkpoint not trained for Matryoshka truncation",
    )
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="request body size (default: 32)")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="width x height per image, read from its header before decoding; beyond it: 413 "
        f"(default: {DEFAULT_MAX_IMAGE_PIXELS})",
    )
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    parser.add_argument(
        "--image-root",
        type=Path,
        help="image paths in requests are read from under this folder (default: none; images come as data URLs)",
    )
    parser.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (redirects are not followed)"
    )
    parser.add_argument(
        "--preprocess-workers", type=int, default=4, help="threads decoding images and encoding responses (default: 4)"
    )


def settings_from_args(args: argparse.Namespace, batch_tokens: int, max_length: int | None) -> ServeSettings:
    """The settings the flags ask for; the token limit defaults to what one forward and the checkpoint allow."""
    return ServeSettings(
        model_name=args.served_model_name or args.model,
        max_input_tokens=args.max_input_tokens or min(batch_tokens, max_length or batch_tokens),
        max_wait_ms=args.max_wait_ms,
        max_queue_inputs=args.max_queue,
        max_request_inputs=args.max_request_inputs,
        max_body_bytes=int(args.max_body_mb * 2**20),
        request_timeout_s=args.request_timeout,
        image_root=args.image_root,
        allow_remote_images=args.allow_remote_images,
        preprocess_workers=args.preprocess_workers,
        max_image_pixels=args.max_image_pixels,
        auto_truncate=args.auto_truncate,
        allow_truncated_dimensions=args.allow_truncated_dimensions,
        api_key=args.api_key,
        cors_allow_origins=tuple(args.cors_allow_origin),
    )


def check_serve_arguments(args: argparse.Namespace) -> None:
    """A ValueError (one line, naming the flag) for a value that would start a server refusing everything."""
    at_least_one = {
        "--max-queue": args.max_queue,
        "--max-request-inputs": args.max_request_inputs,
        "--max-input-tokens": args.max_input_tokens,
        "--max-image-pixels": args.max_image_pixels,
        "--preprocess-workers": args.preprocess_workers,
    }
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1 (the server would admit nothing)")
    for flag, value in {"--max-body-mb": args.max_body_mb, "--request-timeout": args.request_timeout}.items():
        if not value > 0:  # also refuses nan
            raise ValueError(f"{flag} {value:g}: must be above 0 (the server would admit nothing)")
    if not args.max_wait_ms >= 0:
        raise ValueError(f"--max-wait-ms {args.max_wait_ms:g}: must be at least 0")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: a TCP port is 0..65535")
    if args.image_root is not None and not args.image_root.is_dir():
        raise ValueError(f"--image-root {args.image_root}: no such folder")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key: empty")
