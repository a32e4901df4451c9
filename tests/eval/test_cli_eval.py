"""`moca-fast eval mmeb | vidore`: tables on stdout, JSON and a resumable cache under --output, rows named in errors."""

import json

import pytest

from moca_fast.cli import main

from .tiny import SMALL_PIXELS

PIXELS = ["--min-pixels", str(SMALL_PIXELS["min_pixels"]), "--max-pixels", str(SMALL_PIXELS["max_pixels"])]


def test_eval_mmeb(checkpoint, mmeb_data, tmp_path, capsys):
    out = tmp_path / "results"
    args = ["eval", "mmeb", "--data", str(mmeb_data), "--images", str(mmeb_data), "--model", str(checkpoint),
            "--output", str(out), *PIXELS]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "MMEB precision@1" in table and "SynT2I" in table and "overall (3 scored)" in table
    report = json.loads((out / "mmeb.json").read_text())
    assert set(report["datasets"]) == {"SynI2T", "SynT2I", "SynVQA"}
    assert (out / "cache" / "mmeb" / "SynT2I" / "candidates.json").is_file()
    assert main(args + ["--datasets", "SynVQA"]) == 0  # resumes from the cache
    assert json.loads((out / "mmeb.json").read_text())["datasets"]["SynVQA"] == report["datasets"]["SynVQA"]


def test_eval_vidore(checkpoint, beir_data, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["eval", "vidore", "--data", str(beir_data.parent), "--model", str(checkpoint), "--output", str(out),
                 *PIXELS]) == 0
    table = capsys.readouterr().out
    assert "ViDoRe ndcg@5" in table and "SynPages" in table and "ESG human" in table
    assert json.loads((out / "vidore.json").read_text())["datasets"]["SynPages"]["queries"] == 6


def test_eval_errors_name_the_row(checkpoint, mmeb_data, tmp_path, capsys):
    (mmeb_data / "images" / "SynVQA" / "000002-q.png").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "mmeb", "--data", str(mmeb_data), "--model", str(checkpoint), "--output", str(tmp_path / "r"),
              "--datasets", "SynVQA", *PIXELS])
    assert exit_info.value.code == 2
    assert "MMEB SynVQA row 2 query: image file not found" in capsys.readouterr().err
