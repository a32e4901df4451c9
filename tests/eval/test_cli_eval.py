"""`moca-fast eval mmeb | vidore`: tables on stdout, JSON and a resumable cache under --output (keyed by the weights,
not the path), rows named in errors."""

import json

import numpy as np
import pytest

from moca_fast.cli import main
from moca_fast.embed import MocaEmbedder
from moca_fast.eval import vidore

from .tiny import PIXELS, SMALL_PIXELS, write_tiny_checkpoint


def test_eval_mmeb(checkpoint, mmeb_data, tmp_path, capsys):
    out = tmp_path / "results"
    args = [
        "eval",
        "mmeb",
        "--data",
        str(mmeb_data),
        "--images",
        str(mmeb_data),
        "--model",
        str(checkpoint),
        "--output",
        str(out),
        *PIXELS,
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "MMEB precision@1" in table and "SynT2I" in table and "overall (3 scored)" in table
    report = json.loads((out / "mmeb.json").read_text())
    assert set(report["datasets"]) == {"SynI2T", "SynT2I", "SynVQA"}
    assert (out / "cache" / "mmeb" / "SynT2I" / "candidates.json").is_file()
    assert main(args + ["--datasets", "SynVQA"]) == 0  # resumes from the cache
    assert json.loads((out / "mmeb.json").read_text())["datasets"]["SynVQA"] == report["datasets"]["SynVQA"]


def test_retrained_weights_at_the_same_path_are_never_scored_from_the_old_cache(tokenizer, beir_data, tmp_path):
    model, out = tmp_path / "model", tmp_path / "results"
    args = ["eval", "vidore", "--data", str(beir_data.parent), "--model", str(model), "--output", str(out), *PIXELS]
    cached = out / "cache" / "vidore" / "SynPages" / "corpus.npy"
    write_tiny_checkpoint(model, tokenizer, seed=1)
    assert main(args) == 0
    first = np.load(cached)
    write_tiny_checkpoint(model, tokenizer, seed=2)  # retrained: same path, other weights
    assert main(args) == 0
    second = np.load(cached)
    assert not np.allclose(first, second)  # recomputed for the new weights
    embedder = MocaEmbedder.from_pretrained(model, **SMALL_PIXELS)
    dataset = vidore.read_dataset("SynPages", beir_data, "test")
    pages = vidore.instructed(dataset, embedder.role_prompt)[1]  # as the harness embeds them
    np.testing.assert_allclose(second, embedder.encode(pages), rtol=1e-5, atol=1e-6)


def test_eval_vidore(checkpoint, beir_data, tmp_path, capsys):
    out = tmp_path / "results"
    assert (
        main(
            [
                "eval",
                "vidore",
                "--data",
                str(beir_data.parent),
                "--model",
                str(checkpoint),
                "--output",
                str(out),
                *PIXELS,
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "ViDoRe ndcg@5" in table and "SynPages" in table and "ESG human" in table
    assert json.loads((out / "vidore.json").read_text())["datasets"]["SynPages"]["queries"] == 6


def test_eval_errors_name_the_row(checkpoint, mmeb_data, tmp_path, capsys):
    (mmeb_data / "images" / "SynVQA" / "000002-q.png").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "eval",
                "mmeb",
                "--data",
                str(mmeb_data),
                "--model",
                str(checkpoint),
                "--output",
                str(tmp_path / "r"),
                "--datasets",
                "SynVQA",
                *PIXELS,
            ]
        )
    assert exit_info.value.code == 2
    assert "MMEB SynVQA row 2 query: image file not found" in capsys.readouterr().err
