"""`moca-fast embed`: JSON lines in, .npy or parquet out, in line order; bad lines fail naming the line."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moca_fast.cli import main
from moca_fast.embed import MocaEmbedder

from .eval.tiny import SMALL_PIXELS, write_tiny_checkpoint

PIXELS = ["--min-pixels", str(SMALL_PIXELS["min_pixels"]), "--max-pixels", str(SMALL_PIXELS["max_pixels"])]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-moca"), tokenizer)


@pytest.fixture
def lines(tmp_path):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (70, 90), "green").save(tmp_path / "pics" / "a.png")
    Image.new("RGB", (120, 60), "purple").save(tmp_path / "pics" / "b.png")
    records = [{"text": "a plain sentence", "id": "t1"}, {"image": "pics/a.png"},
               {"text": "Represent the given image.\n", "image": "pics/b.png", "id": 7}]
    path = tmp_path / "inputs.jsonl"
    path.write_text(json.dumps(records[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in records[1:]))
    return path


def expected(checkpoint, folder):
    embedder = MocaEmbedder.from_pretrained(checkpoint, **SMALL_PIXELS)
    return embedder.encode(["a plain sentence", {"image": str(folder / "pics" / "a.png")},
                            {"text": "Represent the given image.\n", "image": str(folder / "pics" / "b.png")}])


def test_embed_to_npy_and_parquet(checkpoint, lines, tmp_path):
    want = expected(checkpoint, tmp_path)
    assert main(["embed", str(lines), "--output", str(tmp_path / "out.npy"), "--model", str(checkpoint), *PIXELS]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-6)
    assert main(["embed", str(lines), "--output", str(tmp_path / "out.parquet"), "--model", str(checkpoint),
                 *PIXELS]) == 0
    table = pq.read_table(tmp_path / "out.parquet").to_pydict()
    assert table["line"] == [0, 1, 2] and table["id"] == ["t1", None, "7"]
    np.testing.assert_allclose(np.array(table["embedding"]), want, atol=1e-6)


def test_embed_as_a_command_with_a_progress_bar(checkpoint, lines, tmp_path):
    run = subprocess.run([sys.executable, "-m", "moca_fast.cli", "embed", str(lines), "--output",
                          str(tmp_path / "cmd.npy"), "--model", str(checkpoint), *PIXELS],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "3/3" in run.stderr and "wrote 3 embeddings of dimension 64" in run.stderr
    assert np.load(tmp_path / "cmd.npy").shape == (3, 64)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ('["a list"]', "line 2: expected an object"),
    ('{"id": 3}', 'line 2: neither "text" nor "image"'),
    ('{"text": 5}', 'line 2: "text" and "image" must be strings'),
    ('{"text": "x", "caption": "y"}', "line 2: unknown keys"),
    ('{"image": "pics/missing.png"}', "line 2: image file not found"),
    ('{"image": "pics/corrupt.png"}', "line 2: cannot decode image file"),
])
def test_bad_lines_are_named(checkpoint, tmp_path, capsys, line, message):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", str(path), "--output", str(tmp_path / "o.npy"), "--model", str(checkpoint), *PIXELS])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("moca-fast embed: error: ") and f"{path} {message}" in err
    assert not (tmp_path / "o.npy").exists()


def test_output_format_is_checked(checkpoint, lines, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["embed", str(lines), "--output", str(tmp_path / "out.csv"), "--model", str(checkpoint)])
    assert "--output must end in .npy or .parquet" in capsys.readouterr().err
