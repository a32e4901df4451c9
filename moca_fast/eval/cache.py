"""Embeddings cached on disk so an interrupted evaluation resumes where it stopped.

Each cached array is `<name>.npy` plus `<name>.json` holding a fingerprint of what was embedded (the model id, its
dtype, the processor's pixel budget and length limit, every input's text and images). The JSON is written last, so
its presence means the array is complete; a fingerprint that differs (other model, other data) recomputes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..embed import EmbedInput, MocaEmbedder

log = logging.getLogger(__name__)


def fingerprint(embedder: MocaEmbedder, model_id: str, inputs: Sequence[EmbedInput]) -> str:
    processor, dtype = embedder.processor, next(embedder.model.parameters()).dtype
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{model_id}|{dtype}|{processor.min_pixels}|{processor.max_pixels}|{processor.max_length}".encode())
    for item in inputs:
        digest.update(b"\0" + item.text.encode())
        for image in item.images:
            digest.update(b"\1" + _image_key(image))
    return digest.hexdigest()


def _image_key(image) -> bytes:
    """Paths by name, encoded images (bytes or {"bytes", "path"} dicts) by content."""
    if isinstance(image, dict):
        image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return hashlib.blake2b(image, digest_size=16).digest()
    return str(image).encode()


def cached_embeddings(embedder: MocaEmbedder, inputs: Sequence[EmbedInput], path: Path | None, *,
                      model_id: str, batch_tokens: int | None = None, progress: bool = False) -> np.ndarray:
    """Embeddings [N, dim] of `inputs`, from `path` (.npy) when an earlier run of the same model on the same
    inputs left them there, else computed and written there. `path=None`: no cache."""
    if path is None:
        return embedder.encode(list(inputs), batch_tokens=batch_tokens, show_progress_bar=progress)
    meta = path.with_suffix(".json")
    key = fingerprint(embedder, model_id, inputs)
    if meta.is_file() and path.is_file() and json.loads(meta.read_text()).get("fingerprint") == key:
        log.info("%s: %d cached embeddings", path, len(inputs))
        return np.load(path)
    embeddings = embedder.encode(list(inputs), batch_tokens=batch_tokens, show_progress_bar=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, embeddings)
    partial.replace(path)
    meta.write_text(json.dumps({"fingerprint": key, "model": model_id, "count": len(inputs)}))
    return embeddings
