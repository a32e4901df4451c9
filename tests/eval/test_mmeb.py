"""MMEB harness: the benchmark's table, reading rows, end to end on synthetic data, resuming, errors naming rows."""

import json
import os

import numpy as np
import pytest
import torch

from moca_fast.data.tokens import IMAGE_PLACEHOLDER
from moca_fast.eval import mmeb
from moca_fast.eval.metrics import precision_at_1


def test_the_36_datasets_and_their_groups():
    groups = list(mmeb.MMEB_DATASETS.values())
    assert len(groups) == 36
    assert {task: sum(t == task for t, _ in groups) for task in mmeb.META_TASKS} == {
        "classification": 10,
        "vqa": 10,
        "retrieval": 12,
        "grounding": 4,
    }
    assert sum(split == "IND" for _, split in groups) == 20 and sum(split == "OOD" for _, split in groups) == 16


def test_summarize_means_are_unweighted_and_grouped():
    scores = {name: float(k) for k, name in enumerate(mmeb.MMEB_DATASETS)} | {"SynT2I": 100.0}
    report = mmeb.summarize(scores)
    by = lambda pred: np.mean([scores[n] for n, g in mmeb.MMEB_DATASETS.items() if pred(*g)])
    for task in mmeb.META_TASKS:
        assert report["meta_tasks"][task] == pytest.approx(by(lambda t, _, task=task: t == task))
    assert report["IND"] == pytest.approx(by(lambda _, s: s == "IND"))
    assert report["OOD"] == pytest.approx(by(lambda _, s: s == "OOD"))
    assert report["overall"] == pytest.approx(np.mean(list(scores.values())))
    assert report["datasets"]["SynT2I"]["meta_task"] is None and report["benchmark_datasets"] == "36 of 36"


def test_read_dataset_dedups_candidates_and_marks_images(mmeb_data):
    vqa = mmeb.read_dataset("SynVQA", mmeb_data / "SynVQA", mmeb_data)
    assert len(vqa.queries) == 3 and all(
        q.text.startswith(IMAGE_PLACEHOLDER) and len(q.images) == 1 for q in vqa.queries
    )
    n_listed = sum(len(index) for index in vqa.candidate_index)
    assert len(vqa.candidates) == len({(c.text, c.images) for c in vqa.candidates}) <= n_listed
    t2i = mmeb.read_dataset("SynT2I", mmeb_data / "SynT2I", mmeb_data)
    assert all(not q.images and "<|image_1|>" not in q.text for q in t2i.queries)
    gold = t2i.candidates[t2i.candidate_index[1][0]]
    assert gold.id == "MMEB SynT2I row 1 candidate 0" and gold.images[0].endswith("000001-c0.png")


def test_end_to_end_with_cache_and_resume(embedder, mmeb_data, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    report = mmeb.evaluate_mmeb(embedder, mmeb_data, cache_dir=cache, model_id="tiny")
    assert set(report["datasets"]) == {"SynI2T", "SynT2I", "SynVQA"} and report["IND"] is None
    # the score, recomputed without the harness's dedup and cache: every candidate of every row embedded
    dataset = mmeb.read_dataset("SynVQA", mmeb_data / "SynVQA", mmeb_data)
    queries = embedder.encode(dataset.queries)
    expected = precision_at_1(
        [
            embedder.encode([dataset.candidates[j] for j in index]) @ q
            for q, index in zip(queries, dataset.candidate_index)
        ]
    )
    assert report["datasets"]["SynVQA"]["score"] == pytest.approx(100 * expected)
    print(mmeb.format_report(report))
    table = capsys.readouterr().out
    assert "SynVQA" in table and "overall (3 scored)" in table and "IND (20)" in table
    json.dumps(report)

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(embedder, "encode", fail)
    assert mmeb.evaluate_mmeb(embedder, mmeb_data, cache_dir=cache, model_id="tiny") == report
    # the key is the weights, not the name: the same weights under another name use the cache
    assert mmeb.evaluate_mmeb(embedder, mmeb_data, cache_dir=cache, model_id="renamed") == report
    weight = embedder.model.language_model.norm.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)  # other weights: recomputed
    try:
        with pytest.raises(AssertionError, match="cache should have been used"):
            mmeb.evaluate_mmeb(embedder, mmeb_data, cache_dir=cache, model_id="tiny")
    finally:
        with torch.no_grad():
            weight.copy_(original)  # the embedder is shared by other tests
    # the key holds the images' bytes: one image rewritten at its path (its old mtime put back) is recomputed
    from PIL import Image, ImageOps

    image = sorted(mmeb_data.rglob("*.png"))[0]
    stamp = image.stat()
    ImageOps.invert(Image.open(image).convert("RGB")).save(image)
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with pytest.raises(AssertionError, match="cache should have been used"):
        mmeb.evaluate_mmeb(embedder, mmeb_data, cache_dir=cache, model_id="tiny")


def test_corrupt_and_missing_images_name_the_row(embedder, mmeb_data):
    image = mmeb_data / "images" / "SynT2I" / "000001-c2.png"
    image.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="MMEB SynT2I row 1 candidate 2: cannot decode image file"):
        mmeb.evaluate_mmeb(embedder, mmeb_data, datasets=["SynT2I"])
    image.unlink()
    with pytest.raises(ValueError, match="MMEB SynT2I row 1 candidate 2: image file not found"):
        mmeb.evaluate_mmeb(embedder, mmeb_data, datasets=["SynT2I"])


def test_bad_rows_and_sources_are_named(tmp_path, mmeb_data):
    row = {"qry_text": "<|image_1|>query", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]}
    rows = [row, row | {"qry_text": "no marker", "qry_img_path": "images/x.png"}]
    (tmp_path / "Custom.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="MMEB Custom row 1 query has an image, but its text has 0 image markers"):
        mmeb.read_dataset("Custom", tmp_path / "Custom.jsonl", tmp_path)
    (tmp_path / "Uneven.jsonl").write_text(json.dumps(row | {"tgt_img_path": [""]}) + "\n")
    with pytest.raises(ValueError, match="MMEB Uneven row 0: 2 candidate texts and 1 candidate image paths"):
        mmeb.read_dataset("Uneven", tmp_path / "Uneven.jsonl", tmp_path)
    (tmp_path / "NoTargets.jsonl").write_text(json.dumps({"qry_text": "q", "qry_img_path": ""}) + "\n")
    with pytest.raises(ValueError, match="MMEB NoTargets .*: no column 'tgt_text'"):
        mmeb.read_dataset("NoTargets", tmp_path / "NoTargets.jsonl", tmp_path)
    assert set(mmeb.find_datasets(tmp_path)) == {"Custom", "Uneven", "NoTargets"}
    with pytest.raises(ValueError, match=r"no MMEB data for \['ImageNet-1K'\]"):
        mmeb.find_datasets(mmeb_data, ["ImageNet-1K"])
