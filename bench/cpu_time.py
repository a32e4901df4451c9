"""CPU time of a training step, ours against the reference path, on the realistic pool: the tiny model, one thread.

What packing, the fused heads and one contrastive forward save in time where it can be measured without a GPU:
the tiny model (moca_fast/model/tiny.py) trains through a small realistic pool (moca_fast/data/realistic.py) at
the reference's pixel budget, max_len and stage-1 budget (stage 2: one step of as many pairs), each path grouping the
samples its own way (bench/train.py's
trainers, without compile). One thread, CPU seconds of the process (time.process_time), the median of 5 passes
over the pool after one warm-up step. CPU figures of a toy model: its widths make element-wise work and Python
count for more than on a GPU at 3B, so the ratio is not a GPU speed-up; bench/work.py reports it beside the
FLOP ratio of the same samples.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.train import OursTrainer, ReferenceTrainer, StagePool, stage_pool, train_config

REPEATS = 5


def cpu_pool(stage: str, n: int, folder: Path) -> StagePool:
    """`n` realistic samples (stage 1), or one step of `n` pairs (stage 2), for the tiny model at the reference's
    pixel budget, max_len and stage-1 budget; the warm-up is as large."""
    config = replace(train_config(stage, "tiny", "in memory", reference_shapes=True), pairs_per_rank=n)
    return stage_pool(stage, "tiny", n, n, folder, "realistic", config)


def cpu_seconds(p: StagePool, path: str, repeats: int = REPEATS) -> list[float]:
    """CPU seconds of `path` training through the pool, once per repeat (after a warm-up step on the check batch)."""
    device = torch.device("cpu")
    if path == "reference":
        trainer = ReferenceTrainer(p.config, p.tokenizer, p.processor, device)
    else:
        trainer = OursTrainer(p.config, p.data, p.tokenizer, p.processor, device)
    inputs = [trainer.prepare(g) for g in p.micro_batches(path, p.pool)]
    trainer.step(trainer.prepare(p.check))
    seconds = []
    for _ in range(repeats):
        start = time.process_time()
        for x in inputs:
            trainer.step(x)
        seconds.append(time.process_time() - start)
    return seconds


def cpu_time_ratio(p: StagePool, repeats: int = REPEATS) -> dict:
    """Both paths' CPU seconds over the pool on one thread (median of `repeats`) and the reference's over ours."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {path: cpu_seconds(p, path, repeats) for path in ("ours", "reference")}
    finally:
        torch.set_num_threads(threads)
    median = {path: statistics.median(s) for path, s in runs.items()}
    return {
        "model": "tiny",
        "threads": 1,
        "repeats": repeats,
        "tokens": p.tokens,
        "cpu_seconds": runs,
        "median_cpu_seconds": median,
        "reference_over_ours": median["reference"] / median["ours"],
    }
