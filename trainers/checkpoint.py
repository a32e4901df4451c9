"""Atomic, resumable training checkpoints: the model in the Hugging Face layout, plus everything a resume needs.

A checkpoint is a folder `step-NNNNNNN/` holding `model/` (config.json + safetensors in the dtype the config
declares, loadable by moca_fast, transformers and sentence-transformers, with the tokenizer and image processor
settings beside it), `master/` (the fp32 master weights, only when `model/` holds a lower precision, so a resume
is exact), `extra.pt` (modules outside the HF model, e.g. the MAE head),
`optimizer.pt`, and `trainer_state.json` (step, data position, scheduler, RNG). It is written into a
`.tmp` folder that is renamed into place only when complete, then `latest` is replaced atomically, so a crash
mid-write leaves the previous checkpoint as the one a resume finds. Sharded (FSDP2) models are gathered to
full state dicts on rank 0 with torch.distributed.checkpoint's state-dict API.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from moca_fast.model.heads import mae_state_from_patch_major, rows_from_patch_major
from moca_fast.model.loading import load_state_dict_into, read_safetensors, save_pretrained
from moca_fast.model.moca import MocaModel

from .distributed import rank

LATEST = "latest"
# What a checkpoint's files hold. 2: the MAE head's projection in the reference's layout (d * 4 + p). 1 (written
# without a "format"): patch-major (p * 1176 + d), converted when loaded.
FORMAT = 2


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | os.PathLike, step: int, *, model, extra: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer, trainer_state: dict, processor=None, keep: int = 2) -> Path:
    """Write step `step` atomically under `root` (collective under FSDP: every rank calls it)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=full)
    extra_state = get_model_state_dict(extra, options=full) if extra is not None else None
    optim_state = get_optimizer_state_dict(_trained(model, extra), optimizer, options=full)
    root = Path(root)
    final = root / f"step-{step:07d}"
    if rank() == 0:
        tmp = root / f"step-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if save_pretrained(model, tmp / "model", state_dict=model_state) != torch.float32:
            save_pretrained(model, tmp / "master", state_dict=model_state, dtype=torch.float32)
        if processor is not None:
            processor.save_pretrained(tmp / "model")
        if extra_state is not None:
            torch.save(extra_state, tmp / "extra.pt")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"format": FORMAT, **{
            k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str))}}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _point_latest(root, final.name)
        _prune(root, keep)
    if dist.is_initialized():
        dist.barrier()
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: str | os.PathLike, *, model, extra: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, extra modules, optimizer and RNG from `path`; returns the trainer state."""
    path = Path(path)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    with torch.device("meta"):  # the HF-layout weights go through the key table into a CPU copy first
        holder = MocaModel(model.spec)
    holder.to(dtype=torch.float32)
    weights = path / "master" if (path / "master").is_dir() else path / "model"
    load_state_dict_into(holder, read_safetensors(weights, "cpu"), source=str(path))
    set_model_state_dict(model, holder.state_dict(), options=full)
    optim_state = torch.load(path / "optimizer.pt", weights_only=False)
    if extra is not None:
        extra_state = torch.load(path / "extra.pt", weights_only=True)
        if json.loads((path / "trainer_state.json").read_text()).get("format", 1) < 2:
            extra_state, optim_state = _mae_from_patch_major(extra_state, optim_state)
        set_model_state_dict(extra, extra_state, options=full)
    set_optimizer_state_dict(_trained(model, extra), optimizer, optim_state, options=full)
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    set_rng_state(state.pop("rng"))
    return state


def _mae_from_patch_major(extra_state: dict, optim_state: dict) -> tuple[dict, dict]:
    """A format-1 checkpoint's MAE head and its AdamW moments with the projection rows in the reference's layout."""
    for name in ("proj.weight", "proj.bias"):
        moments = optim_state["state"].get(f"extra.{name}", {})
        for key, value in moments.items():
            if key != "step":
                moments[key] = rows_from_patch_major(value)
    return mae_state_from_patch_major(extra_state), optim_state


def _trained(model, extra) -> torch.nn.Module:
    """One module holding everything the optimizer trains, to name its parameters in the optimizer state."""
    return torch.nn.ModuleDict({"model": model, **({"extra": extra} if extra is not None else {})})


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f"{LATEST}.tmp"
    tmp.write_text(name)
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
