"""MMEB harness: precision@1 per dataset, per meta-task, IND / OOD / overall, on local TIGER-Lab MMEB-eval data.

Data: `data/<dataset>/` holding parquet or JSON-lines files (the hub repository's layout), or `data/<dataset>.parquet`
/ `.jsonl`. Rows: `qry_text`, `qry_img_path`, `tgt_text` (list), `tgt_img_path` (list, or empty when every target
is text); candidate 0 is the gold one; `<|image_1|>` in a text marks its image, which is read from
`image_root / path`. A side without an image drops the marker, as the reference does. Instructions are already
in the rows. Identical candidates (same text and image) are embedded once per dataset; scores are cosines.
Embeddings are cached per dataset (eval/cache.py), so a rerun resumes. Means are unweighted, x100. Dataset names
outside the benchmark's 36 (e.g. the synthetic ones) are reported under their own name and count in `overall`
only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import numpy as np

from ..data.documents import open_rows
from ..data.pairs import mmeb_text
from ..embed import MocaEmbedder
from ..inputs import EmbedInput
from .cache import cached_embeddings, model_key
from .metrics import precision_at_1
from .selection import select_datasets
from .table import format_table

log = logging.getLogger(__name__)

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
# The 36 MMEB datasets: name -> (meta-task, IND for the 20 in-distribution ones, OOD for the 16 others).
MMEB_DATASETS: dict[str, tuple[str, str]] = {
    "ImageNet-1K": ("classification", "IND"),
    "N24News": ("classification", "IND"),
    "HatefulMemes": ("classification", "IND"),
    "VOC2007": ("classification", "IND"),
    "SUN397": ("classification", "IND"),
    "Place365": ("classification", "OOD"),
    "ImageNet-A": ("classification", "OOD"),
    "ImageNet-R": ("classification", "OOD"),
    "ObjectNet": ("classification", "OOD"),
    "Country211": ("classification", "OOD"),
    "OK-VQA": ("vqa", "IND"),
    "A-OKVQA": ("vqa", "IND"),
    "DocVQA": ("vqa", "IND"),
    "InfographicsVQA": ("vqa", "IND"),
    "ChartQA": ("vqa", "IND"),
    "Visual7W": ("vqa", "IND"),
    "ScienceQA": ("vqa", "OOD"),
    "VizWiz": ("vqa", "OOD"),
    "GQA": ("vqa", "OOD"),
    "TextVQA": ("vqa", "OOD"),
    "VisDial": ("retrieval", "IND"),
    "CIRR": ("retrieval", "IND"),
    "VisualNews_t2i": ("retrieval", "IND"),
    "VisualNews_i2t": ("retrieval", "IND"),
    "MSCOCO_t2i": ("retrieval", "IND"),
    "MSCOCO_i2t": ("retrieval", "IND"),
    "NIGHTS": ("retrieval", "IND"),
    "WebQA": ("retrieval", "IND"),
    "OVEN": ("retrieval", "OOD"),
    "FashionIQ": ("retrieval", "OOD"),
    "EDIS": ("retrieval", "OOD"),
    "Wiki-SS-NQ": ("retrieval", "OOD"),
    "MSCOCO": ("grounding", "IND"),
    "RefCOCO": ("grounding", "OOD"),
    "RefCOCO-Matching": ("grounding", "OOD"),
    "Visual7W-Pointing": ("grounding", "OOD"),
}
_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
_ROW_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass
class MmebDataset:
    """One dataset ready to embed: queries, unique candidates, and per query its candidates' indices (gold first)."""

    name: str
    queries: list[EmbedInput]
    candidates: list[EmbedInput]
    candidate_index: list[np.ndarray]


def find_datasets(data: Path, names: Sequence[str] | None = None) -> dict[str, Path]:
    """{dataset name: row source} for each dataset folder or row file directly under `data`."""
    found = {}
    for child in sorted(Path(data).iterdir()):
        if child.is_dir() and any(p.suffix in _ROW_SUFFIXES for p in child.iterdir()):
            found[child.name] = child
        elif child.is_file() and child.suffix in _ROW_SUFFIXES:
            found[child.stem] = child
    return select_datasets(found, names, data, "MMEB", "no MMEB dataset folders (parquet or JSON lines) found")


def read_dataset(name: str, source: Path, image_root: Path) -> MmebDataset:
    """Rows -> queries and deduplicated candidates; a missing field raises naming the row (a missing or corrupt
    image does when it is embedded)."""
    rows = open_rows(source)
    missing = [column for column in _COLUMNS if column not in rows.column_names]
    if missing:
        raise ValueError(f"MMEB {name} ({source}): no column {missing[0]!r}")
    queries, candidates, candidate_index, seen = [], [], [], {}
    for r, row in enumerate(rows.select_columns(list(_COLUMNS)).to_list()):
        where = f"MMEB {name} row {r}"
        texts, paths = row["tgt_text"], row["tgt_img_path"] or [""] * len(row["tgt_text"] or [])
        if not texts or len(texts) != len(paths):
            raise ValueError(f"{where}: {len(texts or [])} candidate texts and {len(paths)} candidate image paths")
        queries.append(_side(row["qry_text"], row["qry_img_path"], f"{where} query", image_root))
        index = []
        for j, (text, path) in enumerate(zip(texts, paths)):
            side = _side(text, path, f"{where} candidate {j}", image_root)
            key = (side.text, side.images)
            if key not in seen:
                seen[key] = len(candidates)
                candidates.append(side)
            index.append(seen[key])
        candidate_index.append(np.asarray(index))
    if not queries:
        raise ValueError(f"MMEB {name} ({source}): no rows")
    return MmebDataset(name, queries, candidates, candidate_index)


def _side(text, image_path, where: str, image_root: Path) -> EmbedInput:
    text, image = mmeb_text(text, image_path, where)
    # A missing file fails later, naming `where`.
    return EmbedInput(text, (str(image_root / image),) if image else (), where)


def evaluate_mmeb(
    embedder: MocaEmbedder,
    data: str | Path,
    *,
    image_root: str | Path | None = None,
    datasets: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    model_id: str = "",
    batch_tokens: int | None = None,
    progress: bool = False,
) -> dict:
    """Score every dataset under `data` (or those named); returns the report `summarize` makes."""
    data = Path(data)
    image_root = Path(image_root) if image_root is not None else data
    scores, sizes = {}, {}
    key = model_key(embedder) if cache_dir is not None else None  # once: it reads every weight
    for name, source in find_datasets(data, datasets).items():
        dataset = read_dataset(name, source, image_root)
        cache = Path(cache_dir) / name if cache_dir is not None else None
        embed = dict(model_key=key, model_id=model_id, batch_tokens=batch_tokens, progress=progress)
        queries = cached_embeddings(embedder, dataset.queries, cache and cache / "queries.npy", **embed)
        candidates = cached_embeddings(embedder, dataset.candidates, cache and cache / "candidates.npy", **embed)
        scores[name] = 100 * precision_at_1(
            [candidates[index] @ query for query, index in zip(queries, dataset.candidate_index)]
        )
        sizes[name] = (len(dataset.queries), len(dataset.candidates))
        log.info("MMEB %s: precision@1 %.1f (%d queries, %d unique candidates)", name, scores[name], *sizes[name])
    return summarize(scores, sizes)


def summarize(scores: dict[str, float], sizes: dict[str, tuple[int, int]] | None = None) -> dict:
    """Per-dataset scores (x100) -> the report: meta-task, IND and OOD means over the benchmark's datasets
    present, and the overall mean over every dataset scored."""

    def group_mean(predicate) -> float | None:
        values = [s for name, s in scores.items() if name in MMEB_DATASETS and predicate(*MMEB_DATASETS[name])]
        return mean(values) if values else None

    return {
        "metric": "precision@1 x100",
        "datasets": {
            name: {
                "score": score,
                "meta_task": MMEB_DATASETS.get(name, (None, None))[0],
                "split": MMEB_DATASETS.get(name, (None, None))[1],
                **(dict(zip(("queries", "candidates"), sizes[name])) if sizes else {}),
            }
            for name, score in scores.items()
        },
        "meta_tasks": {task: group_mean(lambda t, _, task=task: t == task) for task in META_TASKS},
        "IND": group_mean(lambda _, split: split == "IND"),
        "OOD": group_mean(lambda _, split: split == "OOD"),
        "overall": mean(scores.values()) if scores else None,
        "benchmark_datasets": f"{sum(name in MMEB_DATASETS for name in scores)} of {len(MMEB_DATASETS)}",
    }


def format_report(report: dict) -> str:
    per_dataset = [
        [name, d["meta_task"] or "-", d["split"] or "-", d.get("queries"), d["score"]]
        for name, d in report["datasets"].items()
    ]
    counts = {task: sum(t == task for t, _ in MMEB_DATASETS.values()) for task in META_TASKS}
    groups = [[f"{task} ({counts[task]})", report["meta_tasks"][task]] for task in META_TASKS] + [
        ["IND (20)", report["IND"]],
        ["OOD (16)", report["OOD"]],
        [f"overall ({len(report['datasets'])} scored)", report["overall"]],
    ]
    return (
        f"MMEB {report['metric']} ({report['benchmark_datasets']} benchmark datasets)\n"
        + format_table(["dataset", "meta-task", "split", "queries", "P@1"], per_dataset)
        + "\n\n"
        + format_table(["group", "P@1"], groups)
    )
