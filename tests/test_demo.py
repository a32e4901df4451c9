"""`moca-fast demo`: a shortened run end to end, and the default run's claim (trained retrieval clearly above
chance and the untrained model) guarded as a test."""

import pytest

from moca_fast.cli import main
from moca_fast.demo import DemoSettings, format_summary, run_demo
from moca_fast.model.loading import load_pretrained

SCENE_TASKS = ("SynI2T", "SynT2I", "SynVQA")


def test_shortened_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "moca-fast demo: summary" in printed and "SynT2I (P@1)" in printed and "SynPages (NDCG@5)" in printed
    assert (tmp_path / "losses.png").stat().st_size > 1000
    assert (tmp_path / "summary.json").is_file()
    load_pretrained(tmp_path / "cl" / "final")  # the trained model, in the HF layout


@pytest.mark.slow
def test_default_demo_learns_retrieval(tmp_path):
    summary = run_demo(DemoSettings(out=tmp_path, device="cpu"))
    print(format_summary(summary))
    for name in SCENE_TASKS:
        scores, chance = summary["retrieval"][name], summary["chance"][name]
        assert scores["trained"] >= chance + 20, (name, scores)
        assert scores["trained"] >= scores["untrained"] + 10, (name, scores)
    for stage in summary["stages"].values():
        assert stage["loss_last"] < stage["loss_first"]
