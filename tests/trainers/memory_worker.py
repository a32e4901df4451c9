"""Measures the resident-memory peak of one real stage-1 step of a tiny model (run as a subprocess by
test_memory_plan.py): the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) over the step,
less the resident size before it, with glibc returning every block of 64 KiB or more to the kernel on free
(MALLOC_MMAP_THRESHOLD_), so the mark follows live tensor bytes. Prints the bytes."""

import sys
from pathlib import Path

import torch

from moca_fast.parallel.memory_plan import apply_recompute, block_kinds, stage1_step

sys.path.insert(0, str(Path(__file__).parent))
from memory_shapes import tiny_model, tiny_pack


def status(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main(documents: int, mode: str) -> None:
    torch.set_num_threads(1)
    model, mae = tiny_model()
    for blocks in block_kinds(model, mae).values():
        for block in blocks:
            apply_recompute(block, mode)
    batch = tiny_pack(documents)
    stage1_step(model, mae, batch, "sdpa")  # warm-up: lazy initialisation stays out of the measure
    for param in [*model.parameters(), *mae.parameters()]:
        param.grad = None
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    stage1_step(model, mae, batch, "sdpa")
    print(status("VmHWM") - before)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
