"""Stage-1 training in a child process that is killed with SIGKILL at one phase of one checkpoint (used by
test_faults.py): `python fault_worker.py PHASE OUTPUT_DIR THREADS`. Without a phase ("none") it runs to the end.

Each phase wraps the function that does that part of the write; the kill leaves on disk exactly what a
`kill -9` at that moment would: a half-written file, a folder without its marker, a half-deleted checkpoint,
a half-copied `final/`.
"""

import os
import shutil
import signal
import sys
from pathlib import Path

import torch

import moca_fast.trainers.checkpoint as checkpoint
from moca_fast.config import TrainConfig
from moca_fast.data.synthetic import make_documents
from moca_fast.trainers.run import run

KILL_STEP = 6  # checkpoints at 2, 4, 6, 8 (two kept): step 6 is the first that also prunes one
STEPS = 8
DOCUMENTS = dict(n=48, seed=0)


def fault_config(output_dir) -> TrainConfig:
    return TrainConfig(
        stage="cpt",
        model="tiny",
        tokenizer="tiny",
        data="unused",
        output_dir=str(output_dir),
        lr=2e-3,
        grad_accum=1,
        tokens_per_micro_batch=512,
        max_length=256,
        min_pixels=3136,
        max_pixels=3136,
        dtype="float32",
        activation_checkpointing=False,
        num_workers=0,
        max_steps=STEPS,
        checkpoint_every=2,
        keep_checkpoints=2,
    )


def documents():
    return make_documents(**DOCUMENTS)


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def at_kill_step(path) -> bool:
    return f"step-{KILL_STEP:07d}" in str(path)


def inject(phase: str) -> None:
    """Arrange for this process to die at `phase`."""
    if phase == "weights":  # model.safetensors half-written
        real_save_pretrained = checkpoint.save_pretrained

        def save_pretrained(model, path, state_dict=None, **kwargs):
            dtype = real_save_pretrained(model, path, state_dict, **kwargs)
            if at_kill_step(path):
                truncate(Path(path) / "model.safetensors")
                kill()
            return dtype

        checkpoint.save_pretrained = save_pretrained
    elif phase == "optimizer":  # optimizer.pt half-written
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            if str(f).endswith("optimizer.pt") and at_kill_step(f):
                truncate(Path(f))
                kill()

        torch.save = save
    elif phase in ("marker", "publish"):  # every file written; the marker, or the rename into place, not yet
        real = getattr(checkpoint, f"{'write_marker' if phase == 'marker' else 'publish'}")

        def before(folder, *args):
            if at_kill_step(folder):
                kill()
            return real(folder, *args)

        setattr(checkpoint, "write_marker" if phase == "marker" else "publish", before)
    elif phase == "prune":  # step 6 complete, step 2 half-deleted
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if str(path).endswith(".deleting") and Path(path).exists():
                next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
                kill()
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    elif phase == "final":  # the last checkpoint complete, final/ half-copied
        real_copytree = shutil.copytree
        copied = []

        def copy(src, dst, **kwargs):
            if copied:
                kill()
            copied.append(shutil.copy2(src, dst))

        shutil.copytree = lambda src, dst, **kwargs: real_copytree(src, dst, copy_function=copy)
    elif phase != "none":
        raise ValueError(f"unknown phase {phase!r}")


if __name__ == "__main__":
    phase, output_dir, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)  # the parent's, so that the losses are bitwise the same
    inject(phase)
    run(fault_config(output_dir), documents=documents())
    sys.exit(3 if phase != "none" else 0)  # a phase that never fired is a failure of the test
