"""Embedding throughput, ours (MocaEmbedder) against the reference path, with the cosine between the two.

Five workloads in the reference's prompts: realistic inputs (the queries and positives of the reference's 30
stage-2 subsets in their mix, moca_fast/data/realistic.py: pages at the 1,024-token cap, photos, labels and
captions; the first), text queries, 448 x 448 images, document pages (1240 x 1754, i.e. the 1,024-token cap) and
interleaved text-image-text-image inputs, at the real 3B / 7B shapes with random
weights, bf16. Both paths embed the same inputs end to end (raw text and PIL images in, normalised vectors out):
ours packs by token budget with worker-side preprocessing; the reference path (bench/reference_path.py) runs
transformers' image processor and a right-padded batch of `--reference-batch` inputs in input order, as the
reference's evaluation does. The cosine between the two paths' embeddings of each input must be >= 0.999.

GPU only (without CUDA the script says so and exits); the embedders below also run on CPU with a tiny model for
bench/test_benchmarks.py.

    python -m bench.embed --size 3b --out bench/results/embed-3b-<device>.json

`--colqwen` instead measures multi-vector embedding of a tiny random ColQwen2.5 (colpali-engine's, with a random
LoRA adapter; bench/colpali_path.py) on the CPU: ours (MocaEmbedder loading the saved checkpoint, LoRA merged)
against colpali-engine's own processor and forward (its adapter merged too, so LoRA costs neither path anything) in
batches of `--colpali-batch`, on text queries and 448 x 448 images at up to 256 image tokens, in one process with the
same threads; the vectors of the two paths must agree to 1e-4.

    python -m bench.embed --colqwen --out bench/results/colqwen-tiny-cpu.json
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from bench.reference_path import ReferencePath, processor_batch
from bench.report import RESULTS, device_slug, package_version, report, require_cuda, write_report
from bench.train import train_config
from moca_fast import prompts
from moca_fast.data.image_patches import MAX_PIXELS, MIN_PIXELS
from moca_fast.data.processor import Processor
from moca_fast.data.realistic import realistic_inputs
from moca_fast.data.synthetic import random_pages, random_scene, render
from moca_fast.data.tokenizer import tiny_tokenizer
from moca_fast.embed import DEFAULT_BATCH_TOKENS, MocaEmbedder
from moca_fast.integrations.transformers import to_transformers
from moca_fast.model.attention import backend_for
from moca_fast.trainers.setup import build_model

V = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_SIDE = 448
PAGE_SIZE = (1240, 1754)


def workloads(
    n: int, seed: int, image_side: int = IMAGE_SIDE, page_size: tuple[int, int] = PAGE_SIZE
) -> dict[str, tuple[list, list]]:
    """name -> (our inputs, the reference's (text, images) cases), the same content in the reference's prompts."""
    rng = random.Random(seed)

    def image() -> Image.Image:
        return render(random_scene(rng), rng.getrandbits(32)).resize((image_side, image_side))

    def page() -> Image.Image:
        return render(random_pages(1, rng)[0], rng.getrandbits(32)).resize(page_size)

    out = {"realistic": ([], []), "text": ([], []), "image": ([], []), "page": ([], []), "interleaved": ([], [])}
    for text, images in realistic_inputs(n, seed):
        out["realistic"][0].append({"text": text, "image": images[0]} if images else text)
        out["realistic"][1].append((text, images))
    for _ in range(n):
        caption = random_scene(rng).caption
        out["text"][0].append(prompts.text_to_image_query(caption))
        out["text"][1].append((f"Find me an everyday image that matches the given caption: {caption}\n", []))
        im = image()
        out["image"][0].append(prompts.image_target(im))
        out["image"][1].append((f"{V}Represent the given image.\n", [im]))
        pg = page()
        out["page"][0].append(prompts.document_page(pg))
        out["page"][1].append((f"{V}\nRepresent the given document image.", [pg]))
        a, b = image(), image()
        out["interleaved"][0].append([f"{caption}: first ", a, " then ", b])
        out["interleaved"][1].append((f"{caption}: first {V} then {V}", [a, b]))
    return out


class ReferenceEmbedder:
    """The reference's evaluation loop: batches of `batch_size` inputs in order, transformers' preprocessing."""

    def __init__(self, model, tokenizer, *, batch_size: int, min_pixels: int, max_pixels: int):
        from transformers import Qwen2VLImageProcessorPil

        self.path = ReferencePath(to_transformers(model).eval())
        self.tokenizer, self.image_processor = tokenizer, Qwen2VLImageProcessorPil()
        self.batch_size, self.min_pixels, self.max_pixels = batch_size, min_pixels, max_pixels
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode(self, cases: list) -> torch.Tensor:
        out = []
        for i in range(0, len(cases), self.batch_size):
            batch = processor_batch(
                self.tokenizer,
                self.image_processor,
                cases[i : i + self.batch_size],
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
            )
            out.append(self.path.embed(batch.to(self.device)).float())
        return torch.cat(out)


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def embedders(
    model_name: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    workers: int,
    reference_batch: int,
    min_pixels: int,
    max_pixels: int,
):
    """Ours and the reference path over the same random weights."""
    tokenizer = tiny_tokenizer()
    model = build_model(train_config("cl", model_name, "unused"), tokenizer, device).to(dtype).eval()
    processor = Processor(tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)
    reference = ReferenceEmbedder(
        model, tokenizer, batch_size=reference_batch, min_pixels=min_pixels, max_pixels=max_pixels
    )
    return MocaEmbedder(model, processor, num_workers=workers), reference


def our_attention(ours: MocaEmbedder) -> str:
    """The attention backend our embedder's forward resolves to (in its weights' dtype: no autocast here)."""
    return backend_for(ours.model.attention_backend, next(ours.model.parameters()))


def bench_embedding(ours: MocaEmbedder, reference: ReferenceEmbedder, loads: dict, warm: int, device) -> dict:
    results = {}
    for name, (inputs, cases) in loads.items():
        ours.encode(inputs[:warm], convert_to_tensor=True)
        reference.encode(cases[:warm])
        mine, mine_s = timed(functools.partial(ours.encode, inputs, convert_to_tensor=True), device)
        theirs, theirs_s = timed(functools.partial(reference.encode, cases), device)
        cosine = F.cosine_similarity(mine.to(theirs.device).float(), theirs, dim=-1)
        results[name] = {
            "inputs": len(inputs),
            "ours_per_s": len(inputs) / mine_s,
            "reference_per_s": len(inputs) / theirs_s,
            "speedup_vs_reference": theirs_s / mine_s,
            "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()),
        }
    return results


COLQWEN_PIXELS = dict(min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28)


def colqwen_workloads(n: int, seed: int, image_side: int = IMAGE_SIDE) -> dict[str, list]:
    """Text queries (captions of the synthetic world) and images, `n` of each."""
    rng = random.Random(seed)
    return {
        "query": [random_scene(rng).caption for _ in range(n)],
        "image": [render(random_scene(rng), rng.getrandbits(32)).resize((image_side, image_side)) for _ in range(n)],
    }


def colpali_multi_vectors(model, processor, kind: str, inputs: list, batch_size: int) -> list[torch.Tensor]:
    """colpali-engine's multi-vectors of `inputs` ("query" texts or "image"s), batches of `batch_size` in order."""
    from bench.colpali_path import unpadded_vectors

    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            chunk = inputs[i : i + batch_size]
            batch = processor.process_queries(chunk) if kind == "query" else processor.process_images(chunk)
            out += unpadded_vectors(model(**batch), batch["attention_mask"])
    return out


def bench_colqwen(folder, n: int, warm: int, colpali_batch: int, image_side: int = IMAGE_SIDE) -> dict:
    """Inputs per second of ours and colpali-engine's multi-vector embedding of a tiny ColQwen2.5 saved in
    `folder`, per workload, with their ratio and the largest difference between the two paths' vectors."""
    from bench.colpali_path import write_tiny_colqwen

    model, processor, adapter = write_tiny_colqwen(Path(folder), tiny_tokenizer(), **COLQWEN_PIXELS)
    model = model.merge_and_unload().eval()
    ours = MocaEmbedder.from_pretrained(adapter, device="cpu")
    results = {}
    cpu = torch.device("cpu")
    for kind, inputs in colqwen_workloads(n, seed=0, image_side=image_side).items():
        mine = functools.partial(
            ours.encode_query if kind == "query" else ours.encode_document,
            output="multi_vector",
            convert_to_tensor=True,
        )
        theirs = functools.partial(colpali_multi_vectors, model, processor, kind, batch_size=colpali_batch)
        mine(inputs[:warm]), theirs(inputs[:warm])
        ours_vectors, ours_s = timed(functools.partial(mine, inputs), cpu)
        colpali_vectors, colpali_s = timed(functools.partial(theirs, inputs), cpu)
        error = max((a - b).abs().max().item() for a, b in zip(ours_vectors, colpali_vectors))
        if error > 1e-4:
            raise AssertionError(f"{kind}: our multi-vectors differ from colpali-engine's by {error:.2e}")
        results[kind] = {
            "inputs": n,
            "tokens": sum(len(v) for v in ours_vectors),
            "ours_per_s": n / ours_s,
            "colpali_per_s": n / colpali_s,
            "ratio_ours_to_colpali": colpali_s / ours_s,
            "max_abs_difference": error,
        }
    return results


def colqwen_main(args) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        results = bench_colqwen(folder, args.inputs, args.warm, args.colpali_batch)
    for name, r in results.items():
        print(
            f"{name:6s} ours {r['ours_per_s']:8.1f}/s colpali-engine {r['colpali_per_s']:8.1f}/s "
            f"x{r['ratio_ours_to_colpali']:.2f} max abs {r['max_abs_difference']:.1e}",
            flush=True,
        )
    write_report(
        args.out or RESULTS / "colqwen-tiny-cpu.json",
        report(
            "multi-vector embedding, tiny random ColQwen2.5 (LoRA merged), fp32, CPU: ours vs colpali-engine",
            "cpu",
            shapes={
                "inputs_per_workload": args.inputs,
                "image_side": IMAGE_SIDE,
                "pixels": [COLQWEN_PIXELS["min_pixels"], COLQWEN_PIXELS["max_pixels"]],
                "colpali_batch": args.colpali_batch,
                "our_batch_tokens": DEFAULT_BATCH_TOKENS,
                "threads": torch.get_num_threads(),
            },
            results=results,
            colpali_engine=package_version("colpali-engine"),
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--colqwen",
        action="store_true",
        help="tiny ColQwen2.5 multi-vectors on the CPU, ours vs colpali-engine (see above)",
    )
    parser.add_argument("--colpali-batch", type=int, default=16, help="--colqwen: colpali-engine's batch size")
    parser.add_argument("--size", choices=["3b", "7b"], default="3b")
    parser.add_argument("--inputs", type=int, default=256, help="inputs per workload")
    parser.add_argument("--warm", type=int, default=16)
    parser.add_argument("--workers", type=int, default=8, help="our preprocessing workers")
    parser.add_argument("--reference-batch", type=int, default=16)
    parser.add_argument("--out", help="JSON path (default bench/results/embed-<size>-<device>.json)")
    args = parser.parse_args()
    if args.colqwen:
        return colqwen_main(args)
    device = require_cuda("embedding throughput")
    ours, reference = embedders(
        f"random:{args.size}",
        device,
        torch.bfloat16,
        workers=args.workers,
        reference_batch=args.reference_batch,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    results = bench_embedding(ours, reference, workloads(args.inputs, seed=0), args.warm, device)
    for name, r in results.items():
        print(
            f"{name:12s} ours {r['ours_per_s']:8.1f}/s reference {r['reference_per_s']:8.1f}/s "
            f"x{r['speedup_vs_reference']:.2f} cosine min {r['cosine_min']:.5f}",
            flush=True,
        )
    out = args.out or RESULTS / f"embed-{args.size}-{device_slug(torch.cuda.get_device_name())}.json"
    write_report(
        out,
        report(
            f"embedding, random-weight Qwen2.5-VL-{args.size.upper()}, bf16",
            device,
            shapes={
                "size": args.size,
                "inputs_per_workload": args.inputs,
                "image_side": IMAGE_SIDE,
                "page": PAGE_SIZE,
                "pixels": [MIN_PIXELS, MAX_PIXELS],
                "reference_batch": args.reference_batch,
                "our_batch_tokens": ours.batch_tokens,
                "workers": args.workers,
                "our_attention": our_attention(ours),
                "reference_attention": reference.path.attention,
            },
            results=results,
        ),
    )


if __name__ == "__main__":
    main()
