"""Corpus embedding in parts (`moca-fast embed INPUTS --output DIR`): one process and two gloo ranks under torchrun
give the embeddings of encode; a run killed after some parts resumes without recomputing them; parts are dealt to
ranks by cost; a folder of another run is refused."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from moca_fast.cli import main
from moca_fast.corpus import deal_parts, load_corpus, part_ranges
from moca_fast.embed import MocaEmbedder
from moca_fast.embed_io import read_jsonl_inputs

from .eval.tiny import PIXELS, write_tiny_checkpoint

KILL_AFTER_TWO_PARTS = """
import os, sys
import moca_fast.corpus as corpus
from moca_fast.cli import main
original, written = corpus.write_part, []
def write_then_die(*args):
    original(*args)
    written.append(args[0])
    if len(written) == 2:
        os.kill(os.getpid(), 9)
corpus.write_part = write_then_die
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, embedder):
    """Nine JSON lines (text, images, both; some with ids) and their embeddings by encode in one call."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(70, 90), (120, 60), (100, 100), (56, 140)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    records = [
        {"text": "a short line", "id": "a"},
        {"image": "0.png"},
        {"text": "words " * 30, "id": 3},
        {"text": "Represent the given image.\n", "image": "1.png"},
        {"text": "x"},
        {"image": "2.png", "id": "b"},
        {"text": "a caption", "image": "3.png"},
        {"text": "another line of text"},
        {"text": "the end"},
    ]
    path = folder / "inputs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    inputs, _ = read_jsonl_inputs(path, folder)
    want = embedder.encode(inputs)
    ids = [None if r.get("id") is None else str(r["id"]) for r in records]
    return path, want, ids


def embed_args(corpus, checkpoint, output, *extra):
    return [
        "embed",
        str(corpus[0]),
        "--output",
        str(output),
        "--model",
        str(checkpoint),
        *PIXELS,
        "--part-size",
        "2",
        *extra,
    ]


def test_parts_are_dealt_by_cost():
    assert [list(r) for r in part_ranges(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    costs = {0: 100, 1: 10, 2: 50, 3: 45, 4: 5, 5: 60}
    dealt = deal_parts(costs, 2)
    assert sorted(p for rank in dealt for p in rank) == list(costs)
    loads = [sum(costs[p] for p in rank) for rank in dealt]
    assert dealt == [[0, 3], [1, 2, 4, 5]] and loads == [145, 125]  # largest first, to the least loaded
    assert deal_parts({0: 1}, 3) == [[0], [], []]


def test_one_process_writes_parts_equal_to_encode(corpus, checkpoint, tmp_path, caplog):
    path, want, ids = corpus
    assert main(embed_args(corpus, checkpoint, tmp_path / "out")) == 0
    got, got_ids = load_corpus(tmp_path / "out")
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert got_ids == ids
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["count"] == 9 and len(index["parts"]) == 5 and index["dim"] == 64


def test_a_killed_run_resumes_without_recomputing_finished_parts(corpus, checkpoint, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_TWO_PARTS, *embed_args(corpus, checkpoint, out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    finished = sorted((out / "parts").glob("part-*.parquet"))
    assert [p.name for p in finished] == ["part-00000.parquet", "part-00001.parquet"]
    assert not (out / "index.json").exists()
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}
    (out / "parts" / ".part-00002.parquet.tmp999").write_bytes(b"a partial write")  # what a kill mid-write leaves

    embedded = []
    original = MocaEmbedder.encode
    monkeypatch.setattr(
        MocaEmbedder,
        "encode",
        lambda self, inputs, **kw: embedded.extend(x.id for x in inputs) or original(self, inputs, **kw),
    )
    with caplog.at_level("INFO"):
        assert main(embed_args(corpus, checkpoint, out)) == 0
    assert "2 of 5 parts already embedded, skipped" in caplog.text
    assert embedded == [f"{corpus[0]} line {n}" for n in range(5, 10)]  # lines 1-4 are in the finished parts
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == stamps
    assert not list((out / "parts").glob(".*"))
    got, ids = load_corpus(out)
    np.testing.assert_allclose(got, corpus[1], atol=1e-6, rtol=0)
    assert ids == corpus[2]


def test_a_folder_of_another_run_is_refused(corpus, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(embed_args(corpus, checkpoint, out)) == 0
    with pytest.raises(SystemExit):
        main(embed_args(corpus, checkpoint, out)[:-1] + ["3"])
    assert "holds the embeddings of another run (differing: part_size)" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "something else"}\n')
    with pytest.raises(SystemExit):
        main(["embed", str(other), "--output", str(out), "--model", str(checkpoint), *PIXELS, "--part-size", "2"])
    assert "differing: count, inputs_sha256" in capsys.readouterr().err
    assert (
        main(
            [
                "embed",
                str(other),
                "--output",
                str(out),
                "--model",
                str(checkpoint),
                *PIXELS,
                "--part-size",
                "2",
                "--overwrite",
            ]
        )
        == 0
    )  # starts over: the other run's parts are gone
    got, ids = load_corpus(out)
    assert got.shape[0] == 1 and sorted(p.name for p in (out / "parts").iterdir()) == ["part-00000.parquet"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(embed_args(corpus, checkpoint, tmp_path / "busy"))
    assert "holds other files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(embed_args(corpus, checkpoint, tmp_path / "new")[:-1] + ["0"])
    assert "--part-size must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(corpus, checkpoint, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "moca_fast.cli",
            *embed_args(corpus, checkpoint, tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    dealt = [int(n) for n in re.findall(r"rank \d/2: (\d) of the 5 parts left", run.stderr)]
    assert len(dealt) == 2 and min(dealt) > 0 and sum(dealt) == 5, run.stderr[-3000:]
    got, ids = load_corpus(tmp_path / "out")
    np.testing.assert_allclose(got, corpus[1], atol=1e-6, rtol=0)
    assert ids == corpus[2]


def test_another_model_at_the_same_path_is_refused_on_rerun(corpus, checkpoint, tokenizer, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_TWO_PARTS, *embed_args(corpus, model, out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    shutil.rmtree(model)
    write_tiny_checkpoint(model, tokenizer, seed=12)  # other weights, same path, same shapes and settings
    with pytest.raises(SystemExit):
        main(embed_args(corpus, model, out))
    assert "holds the embeddings of another run (differing: model_key)" in capsys.readouterr().err


def test_damaged_parts_are_caught_by_load_and_embedded_again_on_rerun(corpus, checkpoint, tmp_path, caplog):
    out = tmp_path / "out"
    assert main(embed_args(corpus, checkpoint, out)) == 0
    parts = sorted((out / "parts").glob("part-*.parquet"))
    data = bytearray(parts[0].read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64])
    parts[0].write_bytes(bytes(data))  # flipped bytes, same size
    os.truncate(parts[1], parts[1].stat().st_size // 2)
    parts[2].write_bytes(b"")
    third, fourth = parts[3].read_bytes(), parts[4].read_bytes()
    parts[3].write_bytes(fourth)
    parts[4].write_bytes(third)  # swapped
    with pytest.raises(ValueError, match=re.escape(f"{parts[0]}: its bytes do not match the checksum in index.json")):
        load_corpus(out)
    with caplog.at_level("WARNING"):
        assert main(embed_args(corpus, checkpoint, out)) == 0
    assert all(f"{p}: its bytes do not match the checksum written with it" in caplog.text for p in parts)
    got, ids = load_corpus(out)
    np.testing.assert_allclose(got, corpus[1], atol=1e-6, rtol=0)
    assert ids == corpus[2]
