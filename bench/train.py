"""Training steps of both stages, ours against the reference path, on the same samples: tokens/s, MFU, memory, loss.

At the real Qwen2.5-VL-3B / 7B shapes with random weights (no download) and synthetic data at the reference's
pixel budget: by default the realistic pool (moca_fast/data/realistic.py: the image sizes, text lengths and task
mixes of the reference's stage-1 sources and 30 stage-2 subsets), `--pool uniform` the synthetic world (every
image 256 tokens). Each path starts from the same weights, trains on the same pool of samples with the
same optimizer (AdamW, clipping 5.0, bf16 autocast over fp32 master weights, activation checkpointing) and
groups them its own way: ours takes the reference's stage-1 micro-batches (its cost buckets of 12,800 units,
`micro_batch_budget: reference_cost`) and packs each without padding; the reference (bench/reference_path.py)
pads each to a multiple of 32. Measured: the time to train through the pool after a warm-up pool
(CUDA-synchronised; samples are encoded and collated beforehand, for both), real (unpadded) tokens/s, MFU from
the useful FLOPs of the pool (vision tower, attention and the LM head on masked rows counted; the same work for
every path, so MFU ratios equal speed ratios), peak memory, and each path's loss on the same first batch, which
must agree. Variants of ours: without compile, with FP8, and padding instead of packing (stage 1).

GPU only: CPU timings of this code mean nothing, so without CUDA the script says so and exits; the trainers
below also run on CPU with a tiny model for bench/test_benchmarks.py.

    python -m bench.train --size 3b --out bench/results/train-3b-<device>.json
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.reference_path import BUCKET_COST, PAD_MULTIPLE, ReferencePath, cost_buckets, pad_sequences, sample_cost
from bench.report import RESULTS, device_slug, report, require_cuda, write_report
from moca_fast.config import ModelSpec, TrainConfig
from moca_fast.data.batch import pack_sequences
from moca_fast.data.contrastive import ContrastiveCollator, EncodedPair, EncodedPairs
from moca_fast.data.loader import MaskedDocuments, PackCollator
from moca_fast.data.packing import reference_cost
from moca_fast.data.pairs import PairDataset
from moca_fast.data.processor import EncodedSequence
from moca_fast.data.realistic import realistic_documents, realistic_pair_rows
from moca_fast.data.synthetic import TASKS, make_documents, make_pairs, pair_rows
from moca_fast.integrations.transformers import to_transformers
from moca_fast.model.attention import backend_for
from moca_fast.model.heads import MaeHead
from moca_fast.trainers.cpt import micro_batch_sampler, step_flops
from moca_fast.trainers.metrics import device_peak_flops, forward_flops
from moca_fast.trainers.optim import adamw
from moca_fast.trainers.setup import autocast, build_model, build_processor, build_tokenizer, generated_hf_config

POOLS = ("realistic", "uniform")  # the reference data's shapes; the synthetic world (every image 256 tokens)
OURS_VARIANTS = {  # name -> (compile, fp8, padded)
    "ours": (True, False, False),
    "ours-eager": (False, False, False),
    "ours-fp8": (True, True, False),
    "ours-padded": (True, False, True),
}


def train_config(
    stage: str, model: str, data: str, *, compile: bool = False, fp8: bool = False, reference_shapes: bool | None = None
) -> TrainConfig:
    """The reference recipe's step shape: 12,800 cost units per stage-1 micro-batch, 24 pairs x 2 negatives, its
    pixel budget and max_len; the tiny model gets a smaller one unless `reference_shapes`."""
    tiny = model == "tiny" if reference_shapes is None else not reference_shapes
    return TrainConfig(
        stage=stage,
        model=model,
        data=data,
        output_dir="unused",
        tokenizer="tiny",
        lr=1e-5,
        grad_accum=1,
        tokens_per_micro_batch=1024 if tiny else 12800,
        max_length=512 if tiny else 1280,
        min_pixels=4 * 28 * 28 if tiny else 256 * 28 * 28,
        max_pixels=64 * 28 * 28 if tiny else 1024 * 28 * 28,
        compile=compile,
        fp8=fp8,
        activation_checkpointing=True,
        num_workers=0,
        pairs_per_rank=4 if tiny else 24,
        negative_ratio=2,
        mask_duplicates=False,
    )


# ------------------------------------------------------------------------------------------------ samples


def stage1_samples(documents, processor, config: TrainConfig) -> list[EncodedSequence]:
    masked = MaskedDocuments(documents, processor, mlm_rate=config.mlm_rate, mae_rate=config.mae_rate, seed=config.seed)
    return [masked[(0, i)] for i in range(len(masked))]


def stage2_samples(pairs: PairDataset, processor) -> list[EncodedPair]:
    encoded = EncodedPairs(pairs, processor)
    return [encoded[(0, i)] for i in range(len(encoded))]


def packed_groups(
    samples: list[EncodedSequence], config: TrainConfig, image_token_id: int
) -> list[list[EncodedSequence]]:
    """Ours: the trainer's stage-1 micro-batches (config.micro_batch_budget), packed without padding."""
    costs = [
        reference_cost(len(s), int((s.input_ids == image_token_id).sum()), s.image_grid_thw.shape[0], config.max_length)
        for s in samples
    ]
    plan = micro_batch_sampler(config, [len(s) for s in samples], costs).plan(0)
    return [[samples[i] for i in group] for group in plan]


def bucketed_groups(samples: list[EncodedSequence], image_token_id: int) -> list[list[EncodedSequence]]:
    """The reference's micro-batches: cost buckets of about 12,800 units."""
    return [
        [samples[i] for i in b] for b in cost_buckets([sample_cost(s, image_token_id) for s in samples], BUCKET_COST)
    ]


def with_padding_rows(group: list[EncodedSequence], pad_id: int) -> list[EncodedSequence]:
    """Ours made to pay for padding: each row topped up to the padded length by a pad-only segment."""
    length = -(-max(len(s) for s in group) // PAD_MULTIPLE) * PAD_MULTIPLE
    out = list(group)
    for seq in group:
        n = length - len(seq)
        if n:
            empty = torch.zeros(0, dtype=torch.long)
            out.append(
                EncodedSequence(
                    "padding",
                    torch.full((n,), pad_id),
                    torch.arange(n).expand(3, n).clone(),
                    torch.zeros(0, seq.pixel_values.shape[1]),
                    torch.zeros(0, 3, dtype=torch.long),
                    mlm_positions=empty,
                    mlm_labels=empty,
                    mae_positions=empty,
                    mae_targets=torch.zeros(0, seq.pixel_values.shape[1]),
                )
            )
    return out


def stage1_micro_batches(
    path: str, samples: list[EncodedSequence], config: TrainConfig, image_token_id: int, pad_id: int
) -> list[list[EncodedSequence]]:
    """How each path groups stage-1 samples: the reference and ours-padded by cost buckets (ours-padded paying
    for the padding), ours as its trainer does (config.micro_batch_budget), packed."""
    if path == "reference":
        return bucketed_groups(samples, image_token_id)
    if OURS_VARIANTS[path][2]:
        return [with_padding_rows(g, pad_id) for g in bucketed_groups(samples, image_token_id)]
    return packed_groups(samples, config, image_token_id)


def pair_groups(pairs: list[EncodedPair], size: int) -> list[list[EncodedPair]]:
    return [pairs[i : i + size] for i in range(0, len(pairs) - size + 1, size)]


def tokens_of(group) -> int:
    if isinstance(group[0], EncodedPair):
        return sum(len(p.query) + len(p.positive) + sum(len(n) for n in p.negatives) for p in group)
    return sum(len(s) for s in group)


def useful_flops(stage: str, spec, groups, image_token_id: int) -> float:
    """The pool's FLOPs of forward + backward (same for every path: padding and recompute are not useful work)."""
    if stage == "cpt":
        return sum(step_flops(spec, pack_sequences(g, image_token_id)) for g in groups)
    sequences = [s for g in groups for p in g for s in (p.query, p.positive, *p.negatives)]
    return 3 * sum(forward_flops(spec, pack_sequences([s], image_token_id)) for s in sequences)


# ----------------------------------------------------------------------------------------------- trainers


class OursTrainer:
    """Our stage (trainers/cpt.py or cl.py: packing, fused kernels, compile/FP8 per config) + AdamW."""

    def __init__(self, config: TrainConfig, data, tokenizer, processor, device: torch.device):
        torch.manual_seed(config.seed)
        model = build_model(config, tokenizer, device)
        torch.manual_seed(config.seed + 1)  # the MAE projection's initialisation, shared with the reference
        if config.stage == "cpt":
            from moca_fast.trainers.cpt import ContinualPretraining

            self.stage = ContinualPretraining(config, model, processor, device, 0, 1, documents=data)
            self.collate = lambda group: [PackCollator(processor)(group)]
        else:
            from moca_fast.trainers.cl import ContrastiveFinetuning

            self.stage = ContrastiveFinetuning(config, model, processor, device, 0, 1, pairs=data)
            self.collate = ContrastiveCollator(processor)
        self.params = [*model.parameters(), *(self.stage.extra.parameters() if self.stage.extra is not None else ())]
        self.optimizer = adamw(self.params, config.lr, config.weight_decay, config.betas)
        self.config = config
        with autocast(config, device, 1):  # the backend our forward resolves to under the stage's autocast
            self.attention = backend_for(model.attention_backend, torch.empty(0, device=device))

    def prepare(self, group):
        return self.collate(group)

    def step(self, inputs) -> float:
        loss = self.stage.train_step(inputs)["loss"]
        torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


class ReferenceTrainer:
    """The reference path (transformers + Liger + torch, padded, three forwards) + the same AdamW."""

    def __init__(self, config: TrainConfig, tokenizer, processor, device: torch.device):
        torch.manual_seed(config.seed)
        model = build_model(config, tokenizer, device)
        torch.manual_seed(config.seed + 1)
        mae = MaeHead.from_middle_layer(model).to(device) if config.stage == "cpt" else None
        self.reference = ReferencePath(to_transformers(model).train(), activation_checkpointing=True)
        if mae is not None:
            self.reference.with_mae(mae.reference_state_dict())
        del model, mae
        self.params = [p for p in self.reference.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, config.lr, config.weight_decay, config.betas)
        self.config, self.device, self.pad_id = config, device, tokenizer.pad_token_id

    def prepare(self, group):
        if isinstance(group[0], EncodedPair):
            negatives = [n for p in group for n in p.negatives]
            return (
                pad_sequences([p.query for p in group], self.pad_id),
                pad_sequences([p.positive for p in group], self.pad_id),
                pad_sequences(negatives, self.pad_id) if negatives else None,
            )
        return pad_sequences(group, self.pad_id)

    def step(self, inputs) -> float:
        with autocast(self.config, self.device, 1):
            if isinstance(inputs, tuple):
                q, p, n = (x.to(self.device) if x is not None else None for x in inputs)
                loss = self.reference.cl_loss(q, p, n, self.config.temperature)
            else:
                loss = self.reference.cpt_loss(inputs.to(self.device), self.config.mae_weight)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer, check_group, warm_groups, groups, device: torch.device) -> dict:
    """Loss on the check batch (first step, from the initial weights), warm-up, then the timed pool."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    check_loss = trainer.step(trainer.prepare(check_group))
    for group in warm_groups:
        trainer.step(trainer.prepare(group))
    inputs = [trainer.prepare(g) for g in groups]
    synchronize(device)
    start = time.perf_counter()
    losses = [trainer.step(x) for x in inputs]
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "steps": len(inputs),
        "check_loss": check_loss,
        "last_loss": losses[-1],
        "max_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class StagePool:
    """One stage's samples, shared by every path: the check batch, the warm-up and the timed pool (stage 1:
    encoded documents; stage 2: groups of `pairs_per_rank` pairs), and the pool's real tokens and useful FLOPs."""

    stage: str
    config: TrainConfig
    tokenizer: object
    processor: object
    data: object  # what OursTrainer reads: the documents, or the PairDataset
    spec: ModelSpec
    check: list
    warm: list
    pool: list
    tokens: int
    useful_flops: float

    def micro_batches(self, path: str, samples: list) -> list[list]:
        """How `path` groups stage-1 samples (stage 2: the groups as they are)."""
        if self.stage != "cpt":
            return samples
        return stage1_micro_batches(
            path, samples, self.config, self.processor.image_token_id, self.tokenizer.pad_token_id
        )

    def with_model(self, model: str) -> StagePool:
        """The same samples at another model's shape (`random:3b` / `random:7b`: the same tokenizer and pixels)."""
        spec = ModelSpec.from_hf_config(generated_hf_config(model, self.tokenizer))
        ours = self.micro_batches("ours", self.pool)
        return replace(
            self,
            config=replace(self.config, model=model),
            spec=spec,
            useful_flops=useful_flops(self.stage, spec, ours, self.processor.image_token_id),
        )


def pool_data(stage: str, pool: str, n: int, folder: Path, config: TrainConfig):
    """`n` documents (stage 1) or a PairDataset of about `n` pairs (stage 2, images written under `folder`) of
    `pool`; realistic images are stored at the size the config's pixel budget gives."""
    pixels = (config.min_pixels, config.max_pixels)
    if stage == "cpt":
        return realistic_documents(n, seed=0, pixels=pixels) if pool == "realistic" else make_documents(n, seed=0)
    rows = (
        realistic_pair_rows(n, folder, seed=0, pixels=pixels)
        if pool == "realistic"
        else pair_rows(make_pairs(-(-n // len(TASKS)), seed=0), folder, seed=0)
    )
    return PairDataset(dict(sorted(rows.items())), image_dir=folder, negative_ratio=config.negative_ratio, seed=0)


def stage_pool(
    stage: str,
    model: str,
    n_warm: int,
    n_pool: int,
    folder: Path,
    pool: str = "realistic",
    config: TrainConfig | None = None,
) -> StagePool:
    """`n_warm` warm-up and `n_pool` timed samples (stage 1) or pairs (stage 2) of `pool` (POOLS) at the
    reference's pixel budget, held in memory (stage-2 images are written under `folder`). The realistic pool's
    pairs come in a seeded random order, its subsets mixed in every step as in the reference's training. `config`
    replaces train_config's step shape."""
    config = config or train_config(stage, model, "in memory")
    tokenizer = build_tokenizer(config)
    processor = build_processor(config, tokenizer)
    data = pool_data(stage, pool, n_warm + n_pool, folder / f"{pool}-pairs", config)
    if stage == "cpt":
        samples = stage1_samples(data, processor, config)
        warm, samples_pool = samples[:n_warm], samples[n_warm:]
        check = packed_groups(warm, config, processor.image_token_id)[0]
    else:
        samples = stage2_samples(data, processor)
        if pool == "realistic":
            samples = [samples[i] for i in torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))]
        size = config.pairs_per_rank
        warm, samples_pool = pair_groups(samples[:n_warm], size), pair_groups(samples[n_warm:], size)
        check = warm[0]
    spec = ModelSpec.from_hf_config(generated_hf_config(model, tokenizer))
    ours_pool = packed_groups(samples_pool, config, processor.image_token_id) if stage == "cpt" else samples_pool
    return StagePool(
        stage,
        config,
        tokenizer,
        processor,
        data,
        spec,
        check,
        warm,
        samples_pool,
        tokens_of([s for g in ours_pool for s in g]),
        useful_flops(stage, spec, ours_pool, processor.image_token_id),
    )


def applies(name: str, stage: str) -> bool:
    """Whether a path runs on a stage: stage 2's padding variant is the reference path itself."""
    return name == "reference" or not OURS_VARIANTS[name][2] or stage == "cpt"


def bench_path(name: str, p: StagePool, device: torch.device) -> dict:
    """One path on the pool: loss on the check batch, warm-up, timed pool; tokens/s and MFU of the pool."""
    config, trainer = p.config, None
    try:
        if name == "reference":
            trainer = ReferenceTrainer(config, p.tokenizer, p.processor, device)
        else:
            compile, fp8, _ = OURS_VARIANTS[name]
            trainer = OursTrainer(replace(config, compile=compile, fp8=fp8), p.data, p.tokenizer, p.processor, device)
        if p.stage == "cpt":
            padded = name != "reference" and OURS_VARIANTS[name][2]
            check = with_padding_rows(p.check, p.tokenizer.pad_token_id) if padded else p.check
            run = measure(trainer, check, p.micro_batches(name, p.warm), p.micro_batches(name, p.pool), device)
        else:
            run = measure(trainer, p.check, p.warm[1:], p.pool, device)
        run["tokens_per_s"] = p.tokens / run["seconds"]
        peak = device_peak_flops(device)
        run["mfu"] = p.useful_flops / run["seconds"] / peak if peak else None
        if name == "reference":  # which attention each path ran
            run["attention"] = trainer.reference.attention
        else:  # and what was really on (FP8 turns itself off where torchao or the GPU cannot run it)
            run["attention"] = trainer.attention
            run["transforms"] = dict(trainer.stage.state)
        return run
    finally:  # also when stopped part-way (bench/gpu_quick.py's time box): the model leaves the device
        trainer = None
        free(device)


def summarize(p: StagePool, results: dict) -> dict:
    """The paths' runs with each one's speed-up and check-loss difference against the reference path."""
    summary = {"tokens": p.tokens, "useful_flops": p.useful_flops, "paths": results}
    reference = results.get("reference")
    timed = {k: v for k, v in results.items() if k != "reference" and "seconds" in v}
    if reference is not None and "seconds" in reference:
        summary["speedup_vs_reference"] = {k: reference["seconds"] / v["seconds"] for k, v in timed.items()}
        summary["check_loss_rel_diff"] = {
            k: abs(v["check_loss"] / reference["check_loss"] - 1) for k, v in timed.items()
        }
    return summary


def bench_stage(
    stage: str,
    model: str,
    variants: list[str],
    n_warm: int,
    n_pool: int,
    folder: Path,
    device: torch.device,
    data: str = "realistic",
) -> dict:
    """Every path of `variants` on one stage: the check batch, `n_warm` warm-up and `n_pool` timed samples (stage
    1) or pairs (stage 2) of `data` (POOLS)."""
    p = stage_pool(stage, model, n_warm, n_pool, folder, data)
    return summarize(p, {name: bench_path(name, p, device) for name in variants if applies(name, stage)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["3b", "7b"], default="3b")
    parser.add_argument("--stages", nargs="+", choices=["cpt", "cl"], default=["cpt", "cl"])
    parser.add_argument(
        "--variants", nargs="+", choices=[*OURS_VARIANTS, "reference"], default=[*OURS_VARIANTS, "reference"]
    )
    parser.add_argument("--warm", type=int, default=48, help="samples (stage 1) or pairs (stage 2) to warm up on")
    parser.add_argument("--pool", type=int, default=240, help="samples (stage 1) or pairs (stage 2) timed")
    parser.add_argument(
        "--data",
        choices=POOLS,
        default="realistic",
        help="realistic: the reference data's shapes; uniform: the synthetic world (every image 256 tokens)",
    )
    parser.add_argument("--out", help="JSON path (default bench/results/train-<size>-<device>.json)")
    args = parser.parse_args()
    device = require_cuda("training throughput")
    stages = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            stages[stage] = bench_stage(
                stage, f"random:{args.size}", args.variants, args.warm, args.pool, Path(tmp), device, args.data
            )
            print(stage, {k: round(v["tokens_per_s"]) for k, v in stages[stage]["paths"].items()}, flush=True)
    out = args.out or RESULTS / f"train-{args.size}-{device_slug(torch.cuda.get_device_name())}.json"
    write_report(
        out,
        report(
            f"training steps, random-weight Qwen2.5-VL-{args.size.upper()}, synthetic data ({args.data} pool)",
            device,
            shapes={
                "size": args.size,
                "tokens_per_micro_batch": 12800,
                "pairs_per_step": 24,
                "negatives_per_query": 2,
                "pixels": "256..1024 tokens per image",
                "data": args.data,
                "warm": args.warm,
                "pool": args.pool,
            },
            results=stages,
        ),
    )


if __name__ == "__main__":
    main()
