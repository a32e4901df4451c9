"""The non-finite guard looks at the gradient norm as well as the loss: a step whose loss is finite but whose
gradient overflowed stops before the update (or is skipped), like a step with a non-finite loss."""

import pytest
import torch

from moca_fast.model.loading import load_pretrained
from moca_fast.trainers import checkpoint
from moca_fast.trainers.cpt import ContinualPretraining
from moca_fast.trainers.guards import TrainingStopped
from moca_fast.trainers.run import run

from .conftest import cpt_config, logged_metrics


@pytest.fixture
def second_step_overflows_a_gradient(monkeypatch):
    real, calls = ContinualPretraining.train_step, []

    def train_step(self, micro_batches):
        values = real(self, micro_batches)
        calls.append(1)
        if len(calls) == 2:
            next(p for p in self.model.parameters() if p.grad is not None).grad[0].fill_(float("inf"))
        return values

    monkeypatch.setattr(ContinualPretraining, "train_step", train_step)


def test_a_finite_loss_with_an_infinite_gradient_stops_before_the_update(
    tmp_path, documents, second_step_overflows_a_gradient
):
    with pytest.raises(TrainingStopped, match=r"step 2: non-finite loss [0-9.]+ / gradient norm (inf|nan)"):
        run(cpt_config(tmp_path, grad_accum=1, max_steps=3, checkpoint_every=1), documents=documents)
    assert [r["step"] for r in logged_metrics(tmp_path)] == [1]
    assert [checkpoint.step_of(p) for p in checkpoint.complete_checkpoints(tmp_path / "checkpoints")] == [1]


def test_skip_nonfinite_skips_an_infinite_gradient_and_keeps_the_weights_finite(
    tmp_path, documents, second_step_overflows_a_gradient
):
    records = run(
        cpt_config(tmp_path, grad_accum=1, max_steps=3, skip_nonfinite=True, max_skipped_fraction=0.5),
        documents=documents,
    )
    assert [r.get("skipped_steps", 0) for r in records] == [0, 1, 1]
    weights = load_pretrained(tmp_path / "final").state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())
