"""Embeddings cached on disk so an interrupted evaluation resumes where it stopped.

Each cached array is `<name>.npy` plus `<name>.json` holding a fingerprint of what was embedded: the model's key
(`model_key`: a digest of every weight, the model's config, the processor's settings and the tokenizer's vocabulary,
so retrained weights at the same path never reuse old embeddings) and every input's text and images (an image path
with a checksum of the file's bytes, so images rewritten at the same paths are embedded again). The JSON is
written last, so its presence means the array is complete; a fingerprint that differs (other weights, other data)
recomputes. The model id is kept in the JSON for people, not in the key. Multi-vector embeddings (`output=
"multi_vector"`) are cached as `<name>.npz`: every input's token vectors concatenated, and their counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..checksums import file_checksum
from ..embed import MocaEmbedder
from ..inputs import EmbedInput

log = logging.getLogger(__name__)


def model_key(embedder: MocaEmbedder) -> str:
    """A digest of everything besides the inputs that decides the embeddings: each weight's bytes (dtype and shape
    included), the model's config, the processor's settings and the tokenizer's vocabulary. It reads every weight
    (about 5 s for a 3B model on one CPU core), so the harnesses compute it once per evaluation."""
    processor, digest = embedder.processor, hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(embedder.model.spec.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(embedder.model.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    settings = (
        processor.min_pixels,
        processor.max_pixels,
        processor.max_length,
        processor.patch_size,
        processor.spatial_merge_size,
        processor.temporal_patch_size,
    )
    digest.update(json.dumps([settings, sorted(processor.tokenizer.get_vocab().items())]).encode())
    return digest.hexdigest()


def fingerprint(key: str, inputs: Sequence[EmbedInput]) -> str:
    """`key` (from `model_key`) and every input's text and images."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(key.encode())
    for item in inputs:
        digest.update(b"\0" + item.text.encode())
        for image in item.images:
            digest.update(b"\1" + _image_key(image))
    return digest.hexdigest()


def _image_key(image) -> bytes:
    """Encoded images (bytes or {"bytes", "path"} dicts) by content; paths by name and content (an image rewritten
    at its path is embedded again). A path that cannot be read is keyed by name: encoding it reports the problem."""
    if isinstance(image, dict):
        image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return hashlib.blake2b(image, digest_size=16).digest()
    try:
        content = file_checksum(image)
    except (OSError, TypeError):
        content = ""
    return f"{image}\0{content}".encode()


def cached_embeddings(
    embedder: MocaEmbedder,
    inputs: Sequence[EmbedInput],
    path: Path | None,
    *,
    model_key: str | None,
    model_id: str = "",
    batch_tokens: int | None = None,
    progress: bool = False,
    output: str = "pooled",
):
    """Embeddings [N, dim] of `inputs`, from `path` (.npy) when an earlier run of the same model (`model_key` of
    the embedder) on the same inputs left them there, else computed and written there. `path=None`: no cache.
    `output="multi_vector"`: a list of each input's token vectors, cached in `path` with the suffix .npz."""

    def encode():
        return embedder.encode(list(inputs), batch_tokens=batch_tokens, show_progress_bar=progress, output=output)

    if path is None:
        return encode()
    multi = output == "multi_vector"
    path = path.with_suffix(".npz") if multi else path
    meta = path.with_suffix(".json")
    key = fingerprint(f"{model_key}|{output}" if multi else model_key, inputs)
    if meta.is_file() and path.is_file() and json.loads(meta.read_text()).get("fingerprint") == key:
        log.info("%s: %d cached embeddings", path, len(inputs))
        if not multi:
            return np.load(path)
        with np.load(path) as stored:
            return np.split(stored["vectors"], np.cumsum(stored["lengths"])[:-1])
    embeddings = encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)
    partial = path.with_suffix(".partial" + path.suffix)
    if multi:
        np.savez(
            partial,
            vectors=np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32),
            lengths=np.array([len(e) for e in embeddings], dtype=np.int64),
        )
    else:
        np.save(partial, embeddings)
    partial.replace(path)
    meta.write_text(json.dumps({"fingerprint": key, "model": model_id, "count": len(inputs)}))
    return embeddings
