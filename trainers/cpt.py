"""Stage 1, continual pre-training: masked-LM on text + masked-patch reconstruction on images, packed.

Loss = MLM + mae_weight * MAE, each normalised by its global count of masked rows over the whole optimizer
step (all micro-batches, all ranks), so accumulation and data parallelism change nothing but speed: the
gradient equals the single-process one on the same global batch. W ranks with `grad_accum` A see exactly the
batches of one process with A * W (padding micro-batches, weighted zero, complete an epoch's last round).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.documents import DocumentDataset
from ..data.loader import MaskedDocuments, PackCollator, one_line_errors, packed_loader
from ..data.packing import TokenBudgetSampler
from ..model.heads import MaeHead, mlm_loss
from ..model.loading import read_mae_head
from ..parallel.distributed import all_reduce_sum, world_size
from ..parallel.memory_plan import block_modes, plan_run
from ..parallel.parallelize import parallelize
from .metrics import forward_flops
from .setup import autocast

log = logging.getLogger(__name__)


def step_flops(spec, batch) -> float:
    """Useful FLOPs of one stage-1 micro-batch, forward + backward: the model, and the LM head on masked rows."""
    return 3 * forward_flops(spec, batch) + 6 * batch.mlm_index.numel() * spec.text.hidden_size * spec.text.vocab_size


def micro_batch_sampler(
    config: TrainConfig,
    lengths: list[int],
    costs: list[int],
    *,
    rank: int = 0,
    world_size: int = 1,
    sample_ids: list[str] | None = None,
    budget: int | None = None,
) -> TokenBudgetSampler:
    """Stage-1 micro-batches of `budget` (default `tokens_per_micro_batch`; a memory plan's split divides it) in
    the units `micro_batch_budget` names: the samples' reference costs cut into the reference's buckets (a step
    holds its samples), or their lengths in tokens packed first-fit."""
    by_cost = config.micro_batch_budget == "reference_cost"
    budget = config.tokens_per_micro_batch if budget is None else budget
    return TokenBudgetSampler(
        costs if by_cost else lengths,
        budget,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        sample_ids=sample_ids,
        cut="sorted" if by_cost else "first_fit",
    )


def initial_mae_head(model, checkpoint: str) -> MaeHead:
    """The MAE head a stage-1 checkpoint (the reference's, with `mae_decoder.*` / `mae_proj.*`) holds, to continue
    it; else the reference's initialisation from the middle decoder layer."""
    tensors = read_mae_head(checkpoint) if (Path(checkpoint) / "config.json").is_file() else None
    if tensors is None:
        return MaeHead.from_middle_layer(model)
    log.info("MAE head: continued from %s (%d tensors)", checkpoint, len(tensors))
    return MaeHead.from_reference(model, tensors)


class ContinualPretraining:
    """The Stage of trainers/loop.py for stage 1."""

    def __init__(
        self, config: TrainConfig, model, processor, device: torch.device, rank: int, world: int, documents=None
    ):
        self.config, self.device, self.spec = config, device, model.spec
        self.mae = initial_mae_head(model, config.model).to(device)
        blocks = [*model.language_model.layers, *model.visual.blocks, self.mae.layer]
        recompute, self.splits = config.activation_checkpointing, 1
        if recompute == "auto":  # splitting a micro-batch in s and accumulating s times as many is FLOP-neutral
            plan = plan_run(config, model, self.mae, processor, device, world)
            recompute, self.splits = block_modes(plan, model, self.mae), plan.splits
        self.grad_accum, budget = config.grad_accum * self.splits, config.tokens_per_micro_batch // self.splits
        self.state = parallelize(
            model,
            blocks,
            extra=self.mae,
            device=device,
            fp8_layers=model.language_model.layers if config.fp8 else None,
            activation_checkpointing=recompute,
            compile=config.compile,
            world_size=world,
        )
        self.model, self.extra = model, self.mae
        documents = (
            documents
            if documents is not None
            else DocumentDataset(
                config.data,
                skip_invalid=config.skip_invalid,
                allow_image_paths_outside=config.allow_image_paths_outside,
            )
        )
        self.samples = MaskedDocuments(
            documents,
            processor,
            mlm_rate=config.mlm_rate,
            mae_rate=config.mae_rate,
            seed=config.seed,
            skip_invalid=config.skip_invalid,
        )
        self.sampler = micro_batch_sampler(
            config,
            self.samples.lengths(),
            self.samples.reference_costs(),
            rank=rank,
            world_size=world,
            sample_ids=self.samples.sample_ids(),
            budget=budget,
        )
        self.loader = packed_loader(self.samples, self.sampler, PackCollator(processor), num_workers=config.num_workers)
        self.world = world

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.sampler.plan(0)) / self.world / self.grad_accum)

    def step_inputs(self, epoch: int, start: int) -> Iterator[list]:
        """Groups of `grad_accum` micro-batches (times the memory plan's splits) (the last group of an epoch may be
        shorter); the sampler's padding
        micro-batches (see data/packing.py) come marked, so they add nothing to the loss."""
        first = start * self.grad_accum
        self.sampler.set_epoch(epoch, first)
        real = self.sampler.rank_batches(epoch)[1]
        group = []
        for k, batch in enumerate(one_line_errors(self.loader), start=first):
            group.append(batch if k < real else dataclasses.replace(batch, padding=True))
            if len(group) == self.grad_accum:
                yield group
                group = []
        if group:
            yield group

    def sample_ids(self, micro_batches: list) -> list[str]:
        return [i for batch in micro_batches for i in batch.sample_ids]

    def data_fingerprint(self) -> str:
        """A digest of the samples' ids and lengths, in order."""
        data = json.dumps([self.samples.sample_ids(), self.samples.lengths()]).encode()
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    def train_step(self, micro_batches: list) -> dict[str, float]:
        counts = torch.tensor(
            [[0, 0] if b.padding else [b.mlm_index.numel(), b.mae_index.numel()] for b in micro_batches],
            dtype=torch.float64,
        )
        totals = all_reduce_sum(counts.sum(0).to(self.device)).clamp(min=1)
        world = world_size()
        parts = torch.zeros(2, dtype=torch.float64, device=self.device)
        tokens = flops = 0.0
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device, non_blocking=True)
            if world > 1:  # one gradient reduction per optimizer step
                for module in (self.model, self.mae):
                    module.set_requires_gradient_sync(i == len(micro_batches) - 1)
            with autocast(self.config, self.device, world):
                hidden = self.model(batch)
                mlm = mlm_loss(self.model, hidden, batch) * (counts[i, 0].item() / totals[0])
                mae = self.mae(hidden, batch, self.config.attention_backend) * (counts[i, 1].item() / totals[1])
            # Each rank holds its share of the global loss; FSDP averages gradients over ranks, hence * world.
            ((mlm + self.config.mae_weight * mae) * world).backward()
            parts += torch.stack([mlm.detach(), mae.detach()]).double()
            tokens += batch.num_tokens
            flops += step_flops(self.spec, batch)
        # Losses, tokens and FLOPs of the whole step, every rank's (tokens/s and MFU are the job's, not rank 0's).
        work = torch.tensor([tokens, flops], dtype=torch.float64, device=self.device)
        mlm_value, mae_value, tokens, flops = all_reduce_sum(torch.cat([parts, work])).tolist()
        return {
            "loss": mlm_value + self.config.mae_weight * mae_value,
            "mlm": mlm_value,
            "mae": mae_value,
            "tokens": tokens,
            "flops": flops,
        }
