"""A training run leaves its loss plot (matplotlib) and, with `tensorboard: true`, TensorBoard events of every
logged value."""

import pytest

from moca_fast.trainers.run import run

from .conftest import cl_config


def test_training_writes_its_loss_plot_and_tensorboard_events(tmp_path, pair_folder):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = run(cl_config(tmp_path, pair_folder, max_steps=2, tensorboard=True))
    assert (tmp_path / "losses.png").stat().st_size > 10_000
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert "train/lr" in events.Tags()["scalars"]
