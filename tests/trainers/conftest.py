"""Small training runs on the synthetic world with the tiny model (CPU, fp32, seconds)."""

import json
from pathlib import Path

import pytest

from moca_fast.config import TrainConfig
from moca_fast.data.synthetic import make_documents, make_pairs, write_pairs

COMMON = dict(
    model="tiny",
    tokenizer="tiny",
    max_length=256,
    min_pixels=3136,
    max_pixels=3136,
    dtype="float32",
    activation_checkpointing=False,
    num_workers=0,
    checkpoint_every=100,
)


@pytest.fixture(scope="session")
def documents():
    return make_documents(48, seed=0)


@pytest.fixture(scope="session")
def pair_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    write_pairs(make_pairs(16, seed=0), folder, seed=0)
    return folder


def logged_metrics(output) -> list[dict]:
    """Every line of a run's metrics.jsonl, repeats included (what resume must not leave)."""
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def cpt_config(output_dir, **overrides) -> TrainConfig:
    values = dict(
        stage="cpt",
        data="unused",
        output_dir=str(output_dir),
        lr=2e-3,
        grad_accum=2,
        tokens_per_micro_batch=512,
        max_steps=8,
        **COMMON,
    )
    return TrainConfig(**{**values, **overrides})


def cl_config(output_dir, data, **overrides) -> TrainConfig:
    values = dict(
        stage="cl",
        data=str(data),
        output_dir=str(output_dir),
        lr=1e-3,
        pairs_per_rank=8,
        tokens_per_micro_batch=4096,
        temperature=0.05,
        max_steps=8,
        **COMMON,
    )
    return TrainConfig(**{**values, **overrides})


def nonfinite_gradients_at(monkeypatch, steps) -> None:
    """Stage 1's optimizer steps numbered `steps` (counting from 1 in this process) end with a NaN gradient, as a
    diverging run's would; the loop must then stop, or skip the update."""
    from moca_fast.trainers.cpt import ContinualPretraining

    real, calls = ContinualPretraining.train_step, []

    def train_step(self, micro_batches):
        values = real(self, micro_batches)
        calls.append(1)
        if len(calls) in steps:
            next(p for p in self.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return values

    monkeypatch.setattr(ContinualPretraining, "train_step", train_step)
