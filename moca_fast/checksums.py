"""Checksums of files on disk (BLAKE2b-128 from the standard library, about 1 GB/s: no dependency, so the GPU
machine without `datasets`' xxhash runs it too): recorded beside what a run writes, compared when it is read back."""

from __future__ import annotations

import hashlib
import os

CHUNK = 8 << 20


def file_checksum(path: str | os.PathLike) -> str:
    """The BLAKE2b-128 digest of a file's bytes, in hex."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
