"""Choosing the datasets of an evaluation folder by name, shared by the MMEB and ViDoRe harnesses."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def select_datasets(
    found: dict[str, Path], names: Sequence[str] | None, data: Path, kind: str, nothing_found: str
) -> dict[str, Path]:
    """`found` restricted to `names` (all when None); errors name the folder and what is missing or absent."""
    if names:
        missing = [name for name in names if name not in found]
        if missing:
            raise ValueError(f"{data}: no {kind} data for {missing}; found {sorted(found)}")
        found = {name: found[name] for name in names}
    if not found:
        raise ValueError(f"{data}: {nothing_found}")
    return found
