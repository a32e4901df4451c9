"""Stage 2, heterogeneous contrastive fine-tuning: InfoNCE over queries, gathered positives, hard negatives.

Queries, positives and negatives go through one packed forward (the reference runs three padded ones).
Positives are gathered from every rank with an exact gradient (moca_fast/parallel/distributed.py); each query is scored
against all gathered positives plus its own hard negatives by the fused InfoNCE kernel, duplicates of its
target masked. With `grad_cache_tokens`, GradCache makes the batch size independent of memory: a no-grad
forward of every chunk, the loss and its gradient w.r.t. the embeddings, then a re-forward of each chunk that
backpropagates the cached gradient — the same gradient as the direct computation.

With `matryoshka_dims` the pooled InfoNCE is taken at each of those leading dimensions (each prefix normalised
again) and summed with `matryoshka_weights`; with `multi_vector_dim` a late-interaction InfoNCE (MaxSim scores of
the multi-vector head's token vectors) over the same queries, gathered positives and hard negatives, with the same
duplicate masking, is added with weight `multi_vector_weight`. Token vectors are gathered across ranks with an exact
gradient as the pooled positives are (ranks hold different token counts).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.contrastive import ContrastiveBatch, ContrastiveCollator, EncodedPairs, PairBatchSampler
from ..data.loader import one_line_errors, stop_owned_by_main
from ..data.pairs import PairDataset
from ..kernels import info_nce_loss, maxsim_info_nce
from ..model.pooling import embed_pool, matryoshka_prefix
from ..parallel.distributed import all_reduce_sum, gather, gather_varlen_with_grad, gather_with_grad, rank, world_size
from ..parallel.memory_plan import block_modes, plan_run
from ..parallel.parallelize import parallelize
from .metrics import forward_flops
from .setup import autocast


def pair_subsets(folder: str, tasks: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Every `<task>.jsonl` (or .parquet) in `folder` keyed by task name, or only those of `tasks`."""
    files = {p.stem: p for p in sorted(Path(folder).iterdir()) if p.suffix in (".jsonl", ".parquet")}
    if not files:
        raise ValueError(f"{folder}: no <task>.jsonl or <task>.parquet files of contrastive pairs")
    if tasks is None:
        return files
    missing = sorted(set(tasks) - set(files))
    if missing:
        raise ValueError(f"{folder}: no pair files for the tasks {missing} (found {sorted(files)})")
    return {task: files[task] for task in tasks}


def contrastive_loss(
    embeddings: torch.Tensor, batch: ContrastiveBatch, temperature: float, mask_duplicates: bool
) -> torch.Tensor:
    """InfoNCE of one rank's [queries; positives; negatives] embeddings, positives gathered over ranks."""
    b, r = batch.num_pairs, batch.num_negatives
    queries, positives, negatives = embeddings[:b], embeddings[b : 2 * b], embeddings[2 * b :]
    all_positives = gather_with_grad(positives)
    targets = rank() * b + torch.arange(b, device=embeddings.device)
    duplicates = gather(batch.duplicate_ids) if mask_duplicates else None
    return info_nce_loss(
        queries,
        all_positives,
        negatives.reshape(b, r, -1) if r else None,
        targets,
        temperature=temperature,
        normalize=False,
        duplicate_ids=duplicates,
    )


def pooled_loss(embeddings: torch.Tensor, batch: ContrastiveBatch, config: TrainConfig) -> torch.Tensor:
    """The pooled vector's InfoNCE: at full size, or summed over the Matryoshka prefixes with their weights."""
    if config.matryoshka_dims is None:
        return contrastive_loss(embeddings, batch, config.temperature, config.mask_duplicates)
    weights = config.matryoshka_weights or (1.0,) * len(config.matryoshka_dims)
    return sum(
        weight * contrastive_loss(matryoshka_prefix(embeddings, dim), batch, config.temperature, config.mask_duplicates)
        for dim, weight in zip(config.matryoshka_dims, weights)
    )


def cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """Sequence lengths [S] -> int32 bounds [S+1]."""
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()


def late_interaction_loss(
    tokens: torch.Tensor, lengths: torch.Tensor, batch: ContrastiveBatch, temperature: float, mask_duplicates: bool
) -> torch.Tensor:
    """Late-interaction InfoNCE of one rank's token vectors [T, D] of its [queries; positives; negatives]
    sequences (lengths [S] on the host): each query's MaxSim against every rank's positives and its own hard
    negatives, the positives' duplicates of its target masked as in `contrastive_loss`."""
    b, r = batch.num_pairs, batch.num_negatives
    q_end, p_end = int(lengths[:b].sum()), int(lengths[: 2 * b].sum())
    device = tokens.device
    lengths = lengths.to(device)
    all_positives, _ = gather_varlen_with_grad(tokens[q_end:p_end])
    targets = rank() * b + torch.arange(b, device=device)
    # The documents: every rank's positives, then this rank's hard negatives (r per query, in query order).
    documents = torch.cat([all_positives, tokens[p_end:]])
    document_lengths = torch.cat([gather(lengths[b : 2 * b]), lengths[2 * b :]])
    duplicate_mask = None
    if mask_duplicates:
        ids = gather(batch.duplicate_ids)
        duplicate_mask = torch.zeros((b, document_lengths.numel()), dtype=torch.bool, device=device)
        duplicate_mask[:, : ids.numel()] = ids[None, :] == ids[targets][:, None]
    return maxsim_info_nce(
        tokens[:q_end],
        cu_seqlens(lengths[:b]),
        documents,
        cu_seqlens(document_lengths),
        targets,
        temperature=temperature,
        negatives=r or None,
        duplicate_mask=duplicate_mask,
    )


class ContrastiveFinetuning:
    """The Stage of trainers/loop.py for stage 2."""

    def __init__(self, config: TrainConfig, model, processor, device: torch.device, rank_: int, world: int, pairs=None):
        model.set_heads(config.multi_vector_dim, config.matryoshka_dims or ())
        self.config, self.device, self.spec = config, device, model.spec
        blocks = [*model.language_model.layers, *model.visual.blocks]
        recompute, self.grad_cache_tokens = config.activation_checkpointing, config.grad_cache_tokens
        if recompute == "auto":  # GradCache only where even full recompute does not fit
            plan = plan_run(config, model, None, processor, device, world)
            recompute, self.grad_cache_tokens = block_modes(plan, model, None), plan.grad_cache_tokens
        self.state = parallelize(
            model,
            blocks,
            device=device,
            fp8_layers=model.language_model.layers if config.fp8 else None,
            activation_checkpointing=recompute,
            compile=config.compile,
            world_size=world,
        )
        self.model, self.extra = model, None
        pairs = (
            pairs
            if pairs is not None
            else PairDataset(
                pair_subsets(config.data, config.tasks),
                negative_ratio=config.negative_ratio,
                seed=config.seed,
                skip_invalid=config.skip_invalid,
                allow_image_paths_outside=config.allow_image_paths_outside,
            )
        )
        if not config.task_homogeneous and len(set(pairs.negatives_per_task.values())) > 1:
            raise ValueError(
                f"the tasks carry different numbers of hard negatives {pairs.negatives_per_task}, but "
                "batches mix tasks: set task_homogeneous: true, or give every task the same number"
            )
        self.pairs = pairs
        self.sampler = PairBatchSampler(
            pairs.tasks,
            config.pairs_per_rank,
            seed=config.seed,
            rank=rank_,
            world_size=world,
            task_homogeneous=config.task_homogeneous,
        )
        collator = ContrastiveCollator(processor, chunk_tokens=self.grad_cache_tokens)
        self.loader = torch.utils.data.DataLoader(
            EncodedPairs(pairs, processor, skip_invalid=config.skip_invalid),
            batch_sampler=self.sampler,
            collate_fn=collator,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=config.num_workers > 0,
            worker_init_fn=stop_owned_by_main(),
        )

    def steps_per_epoch(self) -> int:
        return len(self.sampler.plan(0))

    def step_inputs(self, epoch: int, start: int) -> Iterator[ContrastiveBatch]:
        self.sampler.set_epoch(epoch, start)
        yield from one_line_errors(self.loader)

    def sample_ids(self, batch: ContrastiveBatch) -> list[str]:
        return [i for chunk in batch.chunks for i in chunk.sample_ids]

    def data_fingerprint(self) -> str:
        return self.pairs.fingerprint

    def _embed(self, chunk) -> list[torch.Tensor]:
        """[pooled embeddings [S, H]] of a chunk, and its token vectors [T, D] when the multi-vector head trains."""
        with autocast(self.config, self.device, world_size()):
            hidden = self.model(chunk)
            pooled = embed_pool(hidden, chunk.cu_seqlens)
            return [pooled, self.model.multi_vectors(hidden)] if self.config.multi_vector_dim else [pooled]

    def _embed_all(self, chunks) -> list[torch.Tensor]:
        return [torch.cat(parts) for parts in zip(*(self._embed(c) for c in chunks))]

    def losses(self, outputs: list[torch.Tensor], batch: ContrastiveBatch, lengths: torch.Tensor):
        """(total loss, its parts) of one rank's [pooled] or [pooled, token vectors]."""
        pooled = pooled_loss(outputs[0], batch, self.config)
        if len(outputs) == 1:
            return pooled, {}
        late = late_interaction_loss(
            outputs[1], lengths, batch, self.config.multi_vector_temperature, self.config.mask_duplicates
        )
        return pooled + self.config.multi_vector_weight * late, {"loss_pooled": pooled, "loss_multi_vector": late}

    def train_step(self, batch: ContrastiveBatch) -> dict[str, float]:
        lengths = torch.cat([c.cu_seqlens.diff() for c in batch.chunks])  # on the host, before the copy
        batch = batch.to(self.device, non_blocking=True)
        if self.grad_cache_tokens is None:
            loss, parts = self.losses(self._embed_all(batch.chunks), batch, lengths)
            loss.backward()
        else:
            with torch.no_grad():
                cached = self._embed_all(batch.chunks)
            for output in cached:
                output.requires_grad_(True)
            loss, parts = self.losses(cached, batch, lengths)
            loss.backward()
            grads = [cached[0].grad.split([c.num_sequences for c in batch.chunks])]
            if len(cached) > 1:
                grads.append(cached[1].grad.split([c.num_tokens for c in batch.chunks]))
            for i, chunk in enumerate(batch.chunks):
                if world_size() > 1:
                    self.model.set_requires_gradient_sync(i == len(batch.chunks) - 1)
                sum((output * grad[i]).sum() for output, grad in zip(self._embed(chunk), grads)).backward()
        passes = 3 if self.grad_cache_tokens is None else 4  # GradCache adds a no-grad forward
        flops = sum(passes * forward_flops(self.spec, c) for c in batch.chunks)
        losses = torch.stack([loss.detach(), *(part.detach() for part in parts.values())]).float()
        mean_losses = gather(losses[None]).mean(0).tolist()
        # Tokens and FLOPs of the whole step, every rank's (tokens/s and MFU are the job's, not rank 0's).
        tokens, flops = all_reduce_sum(
            torch.tensor([batch.num_tokens, flops], dtype=torch.float64, device=self.device)
        ).tolist()
        return {"loss": mean_losses[0], **dict(zip(parts, mean_losses[1:])), "tokens": tokens, "flops": flops}
