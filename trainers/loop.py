"""The training loop shared by both stages: optimizer, schedule, clipping, metrics, atomic checkpoints, resume.

A stage supplies the data and the step (forward and backward of one optimizer step's micro-batches); the
loop does everything else. Resume restores model, optimizer, scheduler, RNG and the data position (epoch,
optimizer steps taken in it), so the continued run sees exactly the batches and updates the uninterrupted
one would have. It takes the newest complete checkpoint (trainers/checkpoint.py) after checking that it belongs
to this run (trainers/resume.py); a run that had finished only has its `final/` rewritten. A non-finite loss or
gradient norm stops the run before the update, or skips it (`skip_nonfinite`); SIGTERM/SIGINT finish the step,
write a checkpoint and stop (trainers/guards.py).

`Training` holds the parts of the loop: a step generator (each optimizer step's inputs, across epochs, from a
resumed position), the update (the non-finite guard, optimizer and schedule) and what follows a step (metrics,
checkpoints, signals).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..config import TrainConfig
from ..parallel.distributed import rank, world_size
from .checkpoint import Loaded, export_final, load_latest, save_checkpoint
from .guards import NONFINITE_ADVICE, StopSignals, TrainingStopped, nonfinite_problem
from .metrics import MetricsLogger, device_peak_flops
from .optim import adamw, warmup_linear_decay
from .resume import apply_optimizer_settings, check_resume, identity, new_run_id, prepare_output, truncate_metrics
from .setup import fix_cpu_threads
from .tensorboard import TensorBoardWriter

log = logging.getLogger(__name__)


class Stage(Protocol):
    model: nn.Module  # the backbone (a MocaModel, possibly sharded)
    extra: nn.Module | None  # trained modules outside the HF model (the MAE head)

    def steps_per_epoch(self) -> int: ...

    def step_inputs(self, epoch: int, start: int) -> Iterator: ...

    def train_step(self, inputs) -> dict[str, float]: ...

    def sample_ids(self, inputs) -> list[str]: ...  # the samples of one step's inputs (to name them in errors)

    def data_fingerprint(self) -> str: ...  # changes when the training samples do


@dataclass
class Progress:
    """Where a run stands; its checkpoints record it (with the schedule's state) as their trainer state."""

    step: int = 0  # optimizer steps taken, skipped updates included
    epoch: int = 0
    position: int = 0  # optimizer steps taken in this epoch: where its data continues
    skipped: int = 0  # updates skipped for a non-finite loss or gradient norm

    @classmethod
    def restored(cls, trainer_state: dict) -> Progress:
        return cls(
            trainer_state["step"], trainer_state["epoch"], trainer_state["position"], trainer_state.get("skipped", 0)
        )

    def advance(self) -> None:
        """Count one optimizer step taken."""
        self.step, self.position = self.step + 1, self.position + 1


def train(
    config: TrainConfig,
    stage: Stage,
    *,
    processor=None,
    device: torch.device,
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    stop_after: int | None = None,
) -> list[dict]:
    """Run `stage` for the configured epochs / max_steps; returns the logged records of this process. A
    finished run leaves its model (HF layout, `processor`'s tokenizer and settings beside it) in `output_dir/final`.

    `stop_after` ends the run after that many optimizer steps in total (the schedule is unchanged), as an
    interruption would; a later call with `resume=True` continues from the last checkpoint."""
    output = Path(config.output_dir)
    prepare_output(output, resume=resume, overwrite=overwrite, is_main=rank() == 0)
    training = Training(config, stage, processor, output)
    loaded = training.restore(resume, allow_config_change)
    threads = loaded.trainer_state.get("cpu_threads") if loaded is not None else None
    if device.type == "cpu" and threads is not None and threads != torch.get_num_threads():
        fix_cpu_threads(threads)  # the count the run's steps so far were computed with
    if rank() == 0:
        truncate_metrics(output / "metrics.jsonl", training.progress.step)
    if loaded is not None and training.progress.step >= training.total:
        if rank() == 0:
            log.info(
                "the run had finished at step %d: rewriting %s from %s",
                training.progress.step,
                output / "final",
                loaded.path,
            )
            export_final(loaded.path, output)
        return []
    end = min(training.total, stop_after) if stop_after is not None else training.total
    return training.run(end, device)


class Training:
    """One call of `train`: the stage, the optimizer and schedule of its parameters, where the run stands, and the
    loop's parts (the step generator, the update, what follows a step)."""

    def __init__(self, config: TrainConfig, stage: Stage, processor, output: Path):
        self.config, self.stage, self.processor, self.output = config, stage, processor, output
        self.total = config.max_steps or stage.steps_per_epoch() * config.epochs
        self.params = [p for m in (stage.model, stage.extra) if m is not None for p in m.parameters()]
        self.optimizer = adamw(self.params, config.lr, config.weight_decay, config.betas)
        self.scheduler = warmup_linear_decay(self.optimizer, self.total, config.warmup_ratio)
        self.identity = identity(config, world_size(), stage.data_fingerprint())
        self.progress = Progress()

    def restore(self, resume: bool, allow_config_change: bool) -> Loaded | None:
        """With `resume`, continue this run from its newest usable checkpoint (model, optimizer, schedule, RNG,
        progress, run id) and return it; else, or when there is none, give the run a new id."""
        loaded = self._load_latest(allow_config_change) if resume else None
        if loaded is None:
            self.identity["run"] = new_run_id()
            if resume:
                log.info("no checkpoint under %s: starting from scratch", self.output / "checkpoints")
        return loaded

    def _load_latest(self, allow_config_change: bool) -> Loaded | None:
        changes = []
        loaded = load_latest(
            self.output / "checkpoints",
            model=self.stage.model,
            extra=self.stage.extra,
            optimizer=self.optimizer,
            check=lambda loaded: changes.extend(
                check_resume(loaded.manifest, self.identity, loaded.path, allow_changes=allow_config_change)
            ),
        )
        if loaded is None:
            return None
        self.scheduler.load_state_dict(loaded.trainer_state["scheduler"])
        if changes:
            apply_optimizer_settings(self.optimizer, self.scheduler, self.config)
        self.progress = Progress.restored(loaded.trainer_state)
        self.identity["run"] = loaded.manifest["run"]
        log.info(
            "resumed from %s at step %d (epoch %d, position %d)",
            loaded.path,
            self.progress.step,
            self.progress.epoch,
            self.progress.position,
        )
        return loaded

    def run(self, end: int, device: torch.device) -> list[dict]:
        """Take optimizer steps up to step `end`; returns their logged records."""
        peak = device_peak_flops(device)  # one device's; the logged tokens and FLOPs are every rank's
        metrics = MetricsLogger(
            self.output / "metrics.jsonl",
            self.total,
            self.progress.step,
            enabled=rank() == 0,
            peak_flops=peak * world_size() if peak else None,
        )
        tensorboard = (
            TensorBoardWriter(self.output / "tensorboard") if self.config.tensorboard and rank() == 0 else None
        )
        records = []
        try:
            with StopSignals(device) as signals:
                for inputs in self.step_inputs(end):
                    values = self.stage.train_step(inputs)
                    self.update(values, inputs)
                    self.progress.advance()
                    records.append(self.after_step(values, end, metrics, tensorboard, signals))
        finally:
            metrics.close()
            if tensorboard is not None:
                tensorboard.close()
        return records

    def step_inputs(self, end: int) -> Iterator:
        """The inputs of each optimizer step up to step `end`: from where the run stands (mid-epoch after a
        resume), on into the next epoch when one runs out. The caller counts each step (`Progress.advance`)
        before it takes the next."""
        progress = self.progress
        while progress.step < end:
            for inputs in self.stage.step_inputs(progress.epoch, progress.position):
                yield inputs
                if progress.step >= end:
                    return
            progress.epoch, progress.position = progress.epoch + 1, 0

    def update(self, values: dict, inputs) -> None:
        """Clip the gradients and apply them unless the loss or their norm is not finite (`skip_nonfinite`),
        advance the schedule and clear the gradients; adds the step's 'lr' and 'grad_norm' to `values`."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad_norm))
        values["lr"] = self.scheduler.get_last_lr()[0]
        if math.isfinite(values["loss"]) and math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            self.skip_update(
                nonfinite_problem(self.progress.step + 1, values["loss"], grad_norm, self.stage.sample_ids(inputs))
            )
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        values["grad_norm"] = grad_norm

    def skip_update(self, problem: str) -> None:
        """The non-finite guard: stop the run (TrainingStopped), or with `skip_nonfinite` count the skipped update
        and stop once more than `max_skipped_fraction` of the run's updates are skipped."""
        config, progress = self.config, self.progress
        if not config.skip_nonfinite:
            raise TrainingStopped(f"{problem}; {NONFINITE_ADVICE}")
        progress.skipped += 1
        log.warning("skipped the update (%d so far): %s", progress.skipped, problem)
        if progress.skipped > config.max_skipped_fraction * self.total:
            raise TrainingStopped(
                f"{problem}; {progress.skipped} of the run's {self.total} updates skipped, more "
                f"than max_skipped_fraction {config.max_skipped_fraction} allows: "
                "the run is not training. Lower the learning rate or check the data"
            )

    def after_step(
        self,
        values: dict,
        end: int,
        metrics: MetricsLogger,
        tensorboard: TensorBoardWriter | None,
        signals: StopSignals,
    ) -> dict:
        """Log the step just taken (returns its record), save a checkpoint every `checkpoint_every` steps and at
        `end`, and stop the run, saved, when a signal asks (TrainingStopped)."""
        step = self.progress.step
        if self.progress.skipped:
            values["skipped_steps"] = self.progress.skipped
        record = metrics.log(step, values)
        if tensorboard is not None:
            tensorboard.log(record)
        saved = step % self.config.checkpoint_every == 0 or step == end
        if saved:
            self.save()
        signum = signals.requested()
        if signum and step < end:
            if not saved:
                self.save()
            raise TrainingStopped(
                f"stopped by signal {signum} after step {step} of {self.total}; its "
                "checkpoint is written: continue with --resume",
                StopSignals.exit_code(signum),
            )
        return record

    def save(self) -> Path:
        """A checkpoint of the step just taken; once the run is complete, also its model alone in `final/`."""
        saved = save_checkpoint(
            self.output / "checkpoints",
            self.progress.step,
            model=self.stage.model,
            extra=self.stage.extra,
            optimizer=self.optimizer,
            processor=self.processor,
            keep=self.config.keep_checkpoints,
            identity=self.identity,
            trainer_state={
                **asdict(self.progress),
                "scheduler": self.scheduler.state_dict(),
                "cpu_threads": torch.get_num_threads(),
            },
        )
        if self.progress.step == self.total and rank() == 0:  # finished: the model alone, in the HF layout
            export_final(saved, self.output)
        return saved
