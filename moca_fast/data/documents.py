"""Stage-1 data: interleaved documents (a text with the image placeholder at each image, and its images).

A document row, in the reference's format: `text` holds `IMAGE_PLACEHOLDER` once per image, in order;
`images` is a list of encoded image bytes, HF `Image` dicts ({"bytes", "path"}) or image paths; an optional
`id` names the sample (otherwise `<source>#<row>` does). Sources, all read with `datasets`:

- a folder written by `Dataset.save_to_disk`, or by `DatasetDict.save_to_disk` (its `split` is taken);
- a parquet file, or a folder of parquet files;
- a JSON-lines file, or a folder of them, whose `images` are paths;
- anything that is not a local path is taken for a hub dataset name: `load_dataset(name, split=split)`.

Relative image paths are resolved against `image_dir`, by default the folder that holds the source, and must
stay inside it (`resolve_image_path`).

Rows are validated once, vectorised over the Arrow columns, when the dataset opens; no image is decoded
then. A row with a missing field, or whose placeholder count differs from its image count, raises a
ValueError naming the sample; with `skip_invalid=True` it is skipped instead, counted per reason in
`DocumentDataset.skipped`, and logged. Images decode later, in `Document.load_images`, and a corrupt or
missing image is a ValueError naming the sample (data/loader.py applies the same skip policy there).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image

from .images import load_image
from .skips import Skips
from .tokens import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

_ROW_FILE_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


@dataclass
class Document:
    """One interleaved sample; `images` holds encoded bytes or image paths, in placeholder order."""

    id: str
    text: str
    images: list

    def load_images(self) -> list[Image.Image]:
        return [load_image(image, self.id) for image in self.images]


def open_rows(source: str | Path, *, split: str = "train") -> datasets.Dataset:
    """Open a saved dataset folder, parquet or JSON-lines file(s), or a hub dataset (a name, not a path)."""
    try:
        import datasets  # only reading from files needs it (rows in memory do not)
    except ImportError as error:
        raise ImportError(
            f"{source}: reading data files needs the `datasets` package, which cannot be imported here "
            f"({error}); pip install datasets"
        ) from None

    path = Path(source)
    if not path.exists():
        if path.is_absolute() or path.suffix in _ROW_FILE_SUFFIXES or str(source).startswith("."):
            raise ValueError(f"{source}: no such file or folder")
        return datasets.load_dataset(str(source), split=split)
    if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source} has no split {split!r}; it has {sorted(loaded)}")
            return loaded[split]
        return loaded
    files = sorted(p for p in path.iterdir() if p.suffix in _ROW_FILE_SUFFIXES) if path.is_dir() else [path]
    kinds = {_ROW_FILE_SUFFIXES.get(p.suffix) for p in files}
    if len(kinds) != 1 or None in kinds:
        raise ValueError(f"{source}: not a saved dataset, nor parquet or JSON-lines file(s) of one kind")
    paths = [str(p) for p in files]
    try:
        return datasets.Dataset.from_parquet(paths) if kinds == {"parquet"} else datasets.Dataset.from_json(paths)
    except StopIteration:  # what `datasets` raises on files without a row
        raise ValueError(f"{source}: no rows") from None


def source_folder(source: str | Path) -> Path | None:
    """The folder that holds a local source (the default root of relative image paths); None for a hub name."""
    path = Path(source)
    return path.parent if path.exists() else None


def resolve_image_path(path: str, image_dir: Path | None, allow_outside: bool = False) -> str:
    """`path` under `image_dir`. A path that leaves the folder (`..`, an absolute path elsewhere) is a ValueError
    unless `allow_outside`: rows must not open files outside the data. Checked by name (symlinks are followed)."""
    if image_dir is None:
        return path
    joined, root = os.path.abspath(image_dir / path), os.path.abspath(image_dir)
    if not allow_outside and os.path.commonpath([joined, root]) != root:
        raise ValueError(
            f"image path {path!r} leaves the image folder {image_dir} (set allow_image_paths_outside to allow it)"
        )
    return str(image_dir / path)


class DocumentDataset(torch.utils.data.Dataset):
    """Map-style dataset of validated `Document`s; `skipped` counts the rows left out, per reason."""

    def __init__(
        self,
        source: str | Path,
        *,
        split: str = "train",
        image_dir: str | Path | None = None,
        skip_invalid: bool = False,
        allow_image_paths_outside: bool = False,
    ):
        rows = open_rows(source, split=split)
        missing = [name for name in ("text", "images") if name not in rows.column_names]
        if missing:
            raise ValueError(f"{source}: no column {missing[0]!r}: every sample lacks that field")
        columns = ["id", "text", "images"] if "id" in rows.column_names else ["text", "images"]
        self._rows = rows.select_columns(columns).with_format("arrow")
        self._source = str(source)
        self._image_dir = Path(image_dir) if image_dir is not None else source_folder(source)
        self._allow_outside = allow_image_paths_outside
        self.skipped = Skips(log, "document")
        self._index = self._validate(skip_invalid)

    def _sample_id(self, row: int, record_id=None) -> str:
        return str(record_id) if record_id is not None else f"{self._source}#{row}"

    def _validate(self, skip_invalid: bool) -> np.ndarray:
        table = self._rows[:]
        n_placeholders = pc.fill_null(pc.count_substring(table.column("text"), IMAGE_PLACEHOLDER), -1).to_numpy()
        n_images = pc.fill_null(pc.list_value_length(table.column("images")), -1).to_numpy()
        problems = {  # one reason per row, the first that applies
            "missing field 'text'": n_placeholders < 0,
            "missing field 'images'": (n_placeholders >= 0) & (n_images < 0),
            "placeholder/image count mismatch": (n_placeholders >= 0) & (n_images >= 0) & (n_placeholders != n_images),
        }
        invalid = np.logical_or.reduce(list(problems.values()))
        if not invalid.any():
            return np.arange(len(table))
        ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * len(table)

        def detail(row: int) -> tuple[str, str]:
            reason = next(name for name, rows in problems.items() if rows[row])
            return reason, (
                f"sample {self._sample_id(row, ids[row])}: {reason}"
                + (
                    f" (text has {n_placeholders[row]} image placeholders, {n_images[row]} images)"
                    if reason.startswith("placeholder")
                    else ""
                )
            )

        if not skip_invalid:
            raise ValueError(
                f"{detail(int(np.argmax(invalid)))[1]} in {self._source}; pass skip_invalid=True to skip such samples"
            )
        for row in np.flatnonzero(invalid).tolist():
            self.skipped.add(*detail(row))
        log.warning(
            "skipped %d of %d documents in %s: %s", int(invalid.sum()), len(table), self._source, dict(self.skipped)
        )
        return np.flatnonzero(~invalid)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Document:
        row = int(self._index[index])
        record = self._rows[row].to_pylist()[0]
        sample_id = self._sample_id(row, record.get("id"))
        try:
            return Document(sample_id, record["text"], [self._image(image) for image in record["images"]])
        except ValueError as error:
            raise ValueError(f"sample {sample_id}: {error}") from error

    def _image(self, image):
        """Normalise one stored image to its encoded bytes, or to a resolved path."""
        if isinstance(image, dict):
            image = image["bytes"] if image.get("bytes") is not None else image.get("path")
        return resolve_image_path(image, self._image_dir, self._allow_outside) if isinstance(image, str) else image
