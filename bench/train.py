"""Training throughput of both stages at the real 3B / 7B shapes with random weights, on synthetic data.

For each stage: a few hundred optimizer steps through the real trainer (packing, fused kernels, compile,
activation checkpointing, optional FP8), then tokens/s, MFU (vision tower FLOPs counted) and peak memory
from the steady-state steps, as JSON in bench/results/. GPU only: CPU timings of this code mean nothing, so
without CUDA the script says so and exits. The reference-path comparison (transformers + Liger, padded) is
added by the benchmark suite of issue 7.

    python bench/train.py --size 3b --steps 200 --out bench/results/train-3b-<device>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from moca_fast.config import TrainConfig
from moca_fast.data.synthetic import make_documents, make_pairs, write_pairs
from moca_fast.trainers.run import run


def stage_config(stage: str, size: str, steps: int, out: Path, data: Path, args) -> TrainConfig:
    common = dict(model=f"random:{size}", tokenizer="tiny", output_dir=str(out / stage), max_steps=steps,
                  checkpoint_every=10**9, dtype="bfloat16", compile=not args.no_compile, fp8=args.fp8,
                  activation_checkpointing=True, num_workers=args.workers, lr=1e-5, warmup_ratio=0.05)
    if stage == "cpt":
        return TrainConfig(stage="cpt", data="synthetic", grad_accum=1, tokens_per_micro_batch=12800, **common)
    return TrainConfig(stage="cl", data=str(data), pairs_per_rank=24, negative_ratio=2, **common)


def summarise(records: list[dict], warmup: int) -> dict:
    steady = records[warmup:] or records
    return {
        "steps": len(records),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady) if "mfu" in steady[0] else None,
        "max_memory_gb": max(r.get("max_memory_gb", 0.0) for r in records),
        "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["3b", "7b"], default="3b")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the medians (compile, caches)")
    parser.add_argument("--stages", nargs="+", default=["cpt", "cl"])
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/train.py measures GPU training throughput; there is no CUDA device here "
                 "(CPU timings of this code mean nothing).")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_pairs(make_pairs(max(200, 24 * (args.steps + 2) // 4), seed=0), tmp / "pairs", seed=0)
        documents = make_documents(40 * (args.steps + 2), seed=0)
        for stage in args.stages:
            config = stage_config(stage, args.size, args.steps, tmp / "runs", tmp / "pairs", args)
            torch.cuda.reset_peak_memory_stats()
            records = run(config, documents=documents if stage == "cpt" else None)
            results[stage] = summarise(records, args.warmup)
    import triton

    report = {
        "benchmark": f"training steps, random-weight Qwen2.5-VL-{args.size.upper()}, synthetic data",
        "device": torch.cuda.get_device_name(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "settings": {"fp8": args.fp8, "compile": not args.no_compile, "activation_checkpointing": True,
                     "tokens_per_micro_batch": 12800, "pairs_per_rank": 24, "negatives_per_query": 2},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
