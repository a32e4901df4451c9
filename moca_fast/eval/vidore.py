"""ViDoRe-v2 harness: NDCG@5 (and NDCG@10, recall@1/5/10) on local BEIR-format data, the seven ViDoRe-v2 columns.

A dataset folder holds queries, corpus and qrels in either layout:
  BEIR files           queries.jsonl {_id, text}; corpus.jsonl {_id, title, text, image (path relative to the
                       folder)}; qrels/<split>.tsv (query-id, corpus-id, score; header row)
  the hub's parquet    queries/, corpus/, qrels/ folders of parquet files (the vidore/*_v2 repositories):
                       query-id + query; corpus-id + image (encoded); query-id, corpus-id, score
`data` is one such folder or a folder of them. A corpus entry with an image is a page; one without is a plain text
target (title and text). Each input gets the checkpoint's instruction as a query or a document: for MoCa, the
reference's document-page prompt on pages and none on text targets and queries; a ColQwen2.5 its own prompts.
Queries without a relevant document in the qrels are left out (counted, logged), as BEIR does. Scores are
cosines over the whole corpus. Queries that carry a `language` (the hub's multilingual sets) are also scored per
language: mteb, hence the public leaderboard, scores each language as its own subset and averages them, so the
report gives both the pooled NDCG@5 and the mean over languages (`*_language_mean`).
A checkpoint with a multi-vector head (its config declares one) is scored by MaxSim over its token vectors
(moca_fast/eval/late_interaction.py) instead of cosines; each dataset's report says which (`scoring`).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import numpy as np

from ..data.documents import open_rows
from ..data.tokens import IMAGE_PLACEHOLDER
from ..embed import MocaEmbedder
from ..inputs import EmbedInput, with_instructions
from .cache import cached_embeddings, model_key
from .late_interaction import maxsim_scores
from .metrics import ndcg_at_k, recall_at_k
from .selection import select_datasets
from .table import format_table

log = logging.getLogger(__name__)

# The seven ViDoRe-v2 columns of the paper's table: dataset folder names (the hub's current and earlier repository
# names) -> column.
VIDORE_V2_COLUMNS: dict[str, str] = {
    "esg_reports_human_labeled_v2": "ESG human",
    "restaurant_esg_reports_beir": "ESG human",
    "esg_reports_eng_v2": "ESG syn en",
    "synthetic_rse_restaurant_filtered_v1.0": "ESG syn en",
    "esg_reports_v2": "ESG syn multi",
    "synthetic_rse_restaurant_filtered_v1.0_multilingual": "ESG syn multi",
    "biomedical_lectures_eng_v2": "Bio en",
    "synthetic_mit_biomedical_tissue_interactions_unfiltered": "Bio en",
    "biomedical_lectures_v2": "Bio multi",
    "synthetic_mit_biomedical_tissue_interactions_unfiltered_multilingual": "Bio multi",
    "economics_reports_eng_v2": "Econ en",
    "synthetics_economics_macro_economy_2024_filtered_v1.0": "Econ en",
    "economics_reports_v2": "Econ multi",
    "synthetics_economics_macro_economy_2024_filtered_v1.0_multilingual": "Econ multi",
}
COLUMNS = ("ESG human", "ESG syn en", "ESG syn multi", "Bio en", "Bio multi", "Econ en", "Econ multi")
CUTOFFS = (1, 5, 10)


@dataclass
class BeirDataset:
    name: str
    queries: list[EmbedInput]
    corpus: list[EmbedInput]
    relevance: np.ndarray  # [Q, D] graded relevance, 0 where not relevant
    languages: list[str | None]  # each query's language, where the data names it


def find_datasets(data: Path, names: Sequence[str] | None = None) -> dict[str, Path]:
    """{name: folder}: `data` itself when it is a BEIR folder, else each BEIR folder directly under it."""
    data = Path(data)
    found = (
        {data.name: data}
        if _is_beir(data)
        else {child.name: child for child in sorted(data.iterdir()) if child.is_dir() and _is_beir(child)}
    )
    return select_datasets(found, names, data, "BEIR", "no BEIR dataset (queries, corpus and qrels) found")


def _is_beir(folder: Path) -> bool:
    return all(_part(folder, part) is not None for part in ("queries", "corpus")) and (folder / "qrels").is_dir()


def _part(folder: Path, part: str) -> Path | None:
    for candidate in (folder / f"{part}.jsonl", folder / part):
        if candidate.exists():
            return candidate
    return None


def _field(record: dict, names: tuple[str, ...], where: str):
    for name in names:
        if record.get(name) is not None:
            return record[name]
    raise ValueError(f"{where}: missing field {names[0]!r}")


def read_dataset(name: str, folder: Path, split: str = "test") -> BeirDataset:
    """Queries, corpus and qrels -> inputs (as the data holds them: a page is its image alone, each input gets its
    instruction where it is embedded) and a relevance matrix; bad rows raise naming the row."""
    import datasets  # only reading from files needs it

    rows = open_rows(_part(folder, "corpus"))
    if isinstance(rows.features.get("image"), datasets.Image):  # keep pages encoded: workers decode them
        rows = rows.cast_column("image", datasets.Image(decode=False))
    corpus, doc_ids = [], {}
    for r, record in enumerate(rows.to_list()):
        where = f"ViDoRe {name} corpus row {r}"
        doc_id = str(_field(record, ("_id", "corpus-id"), where))
        doc_ids[doc_id] = len(corpus)
        corpus.append(_document(record, folder, f"{where} ({doc_id})"))
    query_ids, queries, languages = {}, [], []
    for r, record in enumerate(open_rows(_part(folder, "queries")).to_list()):
        where = f"ViDoRe {name} query row {r}"
        query_ids[str(_field(record, ("_id", "query-id"), where))] = len(queries)
        queries.append(EmbedInput(str(_field(record, ("text", "query"), where)), (), where))
        languages.append(record.get("language"))
    relevance = np.zeros((len(queries), len(corpus)), dtype=np.float32)
    for r, (query_id, doc_id, score) in enumerate(_qrels(folder / "qrels", split)):
        where = f"ViDoRe {name} qrels row {r}"
        if query_id not in query_ids or doc_id not in doc_ids:
            unknown = f"query {query_id!r}" if query_id not in query_ids else f"corpus document {doc_id!r}"
            raise ValueError(f"{where}: unknown {unknown}")
        relevance[query_ids[query_id], doc_ids[doc_id]] = score
    judged = relevance.max(axis=1) > 0
    if not judged.any():
        raise ValueError(f"ViDoRe {name}: no query has a relevant document in the {split} qrels")
    if not judged.all():
        log.info(
            "ViDoRe %s: %d of %d queries have no relevant document and are left out",
            name,
            int((~judged).sum()),
            len(queries),
        )
    return BeirDataset(
        name,
        [q for q, keep in zip(queries, judged) if keep],
        corpus,
        relevance[judged],
        [language for language, keep in zip(languages, judged) if keep],
    )


def instructed(dataset: BeirDataset, role_prompt) -> tuple[list[EmbedInput], list[EmbedInput]]:
    """The dataset's queries and corpus with a checkpoint's instructions (`role_prompt`, as MocaEmbedder.role_prompt):
    MoCa's (text queries bare, pages the document-page instruction) or its own (a ColQwen2.5's query prefix and
    augmentation, its visual prompt)."""
    queries = with_instructions(dataset.queries, role="query", role_prompt=role_prompt)
    corpus = with_instructions(dataset.corpus, role="document", document_pages=True, role_prompt=role_prompt)
    return queries, corpus


def _document(record: dict, folder: Path, where: str) -> EmbedInput:
    image = record.get("image")
    if isinstance(image, str) and image:
        image = str(folder / image)  # a missing file fails naming `where` when the corpus is embedded
    if image:
        return EmbedInput(IMAGE_PLACEHOLDER, (image,), where)
    text = " ".join(part for part in (record.get("title"), record.get("text")) if part)
    if not text:
        raise ValueError(f"{where}: neither an image nor text")
    return EmbedInput(text, (), where)


def _qrels(folder: Path, split: str):
    """(query id, corpus id, score) rows from qrels/<split>.tsv, or from the parquet / JSON-lines files there."""
    tsv = folder / f"{split}.tsv"
    if tsv.is_file():
        try:
            with tsv.open(newline="", encoding="utf-8") as stream:
                rows = list(csv.DictReader(stream, delimiter="\t"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{tsv}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        source, first = tsv, 2  # line 1 is the header
    else:
        source, rows, first = folder, open_rows(folder).to_list(), 0
    for number, row in enumerate(rows, start=first):
        where = f"{source} {'line' if first else 'row'} {number}"
        missing = [name for name in ("query-id", "corpus-id", "score") if row.get(name) in (None, "")]
        if missing:
            raise ValueError(f"{where}: no {missing[0]!r} (a qrels row has query-id, corpus-id and score)")
        try:
            score = float(row["score"])
        except ValueError:
            raise ValueError(f"{where}: score {row['score']!r} is not a number") from None
        yield str(row["query-id"]), str(row["corpus-id"]), score


def evaluate_vidore(
    embedder: MocaEmbedder,
    data: str | Path,
    *,
    split: str = "test",
    datasets: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    model_id: str = "",
    batch_tokens: int | None = None,
    progress: bool = False,
) -> dict:
    """Score every BEIR dataset under `data` (or those named); returns the report `summarize` makes."""
    results = {}
    key = model_key(embedder) if cache_dir is not None else None  # once: it reads every weight
    output = "pooled" if embedder.multi_vector_dim is None else "multi_vector"  # the checkpoint decides
    for name, folder in find_datasets(Path(data), datasets).items():
        dataset = read_dataset(name, folder, split)
        cache = Path(cache_dir) / name if cache_dir is not None else None
        embed = dict(model_key=key, model_id=model_id, batch_tokens=batch_tokens, progress=progress, output=output)
        queries, corpus = instructed(dataset, embedder.role_prompt)
        queries = cached_embeddings(embedder, queries, cache and cache / "queries.npy", **embed)
        corpus = cached_embeddings(embedder, corpus, cache and cache / "corpus.npy", **embed)
        scores = queries @ corpus.T if output == "pooled" else maxsim_scores(queries, corpus)
        ndcg5 = ndcg_at_k(scores, dataset.relevance, 5)
        metrics = {
            "ndcg@5": 100 * float(ndcg5.mean()),
            "ndcg@10": 100 * float(ndcg_at_k(scores, dataset.relevance, 10).mean()),
        }
        metrics |= {f"recall@{k}": 100 * float(recall_at_k(scores, dataset.relevance, k).mean()) for k in CUTOFFS}
        results[name] = metrics | {
            "queries": len(dataset.queries),
            "corpus": len(dataset.corpus),
            "scoring": "cosine" if output == "pooled" else "MaxSim",
        }
        if any(language is not None for language in dataset.languages):
            languages = np.array([str(language) for language in dataset.languages])
            per_language = {
                str(language): {
                    "ndcg@5": 100 * float(ndcg5[languages == language].mean()),
                    "queries": int((languages == language).sum()),
                }
                for language in sorted(set(languages))
            }
            results[name] |= {
                "languages": per_language,
                "ndcg@5_language_mean": mean(v["ndcg@5"] for v in per_language.values()),
            }
        log.info(
            "ViDoRe %s: NDCG@5 %.1f (%d queries, %d documents)",
            name,
            metrics["ndcg@5"],
            len(dataset.queries),
            len(dataset.corpus),
        )
    return summarize(results)


def summarize(results: dict[str, dict]) -> dict:
    """Per-dataset metrics -> the report: each ViDoRe-v2 column's NDCG@5, their average when all seven are
    there, and the average over every dataset scored; each pooled over languages and, as mteb and the public
    leaderboard score them, as the mean over languages (a dataset without languages counts pooled there)."""

    def report(score: str) -> tuple[dict, float | None, float | None]:
        columns = {
            VIDORE_V2_COLUMNS[name]: r.get(score, r["ndcg@5"])
            for name, r in results.items()
            if name in VIDORE_V2_COLUMNS
        }
        return (
            {column: columns.get(column) for column in COLUMNS},
            mean(columns.values()) if len(columns) == len(COLUMNS) else None,
            mean(r.get(score, r["ndcg@5"]) for r in results.values()) if results else None,
        )

    pooled, by_language = report("ndcg@5"), report("ndcg@5_language_mean")
    return {
        "metric": "ndcg@5 x100",
        "datasets": {name: r | {"column": VIDORE_V2_COLUMNS.get(name)} for name, r in results.items()},
        "columns": pooled[0],
        "vidore_v2_average": pooled[1],
        "average": pooled[2],
        "columns_language_mean": by_language[0],
        "vidore_v2_average_language_mean": by_language[1],
        "average_language_mean": by_language[2],
    }


def format_report(report: dict) -> str:
    rows = [
        [name, d["column"] or "-", d["queries"], d["corpus"], d["ndcg@5"], d["ndcg@10"], d["recall@5"]]
        for name, d in report["datasets"].items()
    ]
    columns = [[column, score, report["columns_language_mean"][column]] for column, score in report["columns"].items()]
    columns += [
        ["ViDoRe-v2 average (7 columns)", report["vidore_v2_average"], report["vidore_v2_average_language_mean"]],
        [f"average ({len(report['datasets'])} scored)", report["average"], report["average_language_mean"]],
    ]
    languages = [
        [name, language, v["queries"], v["ndcg@5"]]
        for name, d in report["datasets"].items()
        for language, v in d.get("languages", {}).items()
    ]
    text = (
        "ViDoRe "
        + report["metric"]
        + "\n"
        + format_table(["dataset", "column", "queries", "corpus", "NDCG@5", "NDCG@10", "R@5"], rows)
        + "\n\n"
        + format_table(["column", "NDCG@5 pooled", "NDCG@5 mean over languages"], columns)
    )
    return text + ("\n\n" + format_table(["dataset", "language", "queries", "NDCG@5"], languages) if languages else "")
