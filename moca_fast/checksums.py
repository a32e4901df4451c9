"""Checksums of files on disk (xxh3-128: several GB/s, so that checking a checkpoint costs little next to reading
it): recorded beside what a run writes, compared when it is read back."""

from __future__ import annotations

import os

import xxhash

CHUNK = 8 << 20


def file_checksum(path: str | os.PathLike) -> str:
    """The xxh3-128 digest of a file's bytes, in hex."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
