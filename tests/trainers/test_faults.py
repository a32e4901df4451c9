"""Fault injection: training killed with SIGKILL at each checkpoint phase, then resumed, must continue from the last
complete checkpoint with the losses of an uninterrupted run and end with a complete final/; SIGTERM from outside
must leave a checkpoint of the last step and a non-zero exit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moca_fast.data.synthetic import write_documents
from moca_fast.trainers.checkpoint import complete_checkpoints, step_of
from moca_fast.trainers.run import run

from .conftest import logged_metrics
from .fault_worker import KILL_STEP, STEPS, documents, fault_config

WORKER = str(Path(__file__).with_name("fault_worker.py"))
ROOT = Path(__file__).parents[2]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    run(fault_config(output), documents=documents())
    return output


# phase -> the step of the last complete checkpoint after the kill
PHASES = {
    "weights": KILL_STEP - 2,
    "optimizer": KILL_STEP - 2,
    "marker": KILL_STEP - 2,
    "publish": KILL_STEP - 2,
    "prune": KILL_STEP,
    "final": STEPS,
}


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_at_each_checkpoint_phase_then_resume(tmp_path, uninterrupted, phase, caplog):
    result = subprocess.run(
        [sys.executable, WORKER, phase, str(tmp_path), str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert step_of(complete_checkpoints(checkpoints)[-1]) == PHASES[phase]
    assert not (tmp_path / "final").exists()  # killed before the run's end, or while final/ was written

    with caplog.at_level("INFO", logger="moca_fast.trainers.loop"):
        records = run(fault_config(tmp_path), documents=documents(), resume=True)
    assert f"resumed from {checkpoints / f'step-{PHASES[phase]:07d}'}" in caplog.text
    assert [r["step"] for r in records] == list(range(PHASES[phase] + 1, STEPS + 1))
    reference = logged_metrics(uninterrupted)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in logged_metrics(tmp_path)] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in reference
    ]  # every step once, bit for bit
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000006", "step-0000008"]  # no leftovers
    assert sorted(os.listdir(tmp_path / "final")) == sorted(os.listdir(uninterrupted / "final"))
    ours, theirs = _tensors(tmp_path / "final"), _tensors(uninterrupted / "final")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [False, True], ids=["main-pid", "process-group-with-workers"])
def test_sigterm_from_outside_checkpoints_the_step_and_exits_non_zero(tmp_path, to_group):
    """SIGTERM to the main process alone, or (as SLURM and systemd send it) to the whole process group, DataLoader
    workers included: the workers must not die of it before the main process has saved."""
    data = write_documents(documents(), tmp_path / "docs", "dataset")
    output = tmp_path / "out"
    recipe = ROOT / "configs" / "tiny-cpt.yaml"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moca_fast.cli",
            "cpt",
            "--config",
            str(recipe),
            "--data",
            str(data),
            "--output-dir",
            str(output),
            "--max-steps",
            "10000",
            "--set",
            f"num_workers={2 if to_group else 0}",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        metrics = output / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # two whole steps logged
            assert child.poll() is None and time.monotonic() < deadline, "the run ended or never started"
            time.sleep(0.2)
        if to_group:
            os.killpg(child.pid, signal.SIGTERM)  # the child leads its own session: itself and its workers
        else:
            child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = logged_metrics(output)[-1]["step"]
    assert f"stopped by signal {int(signal.SIGTERM)} after step {last}" in stderr
    assert step_of(complete_checkpoints(output / "checkpoints")[-1]) == last  # nothing since the last step lost
    assert "Traceback" not in stderr and "killed by signal" not in stderr
