"""The training loop shared by both stages: optimizer, schedule, clipping, metrics, atomic checkpoints, resume.

A stage supplies the data and the step (forward and backward of one optimizer step's micro-batches); the
loop does everything else. Resume restores model, optimizer, scheduler, RNG and the data position (epoch,
optimizer steps taken in it), so the continued run sees exactly the batches and updates the uninterrupted
one would have.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterator, Protocol

import torch
from torch import nn

from moca_fast.config import TrainConfig

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import rank, world_size
from .metrics import MetricsLogger, device_peak_flops
from .optim import adamw, warmup_linear_decay
from .tensorboard import TensorBoardWriter

log = logging.getLogger(__name__)


class Stage(Protocol):
    model: nn.Module  # the backbone (a MocaModel, possibly sharded)
    extra: nn.Module | None  # trained modules outside the HF model (the MAE head)

    def steps_per_epoch(self) -> int: ...

    def step_inputs(self, epoch: int, start: int) -> Iterator: ...

    def train_step(self, inputs) -> dict[str, float]: ...


def train(config: TrainConfig, stage: Stage, *, processor=None, device: torch.device, resume: bool = False,
          stop_after: int | None = None) -> list[dict]:
    """Run `stage` for the configured epochs / max_steps; returns the logged records of this process. A
    finished run leaves its model (HF layout, `processor`'s tokenizer and settings beside it) in `output_dir/final`.

    `stop_after` ends the run after that many optimizer steps in total (the schedule is unchanged), as an
    interruption would; a later call with `resume=True` continues from the last checkpoint."""
    output = Path(config.output_dir)
    total = config.max_steps or stage.steps_per_epoch() * config.epochs
    params = [p for m in (stage.model, stage.extra) if m is not None for p in m.parameters()]
    optimizer = adamw(params, config.lr, config.weight_decay, config.betas)
    scheduler = warmup_linear_decay(optimizer, total, config.warmup_ratio)
    step, epoch, position = 0, 0, 0
    checkpoint = latest_checkpoint(output / "checkpoints") if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=stage.model, extra=stage.extra, optimizer=optimizer)
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        log.info("resumed from %s at step %d (epoch %d, position %d)", checkpoint, step, epoch, position)
    elif resume:
        log.info("no checkpoint under %s: starting from scratch", output / "checkpoints")
    end = min(total, stop_after) if stop_after is not None else total
    peak = device_peak_flops(device)  # one device's; the logged tokens and FLOPs are every rank's
    metrics = MetricsLogger(output / "metrics.jsonl", total, step, enabled=rank() == 0,
                            peak_flops=peak * world_size() if peak else None)
    tensorboard = TensorBoardWriter(output / "tensorboard") if config.tensorboard and rank() == 0 else None
    records = []

    def save() -> Path:
        return save_checkpoint(output / "checkpoints", step, model=stage.model, extra=stage.extra, optimizer=optimizer,
                        processor=processor, keep=config.keep_checkpoints,
                        trainer_state={"step": step, "epoch": epoch, "position": position,
                                       "scheduler": scheduler.state_dict()})

    try:
        while step < end:
            for inputs in stage.step_inputs(epoch, position):
                values = stage.train_step(inputs)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
                values["lr"] = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step, position = step + 1, position + 1
                values["grad_norm"] = float(grad_norm)
                records.append(metrics.log(step, values))
                if tensorboard is not None:
                    tensorboard.log(records[-1])
                if step % config.checkpoint_every == 0 or step == end:
                    saved = save()
                    if step == total and rank() == 0:  # finished: the model alone, in the HF layout
                        shutil.rmtree(output / "final", ignore_errors=True)
                        shutil.copytree(saved / "model", output / "final")
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
