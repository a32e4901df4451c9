"""Stage-2 data: query / positive / hard-negative pairs from reference-format rows, task batches, duplicate targets.

Rows (one source per task, i.e. per subset; any source `documents.open_rows` reads, or a list of row dicts in
memory): `qry`, `qry_image_path`, `pos_text`, `pos_image_path`, and optionally `neg_text`, `neg_image_path` (lists,
or strings holding a list literal, which is how the reference data stores them). `<|image_1|>` in a text marks
its image and becomes IMAGE_PLACEHOLDER; an empty image path makes a text-only side, and a marker in its text is
dropped, as the reference does. Relative image paths resolve against `image_dir` (default: the folder holding the
source; rows in memory need it). Every row is checked when the dataset opens (`PairDataset`): a missing field, a
bad negative list, an image without exactly one marker in its text, an image path leaving the image folder or
naming no file, or a row without hard negatives among rows with them is a ValueError naming the row, or a
counted, logged skip.

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
import logging
import os
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checksums import file_checksum
from .documents import open_rows, resolve_image_path, source_folder
from .skips import Skips
from .tokens import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

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
        if not (
            isinstance(node, ast.List)
            and all(isinstance(item, ast.Constant) and isinstance(item.value, str) for item in node.elts)
        ):
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
        raise ValueError(
            f"{where} has an image, but its text has {text.count(IMAGE_PLACEHOLDER)} image markers instead of 1"
        )
    return text, image_path


def pair_from_row(
    row: Mapping,
    *,
    row_id: str,
    task: str,
    image_dir: Path | None = None,
    negative_ratio: int = NEGATIVE_RATIO,
    seed: int = 0,
    allow_outside: bool = False,
) -> Pair:
    """Normalise one reference-format row; every error names `row_id`. Image paths must stay in `image_dir`
    unless `allow_outside`."""
    where = f"row {row_id}"
    for field in _REQUIRED_FIELDS:
        if row.get(field) is None:
            raise ValueError(f"{where}: missing field {field!r}")

    def side(text, image_path, role: str) -> Side:
        text, image = mmeb_text(text, image_path, f"{where}: the {role}")
        if not image:
            return Side(text, None)
        try:
            return Side(text, resolve_image_path(image, image_dir, allow_outside))
        except ValueError as error:
            raise ValueError(f"{where}: the {role}: {error}") from error

    negatives = _hard_negatives(row, where, row_id, negative_ratio, seed) if negative_ratio > 0 else []
    return Pair(
        row_id,
        task,
        side(row["qry"], row["qry_image_path"], "query"),
        side(row["pos_text"], row["pos_image_path"], "positive"),
        [side(text, path, f"negative {k}") for k, (text, path) in enumerate(negatives)],
    )


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
    """Map-style dataset of `Pair`s over one row source per task; `tasks[i]` is the task of item i.

    Every row is checked when the dataset opens (fields, negative lists, image markers, image paths inside the
    image folder and present): no image is decoded then. Within a task, rows must carry the same number of hard
    negatives (one batch holds one count): rows without any, in a task whose other rows have some, are invalid.
    An invalid row raises a ValueError naming it; with `skip_invalid` it is left out, logged and counted per
    reason in `skipped`. `negatives_per_task` gives each task's count; `fingerprint` digests the pairs and the bytes
    of every image they name (read once, when the dataset opens)."""

    def __init__(
        self,
        subsets: Mapping[str, str | Path | Sequence[Mapping]],
        *,
        split: str = "train",
        image_dir: str | Path | None = None,
        negative_ratio: int = NEGATIVE_RATIO,
        seed: int = 0,
        skip_invalid: bool = False,
        allow_image_paths_outside: bool = False,
    ):
        self.negative_ratio, self.seed, self.allow_outside = negative_ratio, seed, allow_image_paths_outside
        self._subsets = []
        for task, source in subsets.items():  # rows in memory need no reader (nor `datasets`)
            on_disk = isinstance(source, (str, Path))
            rows = open_rows(source, split=split) if on_disk else source
            label = source if on_disk else f"the rows of task {task!r}"
            if len(rows) == 0:
                raise ValueError(f"{label}: no rows for the task {task!r} (remove the file or fill it)")
            folder = Path(image_dir) if image_dir is not None else source_folder(source) if on_disk else None
            self._subsets.append((task, label, rows, folder))
        self.skipped = Skips(log, "pair")
        self._index: list[tuple[int, int]] = []  # (subset, row) of each kept pair
        self.negatives_per_task: dict[str, int] = {}
        digest, images = hashlib.blake2b(digest_size=16), set()
        for k, (task, source, rows, _) in enumerate(self._subsets):
            kept, counts = [], []
            for r, row in enumerate(rows):
                try:
                    pair = self._pair(k, r, row)
                    _check_images_exist(pair)
                except ValueError as error:
                    self._invalid(source, "invalid row", str(error), skip_invalid)
                    continue
                kept.append(r)
                counts.append(len(pair.negatives))
                digest.update(repr(pair).encode())
                images.update(side.image for side in (pair.query, pair.positive, *pair.negatives) if side.image)
            most = max(counts, default=0)
            for r, count in zip(kept, counts):
                if count == most:
                    self._index.append((k, r))
                else:
                    self._invalid(
                        source,
                        "no hard negatives",
                        f"row {task}#{r}: no hard negatives, but the other "
                        f"rows of task {task!r} have {most} (a batch needs one count)",
                        skip_invalid,
                    )
            if kept:
                self.negatives_per_task[task] = most
            else:
                log.warning("%s: every row was skipped: no pairs for the task %r", source, task)
        if not self._index:
            raise ValueError(f"no valid pairs in {', '.join(str(s) for _, s, _, _ in self._subsets)}")
        self.tasks = [self._subsets[k][0] for k, _ in self._index]
        for path in sorted(images):  # the pixels too: images rewritten at the same paths are other data
            digest.update(f"{path}\0{file_checksum(path)}".encode())
        self.fingerprint = digest.hexdigest()
        if self.skipped:
            log.warning(
                "skipped %d invalid pairs of %d: %s",
                self.skipped.total(),
                self.skipped.total() + len(self._index),
                dict(self.skipped),
            )

    def _pair(self, k: int, row: int, record: Mapping | None = None) -> Pair:
        task, _, rows, image_dir = self._subsets[k]
        return pair_from_row(
            rows[row] if record is None else record,
            row_id=f"{task}#{row}",
            task=task,
            image_dir=image_dir,
            negative_ratio=self.negative_ratio,
            seed=self.seed,
            allow_outside=self.allow_outside,
        )

    def _invalid(self, source, reason: str, detail: str, skip: bool) -> None:
        if not skip:
            raise ValueError(f"{source}: {detail}; set skip_invalid to skip such rows")
        self.skipped.add(reason, f"{source}: {detail}")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Pair:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range for {len(self)} pairs")
        return self._pair(*self._index[index])


def _check_images_exist(pair: Pair) -> None:
    for role, side in [
        ("query", pair.query),
        ("positive", pair.positive),
        *((f"negative {k}", n) for k, n in enumerate(pair.negatives)),
    ]:
        if side.image is not None and not os.path.isfile(side.image):
            raise ValueError(f"row {pair.id}: the {role}: image file not found: {side.image}")


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
        batches += [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
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
