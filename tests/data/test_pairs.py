"""Stage-2 pairs: safe negative lists, the reference's negative-ratio rule, task batches, duplicate targets; every row
checked when the data opens (a clear error or a counted skip), image paths kept inside the image folder."""

import json
from collections import Counter

import pytest
from PIL import Image

from moca_fast.data.pairs import PairDataset, Side, pair_from_row, parse_string_list, target_ids, task_batches
from moca_fast.data.tokens import IMAGE_PLACEHOLDER

PH = IMAGE_PLACEHOLDER


def row(**overrides):
    base = {
        "qry": "<|image_1|>\nRepresent the given image.",
        "qry_image_path": "q.png",
        "pos_text": "a caption",
        "pos_image_path": "",
        "neg_text": "",
        "neg_image_path": "",
    }
    return base | overrides


def test_string_lists_parse_from_lists_json_and_python_literals():
    assert parse_string_list(["a", "b"], "r") == ["a", "b"]
    assert parse_string_list('["a", "\\u00e9"]', "r") == ["a", "é"]
    assert parse_string_list("['a', \"b's\"]", "r") == ["a", "b's"]
    assert parse_string_list("", "r") == parse_string_list(None, "r") == parse_string_list("[]", "r") == []


@pytest.mark.parametrize(
    "value", ["{'a': 1}", "[1, 2]", "[['a']]", "'a'", "['a' + 'b']", "[f'{1}']", "[a]", "['a',", [1], 3]
)
def test_anything_but_a_list_of_strings_is_rejected(value):
    with pytest.raises(ValueError, match="row t#4 neg_text"):
        parse_string_list(value, "row t#4 neg_text")


@pytest.mark.parametrize(
    "template",
    [
        "__import__('pathlib').Path({p!r}).touch()",
        "['ok', __import__('pathlib').Path({p!r}).touch()]",
        "[(lambda: __import__('pathlib').Path({p!r}).touch())()]",
    ],
)
def test_malicious_negative_list_is_rejected_and_never_run(tmp_path, template):
    marker = tmp_path / "pwned"
    payload = template.format(p=str(marker))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(row(neg_text=payload, neg_image_path="['', '']")) + "\n")
    with pytest.raises(ValueError, match=r"row evil#0 neg_text: (only a list of string literals|not a list)"):
        PairDataset({"evil": rows})  # every row is checked when the dataset opens
    assert not marker.exists()
    exec(compile(payload if payload.startswith("__") else f"_ = {payload}", "<check>", "exec"))
    assert marker.exists()  # the same payload, when executed, does leave its mark: the reader never ran it


def test_image_markers_become_placeholders_and_image_paths_resolve(tmp_path):
    pair = pair_from_row(row(pos_text="<|image_1|> text target"), row_id="t#0", task="t", image_dir=tmp_path)
    assert pair.query == Side(f"{PH}\nRepresent the given image.", str(tmp_path / "q.png"))
    assert pair.positive == Side(" text target", None)  # no image: the marker is dropped, as the reference does
    assert pair.negatives == []


@pytest.mark.parametrize(
    "overrides, problem",
    [
        ({"qry": "no marker"}, "the query has an image, but its text has 0 image markers"),
        ({"qry": "<|image_1|><|image_1|>"}, "the query has an image, but its text has 2 image markers"),
        ({"pos_text": None}, "missing field 'pos_text'"),
        ({"pos_image_path": 3}, "the positive: text and image path must be strings"),
        ({"neg_text": "['a', 'b']", "neg_image_path": "['x.png']"}, "2 negative texts but 1 negative image paths"),
    ],
)
def test_bad_rows_raise_naming_the_row(overrides, problem):
    with pytest.raises(ValueError, match=f"row t#9: {problem}"):
        pair_from_row(row(**overrides), row_id="t#9", task="t")


def negatives(ratio=2, seed=0, row_id="t#0", **overrides):
    pair = pair_from_row(row(**overrides), row_id=row_id, task="t", negative_ratio=ratio, seed=seed)
    return [(side.text, side.image) for side in pair.negatives]


def test_negative_ratio_keeps_the_first_r_and_repeats_the_last_when_short():
    three = {"neg_text": "['n0', 'n1', 'n2']", "neg_image_path": "['', '', '']"}
    assert negatives(**three) == [("n0", None), ("n1", None)]
    assert negatives(ratio=1, **three) == [("n0", None)]
    assert negatives(ratio=0, **three) == []
    assert negatives(ratio=4, **three) == [("n0", None), ("n1", None), ("n2", None), ("n2", None)]
    assert negatives(neg_text=["only"], neg_image_path=[""]) == [("only", None), ("only", None)]
    assert negatives(neg_text="[]", neg_image_path="[]") == []  # a row without negatives has none


def test_image_only_negatives_take_the_positives_text():
    pair = pair_from_row(
        row(
            pos_text="<|image_1|>Represent the given image.\n",
            pos_image_path="p.png",
            neg_text="['', '']",
            neg_image_path="['a.png', 'b.png']",
        ),
        row_id="t#0",
        task="t",
    )
    assert [n.text for n in pair.negatives] == [pair.positive.text] * 2
    assert [n.image for n in pair.negatives] == ["a.png", "b.png"]
    assert negatives(neg_text="[]", neg_image_path="['a.png']", pos_text="<|image_1|>x") == [(f"{PH}x", "a.png")] * 2


def test_empty_negative_texts_draw_from_the_rows_other_texts_by_seed():
    kwargs = {"neg_text": "['', 'n1', 'n2', 'n3']", "neg_image_path": "['', '', '', '']", "ratio": 1}
    draws = {negatives(seed=seed, **kwargs)[0][0] for seed in range(40)}
    assert draws == {"n1", "n2", "n3"}
    assert negatives(seed=7, **kwargs) == negatives(seed=7, **kwargs)
    assert {negatives(row_id=f"t#{k}", **kwargs)[0][0] for k in range(40)} == {"n1", "n2", "n3"}


def test_task_batches_are_homogeneous_cover_every_row_once_and_follow_the_seed():
    tasks = ["a"] * 23 + ["b"] * 8 + ["c"] * 1 + ["a"] * 4
    batches = task_batches(tasks, 5, seed=3)
    assert all(len({tasks[i] for i in batch}) == 1 and 1 <= len(batch) <= 5 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(tasks)))
    assert Counter(tasks[batch[0]] for batch in batches) == {"a": 6, "b": 2, "c": 1}
    assert task_batches(tasks, 5, seed=3) == batches
    assert task_batches(tasks, 5, seed=4) != batches


def test_target_ids_are_equal_exactly_for_identical_targets(tmp_path):
    a, b, a_copy = (str(tmp_path / name) for name in ("a.png", "b.png", "a-copy.png"))
    for path, colour in ((a, "red"), (b, "blue"), (a_copy, "red")):
        Image.new("RGB", (8, 8), colour).save(path)
    targets = [
        Side("t", a),
        Side("t", b),
        Side("t", a),
        Side("u", a),
        Side("t", None),
        Side("t", None),
        Side("t", b),
        Side("t", a_copy),
    ]
    same_content = [(0, "t"), (1, "t"), (0, "t"), (0, "u"), (None, "t"), (None, "t"), (1, "t"), (0, "t")]
    ids = target_ids(targets).tolist()
    for i in range(len(targets)):
        for j in range(len(targets)):
            assert (ids[i] == ids[j]) == (same_content[i] == same_content[j]), (i, j)
    with pytest.raises(ValueError, match="cannot read the target image .*missing.png"):
        target_ids([Side("t", str(tmp_path / "missing.png"))])


def test_target_ids_agree_across_processes(tmp_path):
    """Ranks compare ids after gathering them, so they must not depend on the process (no salted hash())."""
    import subprocess
    import sys

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(image)
    code = (
        "from moca_fast.data.pairs import Side, target_ids; "
        f"print(target_ids([Side('t', {str(image)!r}), Side('u', None)]).tolist())"
    )
    here = str(target_ids([Side("t", str(image)), Side("u", None)]).tolist())
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**__import__("os").environ, "PYTHONHASHSEED": seed},
        )
        assert out.stdout.strip() == here


def test_pair_dataset_spans_tasks_in_order(tmp_path):
    (tmp_path / "q.png").write_bytes(b"")  # checked to exist when the dataset opens, decoded only when used
    for task, n in (("one", 2), ("two", 3)):
        (tmp_path / f"{task}.jsonl").write_text(
            "".join(json.dumps(row(pos_text=f"{task}-{k}")) + "\n" for k in range(n))
        )
    pairs = PairDataset({"one": tmp_path / "one.jsonl", "two": tmp_path / "two.jsonl"}, negative_ratio=0)
    assert len(pairs) == 5 and pairs.tasks == ["one", "one", "two", "two", "two"]
    assert [(p.id, p.task, p.positive.text) for p in (pairs[1], pairs[2])] == [
        ("one#1", "one", "one-1"),
        ("two#0", "two", "two-0"),
    ]
    assert pairs[0].query.image == str(tmp_path / "q.png")
    with pytest.raises(IndexError):
        pairs[5]


def _rows_file(folder, name, rows):
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _with_images(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")


def test_rows_without_negatives_among_rows_with_them_fail_up_front_or_are_skipped(tmp_path, caplog):
    _with_images(tmp_path, "q.png")
    negs = {"neg_text": "['n0', 'n1']", "neg_image_path": "['', '']"}
    rows = [row(**negs), row(**negs), row(), row(**negs)]
    source = _rows_file(tmp_path, "t", rows)
    with pytest.raises(ValueError, match=r"row t#2: no hard negatives, but the other rows of task 't' have 2"):
        PairDataset({"t": source})
    with caplog.at_level("WARNING", logger="moca_fast.data.pairs"):
        pairs = PairDataset({"t": source}, skip_invalid=True)
    assert [p.id for p in pairs] == ["t#0", "t#1", "t#3"] and pairs.skipped == Counter({"no hard negatives": 1})
    assert "skipped pair 1: " in caplog.text and "row t#2: no hard negatives" in caplog.text
    assert pairs.negatives_per_task == {"t": 2}


def test_an_empty_task_file_is_a_clear_error(tmp_path):
    _with_images(tmp_path, "q.png")
    with pytest.raises(ValueError, match=r"empty.jsonl: no rows"):
        PairDataset({"full": _rows_file(tmp_path, "full", [row()]), "empty": _rows_file(tmp_path, "empty", [])})


@pytest.mark.parametrize("escape", ["../outside.png", "../../etc/hostname", "/etc/hostname", "sub/../../outside.png"])
def test_image_paths_must_stay_in_the_image_folder(tmp_path, escape):
    data = tmp_path / "data"
    data.mkdir()
    _with_images(data, "q.png")
    _with_images(tmp_path, "outside.png")
    source = _rows_file(data, "t", [row(), row(pos_text="<|image_1|>x", pos_image_path=escape)])
    with pytest.raises(ValueError, match=f"row t#1: the positive: image path '{escape}' leaves the image folder"):
        PairDataset({"t": source})
    assert len(PairDataset({"t": source}, skip_invalid=True)) == 1
    if (data / escape).is_file():  # the OS resolves it (sub/.. does not, sub being absent)
        allowed = PairDataset({"t": source}, allow_image_paths_outside=True)
        assert allowed[1].positive.image == str(data / escape)


def test_a_missing_image_file_fails_when_the_data_opens(tmp_path):
    source = _rows_file(tmp_path, "t", [row()])
    with pytest.raises(ValueError, match=r"row t#0: the query: image file not found: .*q.png"):
        PairDataset({"t": source})


def test_the_fingerprint_covers_the_image_bytes_not_only_the_paths(tmp_path):
    """Stage 2's data fingerprint (what a resume compares): every image rewritten at its path with other pixels,
    its size and mtime put back where they can be, is other data."""
    import os

    from PIL import ImageOps

    from moca_fast.data.synthetic import make_pairs, write_pairs
    from moca_fast.trainers.cl import pair_subsets

    write_pairs(make_pairs(8, seed=0), tmp_path, seed=0)
    before = PairDataset(pair_subsets(str(tmp_path))).fingerprint
    assert PairDataset(pair_subsets(str(tmp_path))).fingerprint == before
    images = sorted(tmp_path.rglob("*.png"))
    for image in images:
        stamp = image.stat()
        ImageOps.invert(Image.open(image).convert("RGB")).save(image)
        os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert images and PairDataset(pair_subsets(str(tmp_path))).fingerprint != before
