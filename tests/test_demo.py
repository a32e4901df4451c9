"""`moca-fast demo`: a shortened run end to end, and the default run's claim (trained retrieval clearly above
chance and the untrained model) guarded as a test."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from moca_fast.cli import main
from moca_fast.demo import DemoSettings, format_summary, run_demo
from moca_fast.model.loading import load_pretrained
from moca_fast.plots import read_metrics

SCENE_TASKS = ("SynI2T", "SynT2I", "SynVQA")
CONFIGS = Path(__file__).parents[1] / "configs"


def test_shortened_demo_end_to_end(tmp_path, capsys, monkeypatch):
    """The demo's default --out, then its recipes (configs/tiny-*.yaml) run verbatim: the demo ran those files."""
    monkeypatch.chdir(tmp_path)  # the recipes' paths are relative: runs/demo/world, runs/tiny-cpt, ...
    assert main(["demo", "--steps", "2", "3", "--device", "cpu"]) == 0
    recipes_after_the_demo(tmp_path)
    tmp_path = tmp_path / "runs" / "demo"
    printed = capsys.readouterr().out
    assert "moca-fast demo: summary" in printed and "SynT2I (P@1)" in printed and "SynPages (NDCG@5)" in printed
    assert (tmp_path / "losses.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["seconds"] > 0 and summary["run"]["settings"]["cl_steps"] == 3
    # chance from each task's own candidates: 8 per t2i / i2t query; one per value of the asked attribute in vqa
    rows = pq.read_table(tmp_path / "world" / "eval" / "mmeb" / "SynVQA" / "test-00000-of-00001.parquet").to_pylist()
    expected = 100 * sum(1 / len(set(r["tgt_text"])) for r in rows) / len(rows)
    assert summary["chance"]["SynVQA"] == pytest.approx(expected)
    assert summary["chance"]["SynT2I"] == pytest.approx(12.5) and summary["chance"]["SynVQA"] > 12.5
    load_pretrained(tmp_path / "cl" / "final")  # the trained model, in the HF layout


def recipes_after_the_demo(cwd: Path) -> None:
    """`moca-fast cpt --config configs/tiny-cpt.yaml`, then the cl one, as a user types them after a demo (two
    steps each): stage 1 reads the demo's world and repeats the demo's stage 1 bit for bit, stage 2 starts from it."""
    for stage in ("cpt", "cl"):
        assert main([stage, "--config", str(CONFIGS / f"tiny-{stage}.yaml"), "--max-steps", "2"]) == 0
        ours, demo = (read_metrics(cwd / "runs" / run / "metrics.jsonl") for run in (f"tiny-{stage}", f"demo/{stage}"))
        assert [r["step"] for r in ours] == [1, 2]
        if stage == "cpt":  # same recipe, data, seed and steps as the demo's stage 1
            assert [(r["loss"], r["grad_norm"]) for r in ours] == [(r["loss"], r["grad_norm"]) for r in demo]
    assert (cwd / "runs" / "tiny-cl" / "final" / "config.json").is_file()


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


def test_shortened_demo_with_the_multi_vector_head(tmp_path, capsys):
    """`--multi-vector`: stage 2 trains both heads, the checkpoint declares them, the summary scores every task
    pooled, Matryoshka-16 and multi-vector."""
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "3", "--device", "cpu", "--multi-vector"]) == 0
    printed = capsys.readouterr().out
    assert "Matryoshka-16" in printed and "multi-vector" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["heads"]) == set(summary["retrieval"])
    assert all(set(s) == {"pooled", "matryoshka", "multi_vector"} for s in summary["heads"].values())
    # The same pages, instructed the same way: the ViDoRe harness scores this checkpoint by MaxSim, as its head does.
    pages = "SynPages (NDCG@5)"
    assert summary["heads"][pages]["multi_vector"] == pytest.approx(summary["retrieval"][pages]["trained"], abs=1e-9)
    model = load_pretrained(tmp_path / "cl" / "final")
    assert (model.spec.multi_vector_dim, model.spec.matryoshka_dims) == (32, (64, 16))
    records = [json.loads(line) for line in (tmp_path / "cl" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_multi_vector"] > 0 and r["loss_pooled"] > 0 for r in records)


@pytest.mark.slow
def test_a_stopped_demo_says_so_in_one_line_and_resumes(tmp_path):
    """SIGTERM during stage 1 (as a scheduler or Ctrl-C sends it): exit 128+15 with one line on stderr and the step
    checkpointed; `demo --resume` continues both stages to the end, each step logged once."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).parents[1]
    command = [
        sys.executable,
        "-m",
        "moca_fast.cli",
        "demo",
        "--out",
        str(tmp_path),
        "--steps",
        "6",
        "2",
        "--device",
        "cpu",
    ]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
    try:
        metrics, deadline = tmp_path / "cpt" / "metrics.jsonl", time.monotonic() + 400
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert child.poll() is None and time.monotonic() < deadline, "the demo ended or never reached stage 1"
            time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=300)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("moca-fast demo: stopped: stopped by signal 15 after step ") and "--resume" in last
    stopped_at = json.loads(metrics.read_text().splitlines()[-1])["step"]

    assert main(["demo", "--out", str(tmp_path), "--steps", "6", "2", "--device", "cpu", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 7)) and stopped_at < 6  # continued from the checkpoint, nothing repeated
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["cpt"]["steps"] == 6 and summary["stages"]["cl"]["steps"] == 2
