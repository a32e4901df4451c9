"""Stage-1 documents: every on-disk format round-trips; bad samples raise naming the sample, or are counted skips."""

import json
import logging
from collections import Counter

import datasets
import numpy as np
import pytest

from moca_fast.data.documents import Document, DocumentDataset, open_rows
from moca_fast.data.images import load_image
from moca_fast.data.synthetic import make_documents, png_bytes, write_documents
from moca_fast.data.tokens import IMAGE_PLACEHOLDER

PH = IMAGE_PLACEHOLDER


@pytest.fixture(scope="module")
def documents():
    docs = make_documents(12, seed=5)
    assert {len(d.images) for d in docs} >= {0, 1}  # text-only and interleaved samples both present
    return docs


@pytest.mark.parametrize("fmt, name", [("dataset", "docs"), ("parquet", "docs.parquet"), ("jsonl", "docs.jsonl")])
def test_documents_round_trip_through_every_format(documents, tmp_path, fmt, name):
    source = write_documents(documents, tmp_path / name, fmt)
    dataset = DocumentDataset(source)
    assert len(dataset) == len(documents) and not dataset.skipped
    for original, read in zip(documents, dataset):
        assert (read.id, read.text) == (original.id, original.text)
        for ours, theirs in zip(read.load_images(), original.images, strict=True):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(load_image(theirs, original.id)))


def test_a_folder_of_parquet_files_is_one_source(documents, tmp_path):
    write_documents(documents[:5], tmp_path / "shards" / "a.parquet", "parquet")
    write_documents(documents[5:], tmp_path / "shards" / "b.parquet", "parquet")
    assert [d.id for d in DocumentDataset(tmp_path / "shards")] == [d.id for d in documents]


def test_hf_image_dicts_in_a_dataset_dict_without_ids(documents, tmp_path, make_image):
    features = datasets.Features({"text": datasets.Value("string"), "images": datasets.List(datasets.Image())})
    rows = {"text": [f"a {PH} b", "no image"], "images": [[{"bytes": png_bytes(make_image(9, 11)), "path": None}], []]}
    splits = datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows, features=features)})
    splits.save_to_disk(str(tmp_path / "dd"))
    dataset = DocumentDataset(tmp_path / "dd", split="validation")
    first = dataset[0]
    assert first.id == f"{tmp_path / 'dd'}#0" and isinstance(first.images[0], bytes)
    assert first.load_images()[0].size == (11, 9)
    with pytest.raises(ValueError, match="has no split 'train'"):
        DocumentDataset(tmp_path / "dd")


def _jsonl(tmp_path, records):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"id": "bad", "text": f"{PH}{PH}", "images": ["x.png"]}, "placeholder/image count mismatch"),
        ({"id": "bad", "text": "plain", "images": ["x.png"]}, "placeholder/image count mismatch"),
        ({"id": "bad", "images": []}, "missing field 'text'"),
        ({"id": "bad", "text": "plain"}, "missing field 'images'"),
    ],
)
def test_invalid_samples_raise_naming_the_sample(tmp_path, record, problem):
    source = _jsonl(tmp_path, [{"id": "good", "text": "fine", "images": []}, record])
    with pytest.raises(ValueError, match=f"sample bad: {problem}"):
        DocumentDataset(source)


def test_skip_invalid_counts_and_logs_every_skip(tmp_path, caplog):
    records = [
        {"id": "ok0", "text": f"{PH}", "images": ["a.png"]},
        {"id": "m1", "text": f"{PH}{PH}", "images": ["a.png"]},
        {"id": "ok2", "text": "text only", "images": []},
        {"id": "m3", "text": "no placeholder", "images": ["a.png"]},
        {"id": "t4", "images": []},
        {"id": "i5", "text": "text"},
    ]
    with caplog.at_level(logging.WARNING, logger="moca_fast.data.documents"):
        dataset = DocumentDataset(_jsonl(tmp_path, records), skip_invalid=True)
    assert [d.id for d in dataset] == ["ok0", "ok2"]
    assert dataset.skipped == Counter(
        {"placeholder/image count mismatch": 2, "missing field 'text'": 1, "missing field 'images'": 1}
    )
    assert "skipped 4 of 6 documents" in caplog.text and "sample m1" in caplog.text


def test_missing_column_is_an_error_even_when_skipping(tmp_path):
    with pytest.raises(ValueError, match="no column 'images'"):
        DocumentDataset(_jsonl(tmp_path, [{"id": "a", "text": "t"}]), skip_invalid=True)


def test_corrupt_bytes_and_missing_files_name_the_sample(tmp_path, documents):
    corrupt = Document("doc-corrupt", PH, [b"\x89PNG garbage"])
    write_documents([corrupt], tmp_path / "c.parquet", "parquet")
    with pytest.raises(ValueError, match="sample doc-corrupt: cannot decode image bytes"):
        DocumentDataset(tmp_path / "c.parquet")[0].load_images()

    with_image = next(d for d in documents if d.images)
    source = write_documents([with_image], tmp_path / "j" / "docs.jsonl", "jsonl")
    (tmp_path / "j" / "images" / f"{with_image.id}-0.png").unlink()
    with pytest.raises(ValueError, match=f"sample {with_image.id}: image file not found"):
        DocumentDataset(source)[0].load_images()


def test_relative_image_paths_resolve_against_image_dir(tmp_path, documents):
    with_image = next(d for d in documents if d.images)
    source = write_documents([with_image], tmp_path / "rows" / "docs.jsonl", "jsonl")
    (tmp_path / "store").mkdir()
    (tmp_path / "rows" / "images").rename(tmp_path / "store" / "images")
    with pytest.raises(ValueError, match="image file not found"):  # default root: the folder of the rows file
        DocumentDataset(source)[0].load_images()
    document = DocumentDataset(source, image_dir=tmp_path / "store")[0]
    assert document.images[0] == str(tmp_path / "store" / "images" / f"{with_image.id}-0.png")
    assert len(document.load_images()) == len(with_image.images)


def test_unrecognised_or_missing_local_sources_are_errors_not_hub_lookups(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a saved dataset"):
        open_rows(tmp_path)
    for missing in (tmp_path / "gone", "gone.parquet", "./gone"):
        with pytest.raises(ValueError, match="no such file or folder"):
            open_rows(missing)


@pytest.mark.parametrize("escape", ["../secret.png", "/etc/hostname", "images/../../secret.png"])
def test_image_paths_must_stay_in_the_image_folder(tmp_path, escape):
    source = _jsonl(tmp_path, [{"id": "a", "text": PH, "images": [escape]}])
    with pytest.raises(ValueError, match=f"sample a: image path '{escape}' leaves the image folder"):
        DocumentDataset(source)[0]
    assert DocumentDataset(source, allow_image_paths_outside=True)[0].images == [str(tmp_path / escape)]
