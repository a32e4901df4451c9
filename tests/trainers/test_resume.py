"""Checkpoint bookkeeping: output folders that hold a run, run-scoped pruning, resume that validates what it resumes
and falls back past corrupt files, metrics without replayed steps, a repaired final/, the non-finite guard,
graceful SIGTERM/SIGINT, and padding micro-batches that add nothing."""

import dataclasses
import logging
import math
import os
import shutil
import signal

import pytest
import torch

from moca_fast.config import TrainConfig, free_on_resume
from moca_fast.model.loading import load_pretrained
from moca_fast.trainers import checkpoint, resume
from moca_fast.trainers.cpt import ContinualPretraining
from moca_fast.trainers.guards import TrainingStopped
from moca_fast.trainers.run import run

from .conftest import cl_config, cpt_config, logged_metrics, nonfinite_gradients_at


def config(output, **overrides):
    return cpt_config(output, **{"grad_accum": 1, "max_steps": 4, "checkpoint_every": 2, **overrides})


def steps(records):
    return [r["step"] for r in records]


def test_a_run_refuses_an_output_dir_holding_a_run_unless_resuming_or_overwriting(tmp_path, documents):
    run(config(tmp_path), documents=documents, stop_after=2)
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoints, metrics.jsonl\); pass --resume"):
        run(config(tmp_path), documents=documents)
    (tmp_path / "notes.txt").write_text("kept")
    records = run(config(tmp_path), documents=documents, overwrite=True)
    assert steps(records) == steps(logged_metrics(tmp_path)) == [1, 2, 3, 4]  # started over, nothing appended
    assert (tmp_path / "notes.txt").read_text() == "kept"  # only the run's own outputs were replaced


def _fake_checkpoint(root, step, run_id):
    folder = checkpoint.step_folder(root, step)
    folder.mkdir(parents=True)
    checkpoint.write_marker(folder, {"step": step, "run": run_id, "files": {}})


def test_pruning_touches_only_this_runs_older_checkpoints(tmp_path):
    for step in (5, 6):
        _fake_checkpoint(tmp_path, step, "another run")
    for step in (1, 2, 3, 7):
        _fake_checkpoint(tmp_path, step, "this run")
    checkpoint.prune(tmp_path, keep=2, run="this run", upto=3)
    assert [checkpoint.step_of(p) for p in checkpoint.complete_checkpoints(tmp_path)] == [2, 3, 5, 6, 7]


def test_resume_takes_the_newest_complete_checkpoint_never_scratch(tmp_path, documents):
    run(config(tmp_path, max_steps=6), documents=documents, stop_after=4)
    (tmp_path / "checkpoints" / "step-0000004" / checkpoint.MARKER).unlink()  # incomplete: as if killed
    records = run(config(tmp_path, max_steps=6), documents=documents, resume=True)
    assert steps(records) == [3, 4, 5, 6]
    assert steps(logged_metrics(tmp_path)) == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 replayed, logged once


def test_resume_refuses_to_start_over_when_only_unmarked_checkpoints_are_left(tmp_path, documents):
    run(config(tmp_path, max_steps=4), documents=documents, stop_after=2)
    (tmp_path / "checkpoints" / "step-0000002" / checkpoint.MARKER).unlink()  # as an earlier moca_fast left it
    with pytest.raises(checkpoint.CheckpointError, match="step-0000002: no checkpoint.json"):
        run(config(tmp_path, max_steps=4), documents=documents, resume=True)
    assert (tmp_path / "checkpoints" / "step-0000002" / "model").is_dir()  # nothing deleted


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, documents):
    """The losses of an uninterrupted 6-step run."""
    return [r["loss"] for r in run(config(tmp_path_factory.mktemp("full"), max_steps=6), documents=documents)]


@pytest.fixture(scope="module")
def cut_after_four(tmp_path_factory, documents):
    """A 6-step run stopped after step 4 (checkpoints at 2 and 4); tests damage copies of it."""
    output = tmp_path_factory.mktemp("cut")
    run(config(output, max_steps=6), documents=documents, stop_after=4)
    return output


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model/model.safetensors", "truncate"),
        ("optimizer.pt", "truncate"),
        ("model/model.safetensors", "garble"),
        ("trainer_state.pt", "garble"),
        ("extra.pt", "garble"),
        ("model/model.safetensors", "flip"),
        ("optimizer.pt", "flip"),
        ("extra.pt", "flip"),
    ],
)
def test_a_corrupt_file_falls_back_to_the_previous_checkpoint_naming_it(
    tmp_path, documents, six_steps, cut_after_four, caplog, name, damage
):
    out = tmp_path / "cut"
    shutil.copytree(cut_after_four, out)
    path = out / "checkpoints" / "step-0000004" / name
    size = path.stat().st_size
    if damage == "truncate":  # the marker's sizes tell
        os.truncate(path, size // 2)
    elif damage == "garble":  # same size, other bytes
        path.write_bytes(b"\0" * size)
    else:  # 64 bytes flipped in the middle: every file still loads, only the marker's checksums tell
        data = bytearray(path.read_bytes())
        data[size // 2 : size // 2 + 64] = bytes(b ^ 0xFF for b in data[size // 2 : size // 2 + 64])
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="moca_fast.trainers.checkpoint"):
        records = run(config(out, max_steps=6), documents=documents, resume=True)
    assert f"step-0000004 is unusable ({path}" in caplog.text
    assert [r["loss"] for r in records] == six_steps[2:]
    assert [r["loss"] for r in logged_metrics(out)] == six_steps


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path, documents):
    run(config(tmp_path), documents=documents, stop_after=2)
    os.truncate(tmp_path / "checkpoints" / "step-0000002" / "optimizer.pt", 10)
    with pytest.raises(checkpoint.CheckpointError, match=r"no usable checkpoint: .*optimizer.pt: 10 bytes"):
        run(config(tmp_path), documents=documents, resume=True)


def test_a_finished_run_has_final_repaired_on_resume(tmp_path, documents):
    run(config(tmp_path), documents=documents)
    expected = (tmp_path / "final" / "model.safetensors").read_bytes()
    (tmp_path / "final" / "model.safetensors").unlink()  # as a kill during the old plain copy left it
    assert run(config(tmp_path), documents=documents, resume=True) == []
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == expected
    load_pretrained(tmp_path / "final")


def test_resume_refuses_a_checkpoint_of_the_other_stage(tmp_path, documents, pair_folder):
    run(config(tmp_path), documents=documents, stop_after=2)
    with pytest.raises(ValueError, match="is a checkpoint of stage 'cpt', this run is stage 'cl'"):
        run(cl_config(tmp_path, pair_folder), resume=True)
    assert steps(logged_metrics(tmp_path)) == [1, 2]  # nothing appended


def test_a_changed_config_is_refused_or_applied_explicitly(tmp_path, documents, caplog):
    run(config(tmp_path), documents=documents, stop_after=2)
    changed = config(tmp_path, lr=1e-2, max_steps=6, num_workers=0, checkpoint_every=1)  # the last two: bookkeeping
    with pytest.raises(ValueError, match=r"lr: 0.002 -> 0.01; max_steps: 4 -> 6. Resume with the original"):
        run(changed, documents=documents, resume=True)
    with caplog.at_level(logging.WARNING, logger="moca_fast.trainers.resume"):
        records = run(changed, documents=documents, resume=True, allow_config_change=True)
    assert "(applied; the run no longer equals an uninterrupted one): lr: 0.002 -> 0.01" in caplog.text
    warmup = math.ceil(6 * 0.1)
    assert [r["lr"] for r in records] == pytest.approx([1e-2 * (6 - s) / (6 - warmup) for s in range(2, 6)])


def test_every_config_field_declares_its_resume_policy(tmp_path):
    """Each TrainConfig field carries exactly one resume policy (Free or Compared), so none is left out of resume's
    checks by accident; the run's identity compares exactly the Compared ones."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    compared = {name for name in names if not free_on_resume(name)}  # raises for a field without exactly one
    assert set(resume.identity(config(tmp_path), 1, "data")["config"]) == compared | {"world_size"}
    assert resume.BOOKKEEPING == set(names) - compared
    assert {"lr", "seed", "max_steps", "stage"} <= compared and {"output_dir", "num_workers"} <= resume.BOOKKEEPING


def test_other_data_is_refused_on_resume(tmp_path, documents):
    run(config(tmp_path), documents=documents, stop_after=2)
    with pytest.raises(ValueError, match="data fingerprint: .* -> .* \\(other samples\\)"):
        run(config(tmp_path), documents=documents[:40], resume=True)


def test_nonfinite_loss_stops_before_the_update_and_saves_nothing(tmp_path, documents, monkeypatch):
    nonfinite_gradients_at(monkeypatch, {2})
    with pytest.raises(
        TrainingStopped,
        match=r"step 2: non-finite loss .* on the samples \[doc-\d+, .*nothing from "
        r"this step was saved",
    ) as stopped:
        run(config(tmp_path, checkpoint_every=1), documents=documents)
    assert stopped.value.exit_code == 1
    assert steps(logged_metrics(tmp_path)) == [1]
    assert [checkpoint.step_of(p) for p in checkpoint.complete_checkpoints(tmp_path / "checkpoints")] == [1]
    assert not (tmp_path / "final").exists()


def test_skip_nonfinite_skips_and_counts_the_updates(tmp_path, documents, monkeypatch):
    nonfinite_gradients_at(monkeypatch, {2})
    records = run(config(tmp_path, skip_nonfinite=True, max_skipped_fraction=0.25), documents=documents)
    assert steps(records) == [1, 2, 3, 4] and records[-1]["skipped_steps"] == 1
    weights = load_pretrained(tmp_path / "final").state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_skipping_more_updates_than_max_skipped_fraction_stops_the_run(tmp_path, documents, monkeypatch):
    nonfinite_gradients_at(monkeypatch, {2, 3, 4})
    with pytest.raises(
        TrainingStopped,
        match=r"step 3: .*2 of the run's 4 updates skipped, more than "
        r"max_skipped_fraction 0.25",
    ) as stopped:
        run(config(tmp_path, skip_nonfinite=True, max_skipped_fraction=0.25), documents=documents)
    assert stopped.value.exit_code == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_checkpoints_and_stops(tmp_path, documents, six_steps, monkeypatch, signum):
    real, calls, handler = ContinualPretraining.train_step, [], signal.getsignal(signum)

    def train_step(self, micro_batches):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)  # arrives mid-step
        return real(self, micro_batches)

    monkeypatch.setattr(ContinualPretraining, "train_step", train_step)
    out = tmp_path / "cut"
    with pytest.raises(TrainingStopped, match=f"stopped by signal {int(signum)} after step 3 of 6") as stopped:
        run(config(out, max_steps=6, checkpoint_every=100), documents=documents)
    monkeypatch.undo()
    assert stopped.value.exit_code == 128 + signum
    assert checkpoint.step_of(checkpoint.complete_checkpoints(out / "checkpoints")[-1]) == 3
    assert signal.getsignal(signum) is handler  # restored
    records = run(config(out, max_steps=6, checkpoint_every=100), documents=documents, resume=True)
    assert [r["loss"] for r in records] == six_steps[3:]


def test_a_padding_micro_batch_adds_nothing_to_the_loss_or_gradient(tmp_path, documents):
    """What pads an epoch's last round over ranks (data/packing.py) must not change the step."""
    from moca_fast.data.loader import PackCollator
    from moca_fast.trainers.setup import build_model, build_processor, build_tokenizer

    cfg = config(tmp_path)
    tokenizer = build_tokenizer(cfg)
    processor = build_processor(cfg, tokenizer)

    def step(micro_batches):
        model = build_model(cfg, tokenizer, torch.device("cpu"))
        stage = ContinualPretraining(cfg, model, processor, torch.device("cpu"), 0, 1, documents=documents)
        collate = PackCollator(processor)
        batches = [collate([stage.samples[(0, i)] for i in b]) for b in stage.sampler.plan(0)[:2]]
        values = stage.train_step(micro_batches(batches))
        params = [*stage.model.named_parameters(), *stage.mae.named_parameters(prefix="mae")]
        return values["loss"], {n: p.grad.clone() for n, p in params if p.grad is not None}

    loss, grads = step(lambda b: [b[0]])
    padded_loss, padded_grads = step(lambda b: [b[0], dataclasses.replace(b[1], padding=True)])
    assert padded_loss == loss and grads.keys() == padded_grads.keys()
    assert all(torch.equal(grads[n], padded_grads[n]) for n in grads)


def test_a_resume_computes_with_the_cpu_threads_of_the_run(tmp_path, documents):
    """The CPU thread count decides how reductions split (so the bits of a step): a run fixes it, each checkpoint
    records it, and a resume in a process with another count takes the run's back."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run(config(tmp_path, max_steps=2), documents=documents, stop_after=1)
        state = torch.load(tmp_path / "checkpoints" / "step-0000001" / "trainer_state.pt", weights_only=False)
        assert state["cpu_threads"] == 1
        torch.set_num_threads(2)  # e.g. another shell's OMP_NUM_THREADS
        assert steps(run(config(tmp_path, max_steps=2), documents=documents, resume=True)) == [2]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
