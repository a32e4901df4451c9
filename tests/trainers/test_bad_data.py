"""Bad stage-2 data never kills a long run late: a corrupt image stops it with one line naming the row (or, with
skip_invalid, is stood in for), and rows whose batches could never be built are refused before step 1."""

import json
import logging
import shutil

import pytest

from moca_fast.trainers.run import run

from .conftest import cl_config


@pytest.fixture
def corrupt_folder(tmp_path, pair_folder):
    """The pairs with the positive image of row t2i#5 replaced by bytes that are not an image."""
    folder = tmp_path / "pairs"
    shutil.copytree(pair_folder, folder)
    (folder / "images" / "t2i" / "t2i-000005-p.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_stops_the_run_with_one_line_naming_the_row(tmp_path, corrupt_folder, workers):
    with pytest.raises(ValueError) as error:
        run(cl_config(tmp_path / "out", corrupt_folder, num_workers=workers))
    message = str(error.value)
    assert message.startswith("sample t2i#5/pos: cannot decode image file") and "\n" not in message


def test_with_skip_invalid_a_corrupt_image_is_stood_in_for_and_the_run_completes(tmp_path, corrupt_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="moca_fast.data.contrastive"):
        records = run(cl_config(tmp_path / "out", corrupt_folder, skip_invalid=True))
    assert [r["step"] for r in records] == list(range(1, 9))  # 64 pairs, 8 per step: row t2i#5 was due
    assert "skipped pair" in caplog.text and "sample t2i#5/pos: cannot decode" in caplog.text
    assert "takes its place" in caplog.text


def test_tasks_with_different_negative_counts_in_mixed_batches_are_refused_before_training(tmp_path, pair_folder):
    folder = tmp_path / "pairs"
    shutil.copytree(pair_folder, folder)
    rows = [json.loads(line) for line in (folder / "vqa.jsonl").read_text().splitlines()]
    (folder / "vqa.jsonl").write_text(
        "".join(json.dumps(r | {"neg_text": "", "neg_image_path": ""}) + "\n" for r in rows)
    )
    with pytest.raises(ValueError, match=r"different numbers of hard negatives .*'vqa': 0.*set task_homogeneous"):
        run(cl_config(tmp_path / "out", folder))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    records = run(cl_config(tmp_path / "ok", folder, task_homogeneous=True, max_steps=2))
    assert len(records) == 2


def test_a_run_stopped_by_a_corrupt_image_resumes_skipping_it(tmp_path, corrupt_folder):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="sample t2i#5/pos: cannot decode"):
        run(cl_config(out, corrupt_folder, checkpoint_every=1))
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert done < 8
    records = run(cl_config(out, corrupt_folder, checkpoint_every=1, skip_invalid=True), resume=True)
    assert [r["step"] for r in records] == list(range(done + 1, 9))
