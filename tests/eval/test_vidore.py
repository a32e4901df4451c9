"""ViDoRe-v2 harness: BEIR files and the hub's parquet layout, NDCG@5 end to end, the seven columns, errors."""

import csv
import json
import math

import datasets
import numpy as np
import pytest

from moca_fast.data import synthetic
from moca_fast.data.tokens import IMAGE_PLACEHOLDER
from moca_fast.eval import vidore
from moca_fast.prompts import DOCUMENT_PAGE_INSTRUCTION


def _gold_pages(folder):
    with open(folder / "qrels" / "test.tsv", newline="") as stream:
        return {row["query-id"]: row["corpus-id"] for row in csv.DictReader(stream, delimiter="\t")}


def test_read_beir_files(beir_data):
    dataset = vidore.read_dataset("SynPages", beir_data)
    assert len(dataset.queries) == 6 and len(dataset.corpus) == synthetic.N_PAGES
    assert all(not q.images and not q.text.startswith("Represent") for q in dataset.queries)
    assert all(d.text == IMAGE_PLACEHOLDER and len(d.images) == 1 for d in dataset.corpus)  # instructed when embedded
    assert (dataset.relevance.sum(axis=1) == 1).all()


def test_end_to_end_ndcg_at_5(embedder, beir_data, tmp_path, capsys):
    report = vidore.evaluate_vidore(embedder, beir_data.parent, cache_dir=tmp_path / "cache", model_id="tiny")
    # independently: rank of each query's one relevant page by cosine, NDCG@5 = 1 / log2(rank + 1) within 5
    queries = [json.loads(line) for line in (beir_data / "queries.jsonl").read_text().splitlines()]
    corpus = [json.loads(line) for line in (beir_data / "corpus.jsonl").read_text().splitlines()]
    gold = _gold_pages(beir_data)
    q = embedder.encode([row["text"] for row in queries])
    pages = embedder.encode(
        [{"text": DOCUMENT_PAGE_INSTRUCTION, "image": str(beir_data / row["image"])} for row in corpus]
    )
    result = report["datasets"]["SynPages"]
    assert result["ndcg@5"] == pytest.approx(_ndcg_at_5(q, pages, queries, corpus, gold), abs=1e-6)
    assert result["queries"] == 6 and result["corpus"] == synthetic.N_PAGES and result["column"] is None
    print(vidore.format_report(report))
    table = capsys.readouterr().out
    assert "SynPages" in table and "ViDoRe-v2 average (7 columns)" in table


def _ndcg_at_5(q, pages, queries, corpus, gold) -> float:
    """x100, each query's one relevant page ranked by cosine: 1 / log2(rank + 1) within 5."""
    expected = []
    for query, row in zip(q, queries):
        order = [corpus[j]["_id"] for j in np.argsort(-(pages @ query), kind="stable")]
        rank = order.index(gold[row["_id"]]) + 1
        expected.append(1 / math.log2(rank + 1) if rank <= 5 else 0.0)
    return 100 * float(np.mean(expected))


def test_each_input_gets_the_checkpoints_own_instructions(embedder, beir_data):
    """An embedder with ColQwen2.5's prompts (a ColQwen2.5 checkpoint's) is scored on what its queries and pages
    become under those prompts, not under MoCa's."""
    from moca_fast.embed import MocaEmbedder
    from moca_fast.model import colqwen

    colqwen_prompted = MocaEmbedder(embedder.model, embedder.processor, role_prompt=colqwen.role_prompt)
    report = vidore.evaluate_vidore(colqwen_prompted, beir_data.parent)
    queries = [json.loads(line) for line in (beir_data / "queries.jsonl").read_text().splitlines()]
    corpus = [json.loads(line) for line in (beir_data / "corpus.jsonl").read_text().splitlines()]
    q = embedder.encode([colqwen.QUERY_PREFIX + row["text"] + colqwen.QUERY_AUGMENTATION for row in queries])
    pages = embedder.encode([{"text": colqwen.VISUAL_PROMPT, "image": str(beir_data / r["image"])} for r in corpus])
    expected = _ndcg_at_5(q, pages, queries, corpus, _gold_pages(beir_data))
    assert report["datasets"]["SynPages"]["ndcg@5"] == pytest.approx(expected, abs=1e-6)


def test_hub_parquet_layout_scores_like_beir_files(embedder, beir_data, tmp_path):
    """The synthetic BEIR folder rewritten in the vidore/*_v2 parquet layout (integer ids, encoded images)."""
    hub = tmp_path / "vidore" / "esg_reports_v2"
    corpus = [json.loads(line) for line in (beir_data / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (beir_data / "queries.jsonl").read_text().splitlines()]
    doc_number = {row["_id"]: k for k, row in enumerate(corpus)}
    query_number = {row["_id"]: k for k, row in enumerate(queries)}
    parts = {
        "corpus": datasets.Dataset.from_dict(
            {
                "corpus-id": list(range(len(corpus))),
                "image": [{"bytes": (beir_data / row["image"]).read_bytes(), "path": None} for row in corpus],
            },
            features=datasets.Features({"corpus-id": datasets.Value("int64"), "image": datasets.Image()}),
        ),
        "queries": datasets.Dataset.from_dict(
            {
                "query-id": list(range(len(queries))),
                "query": [row["text"] for row in queries],
                "language": ["english"] * len(queries),
            }
        ),
        "qrels": datasets.Dataset.from_dict(
            {
                "query-id": [query_number[q] for q in _gold_pages(beir_data)],
                "corpus-id": [doc_number[d] for d in _gold_pages(beir_data).values()],
                "score": [1] * len(queries),
            }
        ),
    }
    for name, rows in parts.items():
        (hub / name).mkdir(parents=True)
        rows.to_parquet(str(hub / name / "test-00000-of-00001.parquet"))
    from_hub = vidore.evaluate_vidore(embedder, hub.parent)
    from_files = vidore.evaluate_vidore(embedder, beir_data)
    assert from_hub["columns"]["ESG syn multi"] == pytest.approx(from_files["datasets"]["SynPages"]["ndcg@5"])
    assert from_hub["datasets"]["esg_reports_v2"]["column"] == "ESG syn multi"


def test_seven_columns_and_their_average():
    names = [
        "esg_reports_human_labeled_v2",
        "esg_reports_eng_v2",
        "esg_reports_v2",
        "biomedical_lectures_eng_v2",
        "biomedical_lectures_v2",
        "economics_reports_eng_v2",
        "economics_reports_v2",
    ]
    results = {name: {"ndcg@5": 10.0 * k, "queries": 1, "corpus": 1} for k, name in enumerate(names)}
    report = vidore.summarize(results)
    assert list(report["columns"].values()) == [10.0 * k for k in range(7)]
    assert report["vidore_v2_average"] == pytest.approx(30.0)
    assert vidore.summarize(dict(list(results.items())[:6]))["vidore_v2_average"] is None


def test_errors_name_the_row(embedder, beir_data):
    page = beir_data / "images" / "page-003.png"
    page.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=r"ViDoRe SynPages corpus row 3 \(page-003\): cannot decode image file"):
        vidore.evaluate_vidore(embedder, beir_data)
    qrels = beir_data / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text() + "q-0000\tpage-999\t1\n")
    with pytest.raises(ValueError, match=r"ViDoRe SynPages qrels row 6: unknown corpus document 'page-999'"):
        vidore.read_dataset("SynPages", beir_data)


@pytest.mark.parametrize(
    "header, row, message",
    [
        ("query-id\tcorpus-id\n", "q-0000\tpage-000\n", r"test.tsv line 2: no 'score'"),
        ("query-id\tcorpus-id\tscore\n", "q-0000\tpage-000\t\n", r"test.tsv line 2: no 'score'"),
        ("query-id\tcorpus-id\tscore\n", "q-0000\tpage-000\thigh\n", r"test.tsv line 2: score 'high' is not a number"),
        ("query-id\tscore\n", "q-0000\t1\n", r"test.tsv line 2: no 'corpus-id'"),
    ],
)
def test_malformed_qrels_name_the_file_and_line(beir_data, header, row, message):
    (beir_data / "qrels" / "test.tsv").write_text(header + row)
    with pytest.raises(ValueError, match=message):
        vidore.read_dataset("SynPages", beir_data)


def test_queries_without_relevant_pages_are_left_out(beir_data):
    qrels = beir_data / "qrels" / "test.tsv"
    lines = qrels.read_text().splitlines(keepends=True)
    qrels.write_text("".join(lines[:-1]))  # the header and 5 of 6 judgements
    assert len(vidore.read_dataset("SynPages", beir_data).queries) == 5


def test_languages_scored_separately_and_averaged_as_mteb_does(embedder, beir_data, tmp_path, capsys):
    """Queries with a `language` get per-language NDCG@5 (each equal to scoring that language's queries alone) and
    their mean, beside the pooled score."""
    import shutil

    queries = [json.loads(line) for line in (beir_data / "queries.jsonl").read_text().splitlines()]
    languages = ["english", "french", "french", "english", "german", "french"]
    (beir_data / "queries.jsonl").write_text(
        "".join(json.dumps({**q, "language": lang}) + "\n" for q, lang in zip(queries, languages))
    )
    report = vidore.evaluate_vidore(embedder, beir_data)
    result = report["datasets"]["SynPages"]
    alone = {}
    for language in ("english", "french", "german"):
        folder = tmp_path / language
        shutil.copytree(beir_data, folder)
        (folder / "queries.jsonl").write_text(
            "".join(json.dumps(q) + "\n" for q, lang in zip(queries, languages) if lang == language)
        )
        qrels = [row for row in csv.DictReader(open(beir_data / "qrels" / "test.tsv"), delimiter="\t")]
        kept = {q["_id"] for q, lang in zip(queries, languages) if lang == language}
        (folder / "qrels" / "test.tsv").write_text(
            "query-id\tcorpus-id\tscore\n"
            + "".join(f"{r['query-id']}\t{r['corpus-id']}\t{r['score']}\n" for r in qrels if r["query-id"] in kept)
        )
        alone[language] = vidore.evaluate_vidore(embedder, folder)["datasets"][language]["ndcg@5"]
    assert {k: v["queries"] for k, v in result["languages"].items()} == {"english": 2, "french": 3, "german": 1}
    for language, score in alone.items():
        assert result["languages"][language]["ndcg@5"] == pytest.approx(score, abs=1e-6)
    assert result["ndcg@5_language_mean"] == pytest.approx(np.mean(list(alone.values())), abs=1e-6)
    assert report["average_language_mean"] == pytest.approx(result["ndcg@5_language_mean"])
    assert report["average"] == pytest.approx(result["ndcg@5"])  # pooled, as before
    print(vidore.format_report(report))
    assert "mean over languages" in capsys.readouterr().out
