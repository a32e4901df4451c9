"""Stage-2 data: query / positive / hard-negative pairs from reference-format rows, task batches, duplicate targets.

Rows (one source per task, i.e. per subset; any source `documents.open_rows` reads, or a list of row dicts in
memory): `qry`, `qry_image_path`, `pos_text`, `pos_image_path`, and optionally `neg_text`, `neg_image_path` (lists,
or strings holding a list literal, which is how the reference data stores them). `<|image_1|>` in a text marks
its image and becomes IMAGE_PLACEHOLDER; an empty image path makes a text-only side, and a marker in its text is
dropped, as the reference does. Relative image paths resolve against `image_dir` (default: the folder holding the
source; rows in memory need it). A row is checked when it is read: a missing field, a bad negative list, or an
image without exactly one marker in its text is a ValueError naming the row.

Negative lists held in strings are parsed, never evaluated: only a list literal of string literals (JSON or
Python quoting) is accepted; anything else, e.g. `__import__('os').system(...)`, is rejected.

Hard negatives per query follow the reference's "negative ratio" rule (MoCa `src/dataset.py`,
`filter_hard_negtives`; `--negative_ratio 2` in `scripts/cl_train.sh`). With ratio r a row keeps its first r
negatives; a row with fewer, but some, repeats its last one up to r; a row with none has none; r = 0 turns
hard negatives off. Texts and image paths follow the same rule and stay aligned: one list may be empty (all
negatives text-only, or all without text), otherwise their lengths must agree. An empty negative text is
filled as the reference does: with the positive's text when the row has no non-empty negative text (an
image-only negative then carries the positive's instruction), otherwise with one of the row's non-empty
negative texts, drawn by a RNG seeded with (seed, row id), so the choice is the same in any access order.

`task_batches` makes batches that each hold one task (the reference logs task batching but its sampler
mixes tasks); `target_ids` marks identical targets in a batch so the loss can mask false negatives.
"""

from __future__ import annotations

import ast
import hashlib
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .documents import open_rows, resolve_image_path, source_folder
from .tokens import IMAGE_PLACEHOLDER

MMEB_IMAGE_TOKEN = "<|image_1|>"  # how MMEB-style rows mark an image in a text
NEGATIVE_RATIO = 2  # hard negatives per query in the reference recipe
_REQUIRED_FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path")


@dataclass(frozen=True)
class Side:
    """One side of a pair: its text (IMAGE_PLACEHOLDER at the image, if any) and its image path."""

    text: str
    image: str | None


@dataclass
class Pair:
    id: str
    task: str
    query: Side
    positive: Side
    negatives: list[Side]


def parse_string_list(value, where: str) -> list[str]:
    """A list of strings from a list, from a string holding a list literal, or from None / "" (empty)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            node = ast.parse(value.strip() or "[]", mode="eval").body
        except (SyntaxError, ValueError) as error:
            raise ValueError(f"{where}: not a list literal: {value[:80]!r}") from error
        if not (isinstance(node, ast.List)
                and all(isinstance(item, ast.Constant) and isinstance(item.value, str) for item in node.elts)):
            raise ValueError(f"{where}: only a list of string literals is accepted, got {value[:80]!r}")
        return [item.value for item in node.elts]
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValueError(f"{where}: expected a list of strings, got {type(value).__name__}")


def mmeb_text(text, image_path, where: str) -> tuple[str, str | None]:
    """An MMEB-style text and image path (`<|image_1|>` marks the image) -> (text with the placeholder triple,
    image path or None); errors name `where`."""
    if not isinstance(text, str) or not isinstance(image_path, (str, type(None))):
        raise ValueError(f"{where}: text and image path must be strings")
    text = text.replace(MMEB_IMAGE_TOKEN, IMAGE_PLACEHOLDER)
    if not image_path:
        return text.replace(IMAGE_PLACEHOLDER, ""), None
    if text.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"{where} has an image, but its text has {text.count(IMAGE_PLACEHOLDER)} image markers "
                         "instead of 1")
    return text, image_path


def pair_from_row(row: Mapping, *, row_id: str, task: str, image_dir: Path | None = None,
                  negative_ratio: int = NEGATIVE_RATIO, seed: int = 0) -> Pair:
    """Normalise one reference-format row; every error names `row_id`."""
    where = f"row {row_id}"
    for field in _REQUIRED_FIELDS:
        if row.get(field) is None:
            raise ValueError(f"{where}: missing field {field!r}")

    def side(text, image_path, role: str) -> Side:
        text, image = mmeb_text(text, image_path, f"{where}: the {role}")
        return Side(text, resolve_image_path(image, image_dir) if image else None)

    negatives = _hard_negatives(row, where, row_id, negative_ratio, seed) if negative_ratio > 0 else []
    return Pair(row_id, task, side(row["qry"], row["qry_image_path"], "query"),
                side(row["pos_text"], row["pos_image_path"], "positive"),
                [side(text, path, f"negative {k}") for k, (text, path) in enumerate(negatives)])


def _hard_negatives(row: Mapping, where: str, row_id: str, ratio: int, seed: int) -> list[tuple[str, str]]:
    """(text, image path) of the row's hard negatives under the reference's negative-ratio rule."""
    texts = parse_string_list(row.get("neg_text"), f"{where} neg_text")
    paths = parse_string_list(row.get("neg_image_path"), f"{where} neg_image_path")
    if texts and paths and len(texts) != len(paths):
        raise ValueError(f"{where}: {len(texts)} negative texts but {len(paths)} negative image paths")
    n = max(len(texts), len(paths))
    if n == 0:
        return []
    texts, paths = texts or [""] * n, paths or [""] * n
    filled = [text for text in texts if text]
    rng = random.Random(f"{seed}:{row_id}")
    chosen = [min(k, n - 1) for k in range(ratio)]  # the first `ratio`, repeating the last when short
    return [(texts[k] or (rng.choice(filled) if filled else row["pos_text"]), paths[k]) for k in chosen]


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of `Pair`s over one row source per task; `tasks[i]` is the task of item i."""

    def __init__(self, subsets: Mapping[str, str | Path | Sequence[Mapping]], *, split: str = "train",
                 image_dir: str | Path | None = None, negative_ratio: int = NEGATIVE_RATIO, seed: int = 0):
        self._subsets = []
        for task, source in subsets.items():  # rows in memory need no reader (nor `datasets`)
            on_disk = isinstance(source, (str, Path))
            rows = open_rows(source, split=split) if on_disk else source
            folder = Path(image_dir) if image_dir is not None else source_folder(source) if on_disk else None
            self._subsets.append((task, rows, folder))
        self._offsets = np.cumsum([0] + [len(rows) for _, rows, _ in self._subsets])
        self.tasks = [task for task, rows, _ in self._subsets for _ in range(len(rows))]
        self.negative_ratio, self.seed = negative_ratio, seed

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> Pair:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range for {len(self)} pairs")
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        task, rows, image_dir = self._subsets[k]
        row = int(index - self._offsets[k])
        return pair_from_row(rows[row], row_id=f"{task}#{row}", task=task, image_dir=image_dir,
                             negative_ratio=self.negative_ratio, seed=self.seed)


def task_batches(tasks: Sequence[str], batch_size: int, *, seed: int) -> list[list[int]]:
    """Batches of indices that each hold a single task, every index exactly once, in a seeded order.

    Within a task the indices are shuffled and cut into `batch_size` pieces (its last batch may be short);
    the batches of all tasks are then shuffled together. Pass the global batch size and deal each batch's
    indices across ranks to keep every step homogeneous.
    """
    generator = torch.Generator().manual_seed(seed)
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, task in enumerate(tasks):
        by_task[task].append(index)
    batches = []
    for task in sorted(by_task):
        indices = [by_task[task][k] for k in torch.randperm(len(by_task[task]), generator=generator).tolist()]
        batches += [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]


def target_ids(targets: Sequence[Side]) -> torch.Tensor:
    """[B] long content ids, equal for identical targets: the same text and the same image bytes (one image stored
    under two paths is the same target; a missing file raises naming it).

    A 64-bit digest of the content, not a first-seen counter, so ids agree across ranks and processes: the
    contrastive loss compares them after gathering every rank's targets."""
    def digest(side: Side) -> int:
        hasher = hashlib.blake2b(side.text.encode(), digest_size=8)
        if side.image is not None:
            try:
                hasher.update(b"\0" + hashlib.blake2b(Path(side.image).read_bytes()).digest())
            except OSError as error:
                raise ValueError(f"cannot read the target image {side.image}: {error}") from error
        return int.from_bytes(hasher.digest(), "little", signed=True)

    return torch.tensor([digest(target) for target in targets], dtype=torch.long)
