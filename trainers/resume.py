"""What makes a resumed run the same run: the output folder's rules, the run's identity (stage, config digest, data
fingerprint, world size) checked against the checkpoint's, explicit config changes, metrics cut back to the step.

- A run refuses an output folder that already holds a run (checkpoints, final model, metrics) unless it resumes
  it or is told to overwrite it; overwriting deletes only those outputs.
- Fields that change how a run is carried out but not what it computes (BOOKKEEPING: those TrainConfig declares
  Free on resume, moca_fast/config.py) may differ on resume. Any other difference, or other data, is refused unless
  the changes are allowed explicitly; then each is logged and applied (optimizer settings into the restored
  optimizer, the schedule from the new length). A checkpoint of the other stage is always refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import asdict, fields
from pathlib import Path

import torch.distributed as dist

from ..config import TrainConfig, free_on_resume
from .checkpoint import remove_leftovers

log = logging.getLogger(__name__)

RUN_OUTPUTS = ("checkpoints", "final", "final.tmp", "metrics.jsonl")
# The config fields free to change on resume, as each declares (OnResume in moca_fast/config.py).
BOOKKEEPING = frozenset(f.name for f in fields(TrainConfig) if free_on_resume(f.name))


def prepare_output(output: Path, *, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Refuse an output folder holding another run unless resuming or overwriting; clear it for an overwrite,
    drop a killed write's leftovers for a resume. Every rank checks; the main rank changes files."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir {output} is a file, not a folder")
    found = [name for name in RUN_OUTPUTS if (output / name).exists()]
    if found and not (resume or overwrite):
        raise ValueError(
            f"output_dir {output} already holds a run ({', '.join(found)}); pass --resume to continue "
            "it or --overwrite to replace it"
        )
    if is_main:
        if overwrite and found:
            log.info("--overwrite: deleting %s under %s", ", ".join(found), output)
            for name in found:
                path = output / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        remove_leftovers(output / "checkpoints")
        shutil.rmtree(output / "final.tmp", ignore_errors=True)
        output.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()


def identity(config: TrainConfig, world_size: int, data_fingerprint: str) -> dict:
    """What a checkpoint records about its run; `run` (a new id, or the resumed run's) is added by the loop."""
    compared = json.loads(json.dumps({k: v for k, v in asdict(config).items() if k not in BOOKKEEPING}))
    compared["world_size"] = world_size
    digest = hashlib.blake2b(json.dumps(compared, sort_keys=True).encode(), digest_size=16).hexdigest()
    return {"stage": config.stage, "config": compared, "config_digest": digest, "data": data_fingerprint}


def new_run_id() -> str:
    return uuid.uuid4().hex


def check_resume(manifest: dict, current: dict, path: Path, *, allow_changes: bool) -> list[str]:
    """The differences between the checkpoint's run and this one, as 'name: old -> new'; raises ValueError on
    another stage, or on any difference unless `allow_changes` (then each is logged as applied)."""
    if manifest.get("stage") != current["stage"]:
        raise ValueError(
            f"{path} is a checkpoint of stage {manifest.get('stage')!r}, this run is stage "
            f"{current['stage']!r}: resume it with its own stage, or start this run in a new output_dir"
        )
    changes = []
    if manifest.get("config_digest") != current["config_digest"]:
        saved, now = manifest.get("config", {}), current["config"]
        changes += [
            f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)
        ]
    if manifest.get("data") != current["data"]:
        changes.append(f"data fingerprint: {manifest.get('data')} -> {current['data']} (other samples)")
    if changes and not allow_changes:
        raise ValueError(
            f"the run differs from its checkpoint {path}: {'; '.join(changes)}. Resume with the "
            "original config and data, or pass --allow-config-change to apply the changes"
        )
    for change in changes:
        log.warning(
            "resuming %s with a change (applied; the run no longer equals an uninterrupted one): %s", path.name, change
        )
    return changes


def apply_optimizer_settings(optimizer, scheduler, config: TrainConfig) -> None:
    """Put the config's lr, betas and weight decay into a restored optimizer and schedule (which carry the
    checkpoint's); the schedule's shape already follows the config's length."""
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(
            initial_lr=config.lr,
            lr=config.lr * factor(scheduler.last_epoch),
            betas=tuple(config.betas),
            weight_decay=config.weight_decay,
        )
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps up to `step` (those a resume replays would repeat), and no torn last line."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _logged_step(line) <= step]
    if kept != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        log.info("%s: dropped %d records after step %d", path, len(lines) - len(kept), step)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
