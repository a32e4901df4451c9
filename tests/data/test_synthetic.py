"""The synthetic world: deterministic by seed, one-attribute hard negatives, and the real on-disk formats."""

import json
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from moca_fast.data.documents import DocumentDataset, open_rows
from moca_fast.data.images import load_image
from moca_fast.data.pairs import MMEB_IMAGE_TOKEN, PairDataset
from moca_fast.data.synthetic import (
    ATTRIBUTES,
    COLOUR_RGB,
    IMAGE_SIZE,
    N_CANDIDATES,
    N_PAGES,
    TASKS,
    Page,
    Scene,
    make_documents,
    make_pairs,
    pair_rows,
    pair_sides,
    render,
    write_world,
)
from moca_fast.data.tokens import IMAGE_PLACEHOLDER

# The reference's exact prompts, once the MMEB image marker becomes the placeholder triple.
T2I = "Find me an everyday image that matches the given caption: {}\n"
IMAGE_QUESTION = IMAGE_PLACEHOLDER + "Represent the given image with the following question: {}\n"
IMAGE_TARGET = IMAGE_PLACEHOLDER + "Represent the given image.\n"
PAGE_TARGET = IMAGE_PLACEHOLDER + "\nRepresent the given document image."


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), seed=11, n_documents=16, n_pairs_per_task=6, n_eval_queries=10)


def differing(a, b) -> list[str]:
    if isinstance(a, Page):
        facts = [f"fact {k}" for k, (x, y) in enumerate(zip(a.facts, b.facts)) if x != y]
        return ["title"] * (a.title != b.title) + facts
    return [f.name for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def test_generators_are_deterministic_by_seed():
    assert make_documents(10, seed=1) == make_documents(10, seed=1)
    assert make_documents(10, seed=1) != make_documents(10, seed=2)
    assert make_pairs(5, seed=1) == make_pairs(5, seed=1)
    assert make_pairs(5, seed=1) != make_pairs(5, seed=2)
    scene = Scene("circle", "red", "top left", 2, "cat")
    assert render(scene, 3).tobytes() == render(scene, 3).tobytes() != render(scene, 4).tobytes()


def test_written_world_is_identical_for_the_same_seed(world, tmp_path):
    write_world(tmp_path, seed=11, n_documents=16, n_pairs_per_task=6, n_eval_queries=10)
    root = world.beir.parents[2]
    ours = {p.relative_to(root): p for p in root.rglob("*") if p.is_file() and p.name != "state.json"}
    theirs = {p.relative_to(tmp_path): p for p in tmp_path.rglob("*") if p.is_file() and p.name != "state.json"}
    assert ours.keys() == theirs.keys()
    assert all(ours[name].read_bytes() == theirs[name].read_bytes() for name in ours)


def test_every_hard_negative_differs_from_its_target_in_exactly_one_attribute():
    pairs = make_pairs(40, seed=0)
    assert {p.task for p in pairs} == set(TASKS)
    for pair in pairs:
        assert len(pair.negatives) == 2 and len(set(pair.negatives)) == 2
        for negative in pair.negatives:
            (changed,) = differing(pair.target, negative)
            if pair.task == "vqa":
                assert changed == pair.asked
            if pair.task == "page":
                assert changed == f"fact {pair.asked}"


def test_scene_pixels_carry_colour_quadrant_and_count():
    scene = Scene("square", "blue", "bottom right", 3, None)
    pixels = np.asarray(render(scene, 0)).astype(int)
    blue = abs(pixels - np.array([40, 80, 220])).sum(-1) < 30
    half = IMAGE_SIZE // 2
    quadrant = blue[half:, half:]
    assert quadrant.sum() > 3 * 150 and blue.sum() == quadrant.sum()
    edge = 26  # the shapes sit in a 2 x 2 grid of slots inside their quadrant, split at 26 px
    slots = [quadrant[:edge, :edge], quadrant[:edge, edge:], quadrant[edge:, :edge], quadrant[edge:, edge:]]
    assert sum(slot.any() for slot in slots) == 3


def test_captions_come_from_a_small_regular_vocabulary():
    words = {w for p in make_pairs(50, seed=2) if isinstance(p.target, Scene) for w in p.target.caption.split()}
    assert len(words) <= 40 and {"in", "the"} <= words


def test_stage2_rows_round_trip_through_jsonl_and_the_reader(world):
    dataset = PairDataset(world.pairs)
    expected = make_pairs(6, seed=11)
    assert len(dataset) == len(expected) and sorted(set(dataset.tasks)) == sorted(TASKS)
    for index, synthetic in enumerate(expected):
        pair = dataset[index]
        sides = [pair.query, pair.positive, *pair.negatives]
        assert pair.task == synthetic.task and len(pair.negatives) == 2
        for side, (text, item) in zip(sides, pair_sides(synthetic), strict=True):
            assert side.text == text.replace(MMEB_IMAGE_TOKEN, IMAGE_PLACEHOLDER)
            assert (side.image is None) == (item is None)
            if item is not None:
                assert load_image(side.image, pair.id).size == (IMAGE_SIZE, IMAGE_SIZE)
    prompts = {dataset[k].task: dataset[k] for k in range(len(dataset))}
    assert prompts["t2i"].query.text.startswith(T2I.split("{}")[0]) and prompts["t2i"].positive.text == IMAGE_TARGET
    assert prompts["i2t"].query.text == IMAGE_QUESTION.format("What does the image show?")
    assert prompts["page"].positive.text == PAGE_TARGET


def test_stage2_rows_in_memory_are_the_rows_written(world, tmp_path):
    """pair_rows: the same pairs as the written files give, read without any file of rows (nor `datasets`)."""
    in_memory = PairDataset(pair_rows(make_pairs(6, seed=11), tmp_path, seed=11), image_dir=tmp_path)
    on_disk = PairDataset(world.pairs)
    written = {on_disk[k].id: on_disk[k] for k in range(len(on_disk))}
    assert sorted(in_memory.tasks) == sorted(on_disk.tasks)
    for k in range(len(in_memory)):
        pair = in_memory[k]
        theirs = written[pair.id]
        for mine, other in zip(
            (pair.query, pair.positive, *pair.negatives),
            (theirs.query, theirs.positive, *theirs.negatives),
            strict=True,
        ):
            assert mine.text == other.text and (mine.image is None) == (other.image is None)
            if mine.image is not None:  # the same image, rendered to the same relative path
                assert Path(mine.image).name == Path(other.image).name
                assert np.array_equal(np.asarray(load_image(mine.image, "")), np.asarray(load_image(other.image, "")))


def test_stage1_documents_read_back(world):
    documents = DocumentDataset(world.documents)
    assert [d.id for d in documents] == [d.id for d in make_documents(16, seed=11)]
    assert all(d.text.count(IMAGE_PLACEHOLDER) == len(d.load_images()) for d in documents)


def test_mmeb_subsets_have_the_row_format(world):
    root = world.beir.parents[1] / "mmeb"
    for subset, path in world.mmeb.items():
        rows = open_rows(path.parent, split="test")
        assert rows.column_names == ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"] and len(rows) == 10
        for row in rows:
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) >= 3
            assert len(set(zip(row["tgt_text"], row["tgt_img_path"]))) == len(row["tgt_text"])  # distinct candidates
            for image in [row["qry_img_path"], *row["tgt_img_path"]]:
                assert not image or (root / image).is_file()
        first = rows[0]
        if subset == "SynT2I":
            assert first["qry_text"].startswith(T2I.split("{}")[0]) and first["qry_img_path"] == ""
            assert len(first["tgt_text"]) == N_CANDIDATES
            assert {t.replace(MMEB_IMAGE_TOKEN, IMAGE_PLACEHOLDER) for t in first["tgt_text"]} == {IMAGE_TARGET}
        else:
            query = first["qry_text"].replace(MMEB_IMAGE_TOKEN, IMAGE_PLACEHOLDER)
            assert query.startswith(IMAGE_QUESTION.split("{}")[0])


def colours_and_quadrants(image) -> set[tuple[str, str]]:
    """Which colours a rendered scene shows, and in which quadrants (read from its pixels)."""
    pixels, half = np.asarray(image).astype(int), IMAGE_SIZE // 2
    found = set()
    for colour, rgb in COLOUR_RGB.items():
        mask = abs(pixels - np.array(rgb)).sum(-1) < 30
        for quadrant in ATTRIBUTES["quadrant"]:
            rows = slice(half, None) if "bottom" in quadrant else slice(None, half)
            columns = slice(half, None) if "right" in quadrant else slice(None, half)
            if mask[rows, columns].sum() > 50:
                found.add((colour, quadrant))
    return found


def test_mmeb_candidate_zero_is_the_gold_one(world):
    root = world.beir.parents[1] / "mmeb"
    caption = re.compile(r"(?:one|two|three) (\w+) \w+ in the (\w+ \w+)")
    for row in open_rows(world.mmeb["SynT2I"]):
        asked = caption.search(row["qry_text"]).groups()
        assert colours_and_quadrants(load_image(root / row["tgt_img_path"][0], "gold")) == {asked}
    for row in open_rows(world.mmeb["SynI2T"]):
        shown = colours_and_quadrants(load_image(root / row["qry_img_path"], "query"))
        assert shown == {caption.match(row["tgt_text"][0]).groups()}
    colour_rows = [row for row in open_rows(world.mmeb["SynVQA"]) if "colour" in row["qry_text"]]
    assert colour_rows
    for row in colour_rows:
        (shown,) = colours_and_quadrants(load_image(root / row["qry_img_path"], "query"))
        assert row["tgt_text"][0] == shown[0] and sorted(row["tgt_text"]) == sorted(COLOUR_RGB)


def test_beir_pages_have_consistent_queries_corpus_and_qrels(world):
    queries = [json.loads(line) for line in (world.beir / "queries.jsonl").read_text().splitlines()]
    corpus = [json.loads(line) for line in (world.beir / "corpus.jsonl").read_text().splitlines()]
    header, *qrels = [line.split("\t") for line in (world.beir / "qrels" / "test.tsv").read_text().splitlines()]
    assert header == ["query-id", "corpus-id", "score"] and len(corpus) == N_PAGES and len(queries) == 10
    assert sorted(q for q, _, _ in qrels) == sorted(q["_id"] for q in queries)  # one relevant page per query
    assert {c for _, c, _ in qrels} <= {doc["_id"] for doc in corpus} and {s for *_, s in qrels} == {"1"}
    assert len({q["text"] for q in queries}) == len(queries)
    assert all(load_image(world.beir / doc["image"], doc["_id"]).size == (IMAGE_SIZE, IMAGE_SIZE) for doc in corpus)


def test_vqa_answers_span_the_attribute_vocabulary():
    scene = Scene("circle", "red", "top left", 1, None)
    assert [scene.answer(a) for a in ATTRIBUTES] == ["circle", "red", "top left", "one", "no word"]
