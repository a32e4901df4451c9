"""Loss curves with matplotlib: `plot_run` on one run or a folder of runs, `moca-fast plot`, the last record of a
replayed step."""

import json

import pytest

from moca_fast.cli import main
from moca_fast.plots import find_runs, plot_run, read_metrics

pytest.importorskip("matplotlib")


def _write_metrics(folder, records):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_of_a_folder_of_runs(tmp_path, capsys):
    _write_metrics(
        tmp_path / "cpt",
        [{"step": s, "loss": 7 - s / 10, "mlm": 6.5 - s / 10, "mae": 5.0 / s, "lr": 1e-4 * s} for s in range(1, 11)],
    )
    _write_metrics(tmp_path / "cl", [{"step": s, "loss": 3 - s / 5, "lr": 1e-3} for s in range(1, 6)])
    assert list(find_runs(tmp_path)) == ["cl", "cpt"]
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "losses.png")
    from PIL import Image

    with Image.open(tmp_path / "losses.png") as image:  # two columns of panels
        assert image.size[0] > 1.5 * image.size[1]
    assert plot_run(tmp_path / "cpt", tmp_path / "one.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path / "cpt" / "nothing-here")])


def test_a_step_logged_twice_keeps_its_last_record(tmp_path):
    _write_metrics(
        tmp_path / "run",
        [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "loss": 3.5}, {"step": 3, "loss": 3.0}],
    )
    assert [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [5.0, 3.5, 3.0]
