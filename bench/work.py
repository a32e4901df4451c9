"""Work accounting, ours against the reference path on the same samples: FLOPs and processed tokens (counts, not times).

The pools bench/train.py times (its defaults: 48 warm-up + 240 timed stage-1 documents, the same number of stage-2
pairs at the reference's pixel budget), both of them: `realistic` (moca_fast/data/realistic.py: the image sizes,
text lengths and task mixes of the reference's stage-1 sources and 30 stage-2 subsets; bench/train.py's default)
and `uniform` (the synthetic world: every image 256 tokens, text-only documents, single images and interleaved
ones), grouped as each path groups them, at the Qwen2.5-VL-3B / 7B shapes (random:3b / random:7b: only the spec
is needed, no weights). Per path:

- ours: the trainer's stage-1 micro-batches (the reference's cost buckets, `micro_batch_budget: reference_cost`),
  each packed without padding; the masked-LM kernel on the
  masked rows (4 logit-sized GEMMs: log-sum-exp, recompute, two gradients); the MAE layer's queries on the masked
  image rows only, keys and values over the packed tokens; one packed forward per contrastive step.
- reference (bench/reference_path.py): cost buckets of 12,800 units right-padded to a multiple of 32 (the very
  `cost_buckets` and `pad_sequences`); Liger's fused linear cross-entropy over every padded row (3 GEMMs); the MAE
  layer over every padded position; three padded forwards per contrastive step (queries, positives, negatives).
- both: activation checkpointing as bench/train.py configures it (decoder layers, vision blocks and the MAE layer
  recompute their forward in backward); the MAE projection on the chosen rows; forward + backward = 3 forwards.

Attention is counted over each sequence's real tokens in both paths, as flash-attn 2 (the reference's) runs it;
SDPA over a padded batch would cost the reference more. The InfoNCE loss itself (~1e-6 of a stage-2 step) and
element-wise work are not counted. `useful` is what bench/train.py divides by for MFU (trainers/cpt.step_flops:
the backbone's forward + backward on real tokens and the LM head on masked rows; stage 2: three times each
sequence's forward).

Beside the FLOP ratios, bench/cpu_time.py's CPU-time ratio of the two paths on the realistic pool (the tiny
model, one thread, median of 5; labelled CPU: it says what packing saves in time on a CPU, not on a GPU).

    python -m bench.work                      # 3B and 7B -> bench/results/work-3b.json, work-7b.json
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from bench.cpu_time import REPEATS, cpu_pool, cpu_time_ratio
from bench.fused_kernels import linear_ce_flops, patch_reconstruction_flops
from bench.planned_work import planned_columns
from bench.reference_path import BUCKET_COST, PAD_MULTIPLE, pad_sequences
from bench.report import RESULTS, report, write_report
from bench.train import POOLS, StagePool, stage_pool, train_config
from moca_fast.data.batch import pack_sequences
from moca_fast.trainers.metrics import attention_pairs, decoder_layer_flops, forward_flops

STAGES = ("cpt", "cl")


def blocks_forward_flops(spec, batch) -> float:
    """The part of a forward that activation checkpointing recomputes: the decoder layers and vision blocks (the
    patch embedding and the merger are not checkpointed)."""
    bare = replace(
        spec, text=replace(spec.text, num_layers=0), vision=replace(spec.vision, depth=0, fullatt_block_indexes=())
    )
    return forward_flops(spec, batch) - forward_flops(bare, batch)


def padded_view(packed, rows: int, length: int) -> SimpleNamespace:
    """A packed batch as the reference's decoder runs it: `rows` x `length` positions through every linear layer,
    attention over each sequence's real tokens; the vision tower sees the same patches."""
    return SimpleNamespace(
        num_tokens=rows * length, cu_seqlens=packed.cu_seqlens, pixel_values=packed.pixel_values, vision=packed.vision
    )


def backbone_work(spec, batch) -> dict:
    """Forward + backward of the backbone and the recomputed blocks' forward."""
    return {"backbone": 3 * forward_flops(spec, batch), "recompute": blocks_forward_flops(spec, batch)}


def add(total: dict, part: dict) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def stage1_work(p: StagePool, path: str) -> dict:
    """FLOPs by component and processed rows of one path over the stage-1 pool."""
    spec, image_id, pad_id = p.spec, p.processor.image_token_id, p.tokenizer.pad_token_id
    text = spec.text
    flops, rows = {}, {}
    groups = p.micro_batches(path, p.pool)
    for group in groups:
        packed = pack_sequences(group, image_id)
        masked, chosen = packed.mlm_index.numel(), packed.mae_index.numel()
        if path == "reference":
            decoder = padded_view(packed, *pad_sequences(group, pad_id).input_ids.shape)
            positions = decoder.num_tokens
            mae_layer = decoder_layer_flops(text, positions, positions, attention_pairs(packed.cu_seqlens))
            lm_rows, mae_queries, kernel = positions, positions, "liger"
        else:
            decoder = packed
            per_sequence = packed.mae_cu_seqlens.diff().double() * packed.cu_seqlens.diff().double()
            mae_layer = decoder_layer_flops(text, chosen, packed.num_tokens, float(per_sequence.sum()))
            lm_rows, mae_queries, kernel = masked, chosen, "moca_fast"
        add(
            flops,
            {
                **backbone_work(spec, decoder),
                "lm_head": linear_ce_flops(lm_rows, text.hidden_size, text.vocab_size, kernel),
                "mae_layer": 4 * mae_layer,
                "mae_projection": patch_reconstruction_flops(chosen, text.hidden_size),
            },
        )
        add(
            rows,
            {
                "decoder_tokens": decoder.num_tokens,
                "real_tokens": packed.num_tokens,
                "lm_head_rows": lm_rows,
                "mae_layer_queries": mae_queries,
                "vision_patches": packed.pixel_values.shape[0],
            },
        )
    return {
        "micro_batches": len(groups),
        "forwards": len(groups),
        "flops": {**flops, "total": sum(flops.values())},
        "rows": rows,
    }


def stage2_work(p: StagePool, path: str) -> dict:
    """FLOPs and processed rows of one path over the stage-2 pool: one packed forward per step, or three padded."""
    spec, image_id, pad_id = p.spec, p.processor.image_token_id, p.tokenizer.pad_token_id
    flops, rows, forwards = {}, {}, 0
    for group in p.pool:
        sides = [[q.query for q in group], [q.positive for q in group], [n for q in group for n in q.negatives]]
        parts = [[s for side in sides for s in side]] if path != "reference" else [side for side in sides if side]
        for sequences in parts:
            packed = pack_sequences(sequences, image_id)
            batch = packed
            if path == "reference":
                batch = padded_view(packed, *pad_sequences(sequences, pad_id).input_ids.shape)
            add(flops, backbone_work(spec, batch))
            add(
                rows,
                {
                    "decoder_tokens": batch.num_tokens,
                    "real_tokens": packed.num_tokens,
                    "vision_patches": packed.pixel_values.shape[0],
                },
            )
            forwards += 1
    return {"steps": len(p.pool), "forwards": forwards, "flops": {**flops, "total": sum(flops.values())}, "rows": rows}


def pool_composition(p: StagePool) -> dict:
    """What the pool holds: sequences, how many carry images, images, real tokens."""
    sequences = (
        p.pool if p.stage == "cpt" else [s for g in p.pool for q in g for s in (q.query, q.positive, *q.negatives)]
    )
    images = [s.image_grid_thw.shape[0] for s in sequences]
    composition = {
        "sequences": len(sequences),
        "text_only": sum(n == 0 for n in images),
        "single_image": sum(n == 1 for n in images),
        "several_images": sum(n > 1 for n in images),
        "images": sum(images),
        "tokens": p.tokens,
        "image_tokens": sum(int((s.input_ids == p.processor.image_token_id).sum()) for s in sequences),
    }
    if p.stage == "cl":
        composition["pairs"] = sum(len(g) for g in p.pool)
    return composition


@functools.cache
def drawn_pool(stage: str, model: str, n_warm: int, n_pool: int, folder: Path, data: str) -> StagePool:
    """One pool's samples, drawn and encoded once for both reference sizes (the same tokenizer and pixels)."""
    if model == "tiny":
        return stage_pool(stage, model, n_warm, n_pool, folder / "tiny", data)
    return (
        drawn_pool(stage, "random:3b", n_warm, n_pool, folder, data)
        if model != "random:3b"
        else stage_pool(stage, model, n_warm, n_pool, folder / "reference-pixels", data)
    )


def stage_work(stage: str, model: str, n_warm: int, n_pool: int, folder: Path, data: str = "realistic") -> dict:
    """Both paths' work on one stage's pool, and the reference's work over ours."""
    p = drawn_pool(stage, model, n_warm, n_pool, folder, data)
    p = p if model == p.config.model else p.with_model(model)
    count = stage1_work if stage == "cpt" else stage2_work
    paths = {path: count(p, path) for path in ("ours", "reference")}
    ours, reference = paths["ours"], paths["reference"]
    return {
        "pool": pool_composition(p),
        "useful_flops": p.useful_flops,
        "paths": paths,
        "reference_over_ours": {
            "flops": reference["flops"]["total"] / ours["flops"]["total"],
            **{k: reference["rows"][k] / ours["rows"][k] for k in reference["rows"] if ours["rows"].get(k)},
        },
        "under_memory_plans": planned_columns(p, {"paths": paths}),  # bench/planned_work.py
    }


def cpu_time(n: int, repeats: int, folder: Path) -> dict:
    """bench/cpu_time.py's CPU-time ratio on `n` realistic samples / pairs (tiny model, one thread), with the FLOP
    ratio of the same samples beside it."""
    out = {}
    for stage in STAGES:
        p = cpu_pool(stage, n, folder / "cpu")
        count = stage1_work if stage == "cpt" else stage2_work
        flops = {path: count(p, path)["flops"]["total"] for path in ("ours", "reference")}
        out[stage] = {**cpu_time_ratio(p, repeats), "flops_reference_over_ours": flops["reference"] / flops["ours"]}
        print(
            f"tiny {stage} on one CPU thread: reference / ours = {out[stage]['reference_over_ours']:.2f}x CPU time, "
            f"{out[stage]['flops_reference_over_ours']:.2f}x FLOPs",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=["3b", "7b", "tiny"],
        default=["3b", "7b"],
        help="tiny: the tests' model and pixel budget (a quick check of this script)",
    )
    parser.add_argument("--warm", type=int, default=48, help="bench/train.py's warm-up samples / pairs (not counted)")
    parser.add_argument("--pool", type=int, default=240, help="bench/train.py's timed samples / pairs (counted)")
    parser.add_argument(
        "--cpu-pool",
        type=int,
        default=8,
        help="realistic samples (stage 1) / pairs (one stage-2 step) the tiny model's CPU time covers",
    )
    parser.add_argument("--cpu-repeats", type=int, default=REPEATS, help="passes over it (the median is reported)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="writes work-<size>.json here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cpu = cpu_time(args.cpu_pool, args.cpu_repeats, Path(tmp))
        for size in args.sizes:
            model = "tiny" if size == "tiny" else f"random:{size}"
            results = {
                data: {stage: stage_work(stage, model, args.warm, args.pool, Path(tmp), data) for stage in STAGES}
                for data in POOLS
            }
            for data, stage, r in [(d, s, r) for d, stages in results.items() for s, r in stages.items()]:
                print(
                    f"{size} {data} {stage}: reference / ours = {r['reference_over_ours']['flops']:.2f}x FLOPs, "
                    f"{r['reference_over_ours']['decoder_tokens']:.2f}x decoder tokens",
                    flush=True,
                )
            write_work(args, size, model, results, cpu)


def write_work(args, size: str, model: str, results: dict, cpu: dict) -> None:
    name = "Qwen2.5-VL-" + size.upper() if size != "tiny" else "the tiny test model"
    config = train_config("cl", model, "unused")
    write_report(
        args.out_dir / f"work-{size}.json",
        report(
            f"work per pool (FLOPs, rows), {name}, synthetic documents and pairs at the reference's pixel budget",
            "cpu",
            shapes={
                "size": size,
                "tokens_per_micro_batch": config.tokens_per_micro_batch,
                "micro_batch_budget": config.micro_batch_budget,
                "bucket_cost": BUCKET_COST,
                "pad_multiple": PAD_MULTIPLE,
                "pairs_per_step": config.pairs_per_rank,
                "negatives_per_query": config.negative_ratio,
                "pixels_per_image": [config.min_pixels, config.max_pixels],
                "warm": args.warm,
                "pool": args.pool,
                "pools": list(POOLS),
            },
            counted="FLOPs and rows, not times: the same on any machine; cpu_time: CPU seconds of the tiny model",
            results=results,
            cpu_time=cpu,
        ),
    )


if __name__ == "__main__":
    main()
