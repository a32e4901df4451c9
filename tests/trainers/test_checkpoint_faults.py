"""A disk that fills up while a checkpoint or an export is written, and an export of a damaged checkpoint: one
clear error each, nothing half-written left behind, the earlier checkpoints intact."""

import errno
import os

import pytest
import torch

from moca_fast.cli import main
from moca_fast.trainers import checkpoint, stage1_export
from moca_fast.trainers.run import run

from .conftest import cpt_config


def config(output, **overrides):
    return cpt_config(output, **{"grad_accum": 1, "max_steps": 4, "checkpoint_every": 2, **overrides})


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, documents):
    """A finished 2-step stage-1 run (a checkpoint at step 2, with its MAE head)."""
    output = tmp_path_factory.mktemp("two")
    run(config(output, max_steps=2), documents=documents)
    return output / "checkpoints" / "step-0000002"


def test_a_full_disk_during_a_checkpoint_is_one_line_and_loses_nothing_written(
    tmp_path, documents, monkeypatch, capsys
):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "step-0000004" in str(path) and str(path).endswith("optimizer.pt"):
            disk_full()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(
        checkpoint.DiskFull,
        match=r"checkpoint step 4 could not be written to .*checkpoints: the "
        r"disk is full \(ENOSPC",
    ):
        run(config(tmp_path), documents=documents)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002"]  # no step-4 .tmp
    monkeypatch.undo()
    assert [r["step"] for r in run(config(tmp_path), documents=documents, resume=True)] == [3, 4]


def test_export_of_a_damaged_checkpoint_or_onto_a_full_disk_is_one_line_and_leaves_no_tmp(
    tmp_path, two_steps, monkeypatch, capsys
):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(two_steps, damaged)
    weights = damaged / "model" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    for source, expected in [
        (damaged, f"{weights}: {weights.stat().st_size} bytes, the marker records"),
        (two_steps, "could not be written to"),
    ]:
        if source is two_steps:
            monkeypatch.setattr(stage1_export, "save_file", disk_full)
        with pytest.raises(SystemExit) as exit_info:
            main(["export-stage1", str(source), str(tmp_path / "out")])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moca-fast")]
        assert exit_info.value.code == 2 and len(err) == 1 and expected in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]  # neither out nor out.tmp
    assert "the disk is full (ENOSPC" in err[0]
