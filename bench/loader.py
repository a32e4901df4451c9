"""Throughput of the stage-1 data path alone (decode, resize, patchify, mask, pack) on the CPU.

The loader runs on the host in production too, so these CPU numbers are the real thing: they say whether
preprocessing can keep a GPU fed. Run: `python -m bench.loader --workers 0 2 --out bench/results/loader-cpu.json`
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from bench.report import report, write_report
from moca_fast.data.documents import DocumentDataset
from moca_fast.data.image_patches import MAX_PIXELS, MIN_PIXELS
from moca_fast.data.loader import MaskedDocuments, PackCollator, packed_loader
from moca_fast.data.packing import TokenBudgetSampler
from moca_fast.data.processor import Processor
from moca_fast.data.realistic import realistic_documents
from moca_fast.data.synthetic import make_documents, write_documents
from moca_fast.data.tokenizer import tiny_tokenizer


def measure(samples: MaskedDocuments, processor: Processor, budget: int, workers: int) -> dict:
    sampler = TokenBudgetSampler(samples.lengths(), budget, seed=0)
    loader = packed_loader(samples, sampler, PackCollator(processor), num_workers=workers)
    start = time.perf_counter()
    n_samples = n_tokens = n_batches = 0
    for batch in loader:
        n_samples += batch.num_sequences
        n_tokens += batch.num_tokens
        n_batches += 1
    seconds = time.perf_counter() - start
    return {
        "workers": workers,
        "batches": n_batches,
        "samples": n_samples,
        "tokens": n_tokens,
        "seconds": round(seconds, 3),
        "samples_per_s": round(n_samples / seconds, 1),
        "tokens_per_s": round(n_tokens / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=256)
    parser.add_argument("--budget", type=int, default=12800, help="tokens per micro-batch (the reference's)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument(
        "--reference-pixels",
        action="store_true",
        help="the reference's 256..1024 tokens per image (default: the demo's small budget)",
    )
    parser.add_argument(
        "--data",
        choices=["realistic", "uniform"],
        default="realistic",
        help="realistic: the reference's stage-1 sources' shapes (moca_fast/data/realistic.py); "
        "uniform: the synthetic world",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    processor = Processor(
        tiny_tokenizer(),
        min_pixels=MIN_PIXELS if args.reference_pixels else 4 * 28 * 28,
        max_pixels=MAX_PIXELS if args.reference_pixels else 64 * 28 * 28,
    )
    with tempfile.TemporaryDirectory() as tmp:
        documents = (
            realistic_documents(args.documents, seed=0)
            if args.data == "realistic"
            else make_documents(args.documents, seed=0)
        )
        path = write_documents(documents, os.path.join(tmp, "docs"), "dataset")
        samples = MaskedDocuments(DocumentDataset(path), processor)
        results = [measure(samples, processor, args.budget, w) for w in args.workers]
    data = report(
        f"stage-1 loader (synthetic documents, {args.data} pool, saved-dataset format)",
        "cpu",
        shapes={
            "documents": args.documents,
            "data": args.data,
            "token_budget": args.budget,
            "pixels_per_image": [processor.min_pixels, processor.max_pixels],
        },
        results=results,
    )
    print(json.dumps(data, indent=2))
    if args.out:
        write_report(args.out, data)


if __name__ == "__main__":
    main()
