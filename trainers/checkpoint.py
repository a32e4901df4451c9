"""Training checkpoints that a crash cannot corrupt: atomic step folders with a completeness marker, resume from the
newest complete one (falling back past corrupt ones), pruning of this run's own older steps, an atomic `final/`.

A checkpoint is a folder `step-NNNNNNN/` under `output_dir/checkpoints/` holding `model/` (config.json +
safetensors in the dtype the config declares, loadable by moca_fast, transformers and sentence-transformers, with
the tokenizer and image processor settings beside it), `master/` (the fp32 master weights, only when `model/` holds
a lower precision, so a resume is exact), `extra.pt` (modules outside the HF model, e.g. the MAE head),
`optimizer.pt`, `trainer_state.pt` (step, data position, scheduler, RNG) and, written last, `checkpoint.json`: the
completeness marker and manifest (format, step, run id, stage, config, data fingerprint, every file's size and
BLAKE2b-128 checksum).
Everything is written into `step-NNNNNNN.tmp/` and flushed to disk, then the marker, then the folder is renamed
into place. A checkpoint counts only when its marker is there; a file whose size or checksum differs from the
marker's, or that fails to load, makes resume fall back to the previous complete checkpoint, naming the file. A
disk that fills up during a write is one clear error (DiskFull); the half-written folder is deleted. Pruning deletes
only this run's older complete checkpoints, each renamed to `*.deleting` first so a kill
mid-delete leaves nothing that looks complete. Sharded (FSDP2) models are gathered to full state dicts on rank 0
with torch.distributed.checkpoint's state-dict API.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..checksums import file_checksum
from ..integrations import write_sentence_transformers_config
from ..model.loading import load_state_dict_into, read_safetensors, save_pretrained
from ..model.moca import MocaModel
from ..parallel.distributed import all_reduce_sum, rank

log = logging.getLogger(__name__)

MARKER = "checkpoint.json"
PREFIX = "step-"
# What a checkpoint's files hold; a resume refuses another. 2: the MAE head's projection in the reference's
# layout (d * 4 + p).
FORMAT = 2
LEFTOVERS = (".tmp", ".deleting")  # suffixes of folders a killed write or delete leaves behind
_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


@dataclass
class Loaded:
    """A checkpoint read into memory, not yet applied: nothing is changed until every file has loaded."""

    path: Path
    manifest: dict
    model: dict[str, torch.Tensor]
    extra: dict | None
    optimizer: dict
    trainer_state: dict


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


def step_folder(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:07d}"


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model,
    extra: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    identity: dict,
    processor=None,
    keep: int = 2,
) -> Path:
    """Write step `step` atomically under `root` (collective under FSDP: every rank calls it). `identity` (run id,
    stage, config, data fingerprint) goes into the marker; then this run's checkpoints beyond the newest `keep` go."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=full)
    extra_state = get_model_state_dict(extra, options=full) if extra is not None else None
    optim_state = get_optimizer_state_dict(_trained(model, extra), optimizer, options=full)
    root = Path(root)
    final = step_folder(root, step)
    if rank() == 0:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with out_of_space_named(tmp, f"checkpoint step {step}"):
            tmp.mkdir(parents=True)
            dtype = save_pretrained(model, tmp / "model", state_dict=model_state)
            write_sentence_transformers_config(tmp / "model")
            if dtype != torch.float32:
                save_pretrained(model, tmp / "master", state_dict=model_state, dtype=torch.float32)
            if processor is not None:
                processor.save_pretrained(tmp / "model")
            if extra_state is not None:
                torch.save(extra_state, tmp / "extra.pt")
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer_state.pt")
            sizes = _sync_files(tmp)
            checksums = {name: file_checksum(tmp / name) for name in sizes}
            write_marker(tmp, {"format": FORMAT, "step": step, **identity, "files": sizes, "checksums": checksums})
        publish(tmp, final)
        prune(root, keep, run=identity["run"], upto=step)
    if dist.is_initialized():
        dist.barrier()
    return final


class DiskFull(CheckpointError):
    """A write ran out of space; what was half-written is gone and what was there before is intact."""


@contextlib.contextmanager
def out_of_space_named(tmp: Path, what: str):
    """Around writing `what` into the new folder `tmp`: when the disk fills up (ENOSPC; torch's zip writer reports
    it as a RuntimeError, so a write error with under FULL_BYTES left counts too), delete `tmp` and raise DiskFull
    naming the filesystem and its free space. Any other failure also deletes `tmp`, and propagates."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        free = _free_bytes(tmp.parent)
        if getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < FULL_BYTES):
            raise DiskFull(
                f"{what} could not be written to {tmp.parent}: the disk is full (ENOSPC, "
                f"{(free or 0) / 2**20:.0f} MiB free); nothing written was kept and earlier checkpoints "
                "are intact: free space, then continue with --resume"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


FULL_BYTES = 64 << 20


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the marker lists has the size, and (markers since checksums) the BLAKE2b-128 checksum, it records;
    raises CheckpointError naming the first that does not (missing, truncated, replaced or with changed bytes)."""
    checksums = manifest.get("checksums", {})
    for name, size in manifest.get("files", {}).items():
        file = path / name
        actual = file.stat().st_size if file.is_file() else None
        if actual != size:
            raise CheckpointError(
                f"{file}: {'missing' if actual is None else f'{actual} bytes'}, the marker "
                f"records {size} bytes (truncated or replaced)"
            )
        if name in checksums and file_checksum(file) != checksums[name]:
            raise CheckpointError(
                f"{file}: its checksum differs from the marker's (the bytes changed since it was written: corrupt)"
            )


def write_marker(folder: Path, manifest: dict) -> None:
    """The completeness marker, written last and flushed: its presence says every other file is on disk."""
    with open(folder / MARKER, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` folder to `final` (replacing an older copy of the same step)."""
    if final.exists():
        _delete(final)
    os.replace(tmp, final)
    _sync_dir(final.parent)


def prune(root: Path, keep: int, *, run: str, upto: int) -> None:
    """Delete this run's complete checkpoints at or before step `upto` beyond the newest `keep` (0: keep all).
    Another run's checkpoints, and this run's later ones, are never touched."""
    mine = [p for p in complete_checkpoints(root) if read_marker(p).get("run") == run and step_of(p) <= upto]
    for old in mine[:-keep] if keep > 0 else []:
        _delete(old)


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Step folders under `root` whose marker is there, oldest first (files are checked when loading)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted((p for p in found if (p / MARKER).is_file()), key=step_of)


def unmarked_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Step folders under `root` without a marker: this writer renames a folder into place only after its marker,
    so these were left by an earlier moca_fast or changed by hand."""
    root = Path(root)
    found = root.glob(f"{PREFIX}*") if root.is_dir() else []
    return sorted(p for p in found if p.is_dir() and p.name[len(PREFIX) :].isdigit() and not (p / MARKER).is_file())


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def read_marker(path: Path) -> dict:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / MARKER}: unreadable marker: {error}") from error


def remove_leftovers(root: Path) -> None:
    """Delete what a killed write or prune left (`*.tmp`, `*.deleting`): never complete, never read."""
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and path.name.endswith(LEFTOVERS):
                shutil.rmtree(path, ignore_errors=True)


def read_checkpoint(path: Path, spec) -> Loaded:
    """Every file of the checkpoint at `path` in memory; a missing, truncated or unreadable file raises
    CheckpointError naming it."""
    manifest = read_marker(path)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{path / MARKER}: format {manifest.get('format')}, this moca_fast reads format "
            f"{FORMAT} (written by another version)"
        )
    verify_files(path, manifest)

    def read(name: str, load):
        try:
            return load(path / name)
        except _READ_ERRORS as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(
                message
                if message.startswith(str(path))  # already names the file
                else f"{path / name}: cannot be read: {message}"
            ) from error

    with torch.device("meta"):  # the HF-layout weights go through the key table into a CPU copy first
        holder = MocaModel(spec)
    holder.to(dtype=torch.float32)
    weights = "master" if (path / "master").is_dir() else "model"  # fp32 when model/ holds less
    read(weights, lambda p: load_state_dict_into(holder, read_safetensors(p, "cpu"), source=str(p)))
    extra = read("extra.pt", lambda p: torch.load(p, weights_only=True)) if (path / "extra.pt").exists() else None
    return Loaded(
        path,
        manifest,
        holder.state_dict(),
        extra,
        read("optimizer.pt", lambda p: torch.load(p, weights_only=False)),
        read("trainer_state.pt", lambda p: torch.load(p, weights_only=False)),
    )


def load_latest(
    root: str | os.PathLike, *, model, extra: torch.nn.Module | None, optimizer: torch.optim.Optimizer, check=None
) -> Loaded | None:
    """Restore model, extra modules, optimizer and RNG from the newest complete checkpoint under `root` whose
    files all load (every rank agrees on which); None when there is none at all. `check(loaded)` may refuse it
    (by raising) before anything is restored. Returns what was loaded (its trainer state without the RNG).
    Corrupt and unmarked checkpoints are named in the log and skipped; when no other is left, CheckpointError lists
    them: a resume never silently starts over."""
    device = next(model.parameters()).device
    failures = [
        f"{path}: no {MARKER} (an earlier moca_fast's, or changed by hand)" for path in unmarked_checkpoints(root)
    ]
    for problem in failures:
        log.warning("skipping checkpoint %s", problem)
    for path in reversed(complete_checkpoints(root)):
        try:
            loaded, problem = read_checkpoint(path, model.spec), None
        except CheckpointError as error:
            loaded, problem = None, str(error)
        if int(all_reduce_sum(torch.tensor([int(problem is not None)], device=device)).item()):
            failures.append(problem or f"{path}: unreadable on another rank")
            log.warning("checkpoint %s is unusable (%s); trying the previous one", path.name, failures[-1])
            continue
        if check is not None:
            check(loaded)
        _apply(loaded, model, extra, optimizer)
        return loaded
    if failures:
        raise CheckpointError("no usable checkpoint: " + "; ".join(failures))
    return None


def _apply(loaded: Loaded, model, extra, optimizer) -> None:
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    set_model_state_dict(model, loaded.model, options=full)
    if extra is not None:
        if loaded.extra is None:
            raise CheckpointError(f"{loaded.path}: no extra.pt, but this stage trains modules outside the model")
        set_model_state_dict(extra, loaded.extra, options=full)
    set_optimizer_state_dict(_trained(model, extra), optimizer, loaded.optimizer, options=full)
    set_rng_state(loaded.trainer_state.pop("rng"))


def export_final(checkpoint: Path, output: Path) -> Path:
    """Copy the checkpoint's model (HF layout, tokenizer and processor settings beside it) to `output/final`
    atomically: into `final.tmp`, flushed, then renamed; an older `final` is replaced only once the new one is
    complete."""
    final, tmp = output / "final", output / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint / "model", tmp)
    _sync_files(tmp)
    publish(tmp, final)
    return final


def _trained(model, extra) -> torch.nn.Module:
    """One module holding everything the optimizer trains, to name its parameters in the optimizer state."""
    return torch.nn.ModuleDict({"model": model, **({"extra": extra} if extra is not None else {})})


def _delete(path: Path) -> None:
    """Rename out of the way first (atomic), then delete: a kill mid-delete leaves a `*.deleting` leftover."""
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _sync_files(folder: Path) -> dict[str, int]:
    """Flush every file under `folder` to disk; their sizes by relative path."""
    sizes = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        sizes[file.relative_to(folder).as_posix()] = file.stat().st_size
    return sizes


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
