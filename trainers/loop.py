"""The training loop shared by both stages: optimizer, schedule, clipping, metrics, atomic checkpoints, resume.

A stage supplies the data and the step (forward and backward of one optimizer step's micro-batches); the
loop does everything else. Resume restores model, optimizer, scheduler, RNG and the data position (epoch,
optimizer steps taken in it), so the continued run sees exactly the batches and updates the uninterrupted
one would have. It takes the newest complete checkpoint (trainers/checkpoint.py) after checking that it belongs
to this run (trainers/resume.py); a run that had finished only has its `final/` rewritten. A non-finite loss or
gradient norm stops the run before the update, or skips it (`skip_nonfinite`); SIGTERM/SIGINT finish the step,
write a checkpoint and stop (trainers/guards.py).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator, Protocol

import torch
from torch import nn

from ..config import TrainConfig
from ..parallel.distributed import rank, world_size
from .checkpoint import export_final, load_latest, save_checkpoint
from .guards import NONFINITE_ADVICE, StopSignals, TrainingStopped, nonfinite_problem
from .metrics import MetricsLogger, device_peak_flops
from .optim import adamw, warmup_linear_decay
from .resume import apply_optimizer_settings, check_resume, identity, new_run_id, prepare_output, truncate_metrics
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


def train(config: TrainConfig, stage: Stage, *, processor=None, device: torch.device, resume: bool = False,
          overwrite: bool = False, allow_config_change: bool = False, stop_after: int | None = None) -> list[dict]:
    """Run `stage` for the configured epochs / max_steps; returns the logged records of this process. A
    finished run leaves its model (HF layout, `processor`'s tokenizer and settings beside it) in `output_dir/final`.

    `stop_after` ends the run after that many optimizer steps in total (the schedule is unchanged), as an
    interruption would; a later call with `resume=True` continues from the last checkpoint."""
    output = Path(config.output_dir)
    prepare_output(output, resume=resume, overwrite=overwrite, is_main=rank() == 0)
    total = config.max_steps or stage.steps_per_epoch() * config.epochs
    params = [p for m in (stage.model, stage.extra) if m is not None for p in m.parameters()]
    optimizer = adamw(params, config.lr, config.weight_decay, config.betas)
    scheduler = warmup_linear_decay(optimizer, total, config.warmup_ratio)
    run = identity(config, world_size(), stage.data_fingerprint())
    step, epoch, position, skipped = 0, 0, 0, 0
    changes = []

    def same_run(loaded) -> None:
        changes.extend(check_resume(loaded.manifest, run, loaded.path, allow_changes=allow_config_change))

    loaded = load_latest(output / "checkpoints", model=stage.model, extra=stage.extra, optimizer=optimizer,
                         check=same_run) if resume else None
    if loaded is not None:
        state = loaded.trainer_state
        scheduler.load_state_dict(state["scheduler"])
        if changes:
            apply_optimizer_settings(optimizer, scheduler, config)
        step, epoch, position, skipped = state["step"], state["epoch"], state["position"], state.get("skipped", 0)
        run["run"] = loaded.manifest["run"]
        log.info("resumed from %s at step %d (epoch %d, position %d)", loaded.path, step, epoch, position)
    else:
        run["run"] = new_run_id()
        if resume:
            log.info("no checkpoint under %s: starting from scratch", output / "checkpoints")
    if rank() == 0:
        truncate_metrics(output / "metrics.jsonl", step)
    if loaded is not None and step >= total:
        if rank() == 0:
            log.info("the run had finished at step %d: rewriting %s from %s", step, output / "final", loaded.path)
            export_final(loaded.path, output)
        return []
    end = min(total, stop_after) if stop_after is not None else total
    peak = device_peak_flops(device)  # one device's; the logged tokens and FLOPs are every rank's
    metrics = MetricsLogger(output / "metrics.jsonl", total, step, enabled=rank() == 0,
                            peak_flops=peak * world_size() if peak else None)
    tensorboard = TensorBoardWriter(output / "tensorboard") if config.tensorboard and rank() == 0 else None
    records = []

    def save() -> Path:
        saved = save_checkpoint(output / "checkpoints", step, model=stage.model, extra=stage.extra,
                                optimizer=optimizer, processor=processor, keep=config.keep_checkpoints, identity=run,
                                trainer_state={"step": step, "epoch": epoch, "position": position, "skipped": skipped,
                                               "scheduler": scheduler.state_dict()})
        if step == total and rank() == 0:  # finished: the model alone, in the HF layout
            export_final(saved, output)
        return saved

    try:
        with StopSignals(device) as signals:
            while step < end:
                for inputs in stage.step_inputs(epoch, position):
                    values = stage.train_step(inputs)
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm))
                    values["lr"] = scheduler.get_last_lr()[0]
                    if math.isfinite(values["loss"]) and math.isfinite(grad_norm):
                        optimizer.step()
                    else:
                        problem = nonfinite_problem(step + 1, values["loss"], grad_norm, stage.sample_ids(inputs))
                        if not config.skip_nonfinite:
                            raise TrainingStopped(f"{problem}; {NONFINITE_ADVICE}")
                        skipped += 1
                        log.warning("skipped the update (%d so far): %s", skipped, problem)
                        if skipped > config.max_skipped_fraction * total:
                            raise TrainingStopped(f"{problem}; {skipped} of the run's {total} updates skipped, more "
                                                  f"than max_skipped_fraction {config.max_skipped_fraction} allows: "
                                                  "the run is not training. Lower the learning rate or check the data")
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step, position = step + 1, position + 1
                    values["grad_norm"] = grad_norm
                    if skipped:
                        values["skipped_steps"] = skipped
                    records.append(metrics.log(step, values))
                    if tensorboard is not None:
                        tensorboard.log(records[-1])
                    saved = step % config.checkpoint_every == 0 or step == end
                    if saved:
                        save()
                    signum = signals.requested()
                    if signum and step < end:
                        if not saved:
                            save()
                        raise TrainingStopped(f"stopped by signal {signum} after step {step} of {total}; its "
                                              "checkpoint is written: continue with --resume",
                                              StopSignals.exit_code(signum))
                    if step >= end:
                        break
                else:
                    epoch, position = epoch + 1, 0
                    continue
                break
    finally:
        metrics.close()
        if tensorboard is not None:
            tensorboard.close()
    return records
