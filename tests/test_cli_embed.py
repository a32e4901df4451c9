"""`moca-fast embed`: JSON lines in, .npy or parquet out, in line order; bad lines, outputs and checkpoints fail in one
line naming the line or the file, before the work where they can."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from moca_fast.cli import main
from moca_fast.data.synthetic import png_bytes
from moca_fast.embed import MocaEmbedder
from moca_fast.embed_io import output_is_folder

from .eval.tiny import PIXELS, SMALL_PIXELS


@pytest.fixture
def lines(tmp_path):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (70, 90), "green").save(tmp_path / "pics" / "a.png")
    Image.new("RGB", (120, 60), "purple").save(tmp_path / "pics" / "b.png")
    records = [
        {"text": "a plain sentence", "id": "t1"},
        {"image": "pics/a.png"},
        {"text": "Represent the given image.\n", "image": "pics/b.png", "id": 7},
    ]
    path = tmp_path / "inputs.jsonl"
    path.write_text(json.dumps(records[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in records[1:]))
    return path


def expected(checkpoint, folder):
    embedder = MocaEmbedder.from_pretrained(checkpoint, **SMALL_PIXELS)
    return embedder.encode(
        [
            "a plain sentence",
            {"image": str(folder / "pics" / "a.png")},
            {"text": "Represent the given image.\n", "image": str(folder / "pics" / "b.png")},
        ]
    )


def test_embed_to_npy_and_parquet(checkpoint, lines, tmp_path):
    want = expected(checkpoint, tmp_path)
    assert main(["embed", str(lines), "--output", str(tmp_path / "out.npy"), "--model", str(checkpoint), *PIXELS]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-6)
    assert (
        main(["embed", str(lines), "--output", str(tmp_path / "out.parquet"), "--model", str(checkpoint), *PIXELS]) == 0
    )
    table = pq.read_table(tmp_path / "out.parquet").to_pydict()
    assert table["line"] == [0, 1, 2] and table["id"] == ["t1", None, "7"]
    np.testing.assert_allclose(np.array(table["embedding"]), want, atol=1e-6)


def test_embed_as_a_command_with_a_progress_bar(checkpoint, lines, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "moca_fast.cli",
            "embed",
            str(lines),
            "--output",
            str(tmp_path / "cmd.npy"),
            "--model",
            str(checkpoint),
            *PIXELS,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "3/3" in run.stderr and "wrote 3 embeddings of dimension 64" in run.stderr
    assert np.load(tmp_path / "cmd.npy").shape == (3, 64)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected an object"),
        ('{"id": 3}', 'line 2: neither "text" nor "image"'),
        ('{"text": 5}', 'line 2: "text" and "image" must be strings'),
        ('{"text": "x", "caption": "y"}', "line 2: unknown keys"),
        ('{"image": "pics/missing.png"}', "line 2: image file not found"),
        ('{"image": "pics/corrupt.png"}', "line 2: cannot decode image file"),
    ],
)
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


def _fails(args, capsys) -> str:
    """Run the CLI expecting a one-line error (exit 2); return it."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n")
    last = err.splitlines()[-1]  # after a progress bar, if any
    assert last.startswith("moca-fast embed: error: ")
    return last


def test_a_line_that_is_not_utf8_is_named(checkpoint, tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    err = _fails(["embed", str(path), "--output", str(tmp_path / "o.npy"), "--model", str(checkpoint)], capsys)
    assert f"{path} line 2: not UTF-8 text (invalid continuation byte at byte 13)" in err


def test_the_output_is_checked_before_any_work(lines, tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")  # never reached: the output is refused first
    (tmp_path / "taken.npy").write_bytes(b"old")
    (tmp_path / "folder.npy").mkdir()
    (tmp_path / "a-file").write_text("")
    for output, message in [
        ("folder.npy", "is a folder"),
        ("taken.npy", "exists; pass --overwrite"),
        ("a-file/out.npy", "cannot create its folder"),
        ("a-file", "is a file without a suffix: a path without a suffix names a folder of parts"),
    ]:
        err = _fails(["embed", str(lines), "--output", str(tmp_path / output), "--model", missing_model], capsys)
        assert message in err, err
    assert (tmp_path / "taken.npy").read_bytes() == b"old"


def test_an_output_without_a_suffix_names_a_folder_of_parts(tmp_path):
    (tmp_path / "made").mkdir()
    (tmp_path / "a-file").write_text("")
    names = ["parts", "made", "runs.v2/parts", "out.npy", "out.parquet", "made.d.npy"]
    assert [output_is_folder(tmp_path / name) for name in names] == [True, True, True, False, False, False]
    with pytest.raises(ValueError, match="a-file is a file without a suffix"):
        output_is_folder(tmp_path / "a-file")


def test_overwrite_replaces_an_existing_output(checkpoint, lines, tmp_path):
    (tmp_path / "out.npy").write_bytes(b"old")
    assert (
        main(
            [
                "embed",
                str(lines),
                "--output",
                str(tmp_path / "out.npy"),
                "--model",
                str(checkpoint),
                *PIXELS,
                "--overwrite",
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "out.npy").shape == (3, 64) and not list(tmp_path.glob(".*.tmp*"))


def test_a_bad_image_in_a_worker_is_one_line(checkpoint, tmp_path, capsys):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "cut.png").write_bytes(png_bytes(Image.new("RGB", (56, 56), "red"))[:60])
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"image": "pics/cut.png"}\n')
    err = _fails(
        [
            "embed",
            str(path),
            "--output",
            str(tmp_path / "o.npy"),
            "--model",
            str(checkpoint),
            *PIXELS,
            "--num-workers",
            "1",
            "--batch-tokens",
            "1",
        ],
        capsys,
    )  # one input per batch: a worker runs
    assert f"{path} line 3: cannot decode image file" in err


def _broken_copy(checkpoint, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    weights, config = model / "model.safetensors", model / "config.json"
    if damage == "truncated weights":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "invalid config":
        config.write_text('{"model_type": "qwen2_5_vl", ')
    elif damage == "text-only config":
        config.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "architectures": ["Qwen2ForCausalLM"]}))
    else:  # NaN weights
        tensors = load_file(weights)
        tensors[next(k for k in sorted(tensors) if "layers.0.mlp" in k)][0, 0] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
    return model


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated weights", "model.safetensors: not a readable safetensors file (truncated or corrupt?)"),
        ("invalid config", "config.json: not a valid JSON config"),
        ("text-only config", "config.json: model_type 'qwen2' has no vision_config: not a Qwen2.5-VL checkpoint"),
        ("NaN weights", "1 weight tensors hold NaN or inf (first: language_model.layers.0.mlp"),
    ],
)
def test_a_broken_checkpoint_is_one_line_naming_the_file(checkpoint, lines, tmp_path, capsys, damage, message):
    model = _broken_copy(checkpoint, tmp_path, damage)
    err = _fails(["embed", str(lines), "--output", str(tmp_path / "o.npy"), "--model", str(model), *PIXELS], capsys)
    assert message in err and str(model) in err, err
