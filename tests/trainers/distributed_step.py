"""One optimizer step's loss and gradients, single-process or as one rank under torchrun (used by
test_distributed.py): the same global batch either way, so the two must agree. `reference`: the stage-2 loss of
bench/reference_path.py, whose per-rank gradients (through the local slice only) must sum to the single-process
ones. `cl_heads`: stage 2 with the multi-vector head and Matryoshka dimensions (token vectors gathered across ranks)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moca_fast.config import TrainConfig
from moca_fast.data.contrastive import ContrastiveCollator, EncodedPairs
from moca_fast.data.loader import PackCollator
from moca_fast.data.packing import TokenBudgetSampler
from moca_fast.data.synthetic import make_documents, make_pairs, write_pairs
from moca_fast.parallel.distributed import finish_distributed
from moca_fast.trainers.setup import build_model, build_processor, build_tokenizer, start


def full_gradients(modules) -> dict[str, torch.Tensor]:
    grads = {}
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            grad = param.grad
            if grad is not None and hasattr(grad, "full_tensor"):
                grad = grad.full_tensor()
            grads[f"{prefix}.{name}"] = (
                torch.zeros_like(param.data if not hasattr(param, "full_tensor") else param.full_tensor())
                if grad is None
                else grad.clone()
            )
    return grads


def main(stage_name: str, out: str, workdir: str) -> None:
    stage_of_config = "cpt" if stage_name == "cpt" else "cl"
    heads = dict(multi_vector_dim=16, matryoshka_dims=(64, 16)) if stage_name == "cl_heads" else {}
    config = TrainConfig(
        stage=stage_of_config,
        model="tiny",
        data=workdir,
        output_dir=workdir,
        grad_accum=2,
        tokens_per_micro_batch=512,
        max_length=256,
        min_pixels=3136,
        max_pixels=3136,
        dtype="float32",
        activation_checkpointing=False,
        num_workers=0,
        pairs_per_rank=4,
        grad_cache_tokens=None,
        **heads,
    )
    device, rank, world = start(config)
    tokenizer = build_tokenizer(config)
    processor = build_processor(config, tokenizer)
    model = build_model(config, tokenizer, device)
    if stage_name == "cpt":
        from moca_fast.trainers.cpt import ContinualPretraining

        stage = ContinualPretraining(config, model, processor, device, rank, world, documents=make_documents(24, 1))
        # The first two micro-batches of the world-1 plan: one rank holds both, or each rank one.
        plan = TokenBudgetSampler(stage.samples.lengths(), 512, seed=0).plan(0)[:2]
        collate = PackCollator(processor)
        batches = [collate([stage.samples[(0, i)] for i in b]) for b in plan]
        step_input = batches if world == 1 else [batches[rank]]
        modules = {"model": stage.model, "mae": stage.mae}
    elif stage_name == "reference":
        sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: bench/ is a package there
        from bench.reference_path import ReferencePath, pad_sequences
        from moca_fast.data.pairs import PairDataset
        from moca_fast.integrations.transformers import to_transformers
        from moca_fast.trainers.cl import pair_subsets

        encoded = EncodedPairs(PairDataset(pair_subsets(workdir), negative_ratio=2), processor)
        picked = [encoded[(0, i)] for i in range(8)]
        picked = picked if world == 1 else picked[4 * rank : 4 * rank + 4]
        reference = ReferencePath(to_transformers(model).train())
        pad = tokenizer.pad_token_id
        loss = reference.cl_loss(
            pad_sequences([p.query for p in picked], pad),
            pad_sequences([p.positive for p in picked], pad),
            pad_sequences([n for p in picked for n in p.negatives], pad),
            config.temperature,
        )
        loss.backward()
        grads = full_gradients({"model": reference.hf})
        for grad in grads.values():
            if world > 1:
                dist.all_reduce(grad)  # the sum over ranks of what each rank's backward produced
        if rank == 0:
            torch.save({"loss": loss.item(), "grads": grads}, out)
        finish_distributed()
        return
    else:
        from moca_fast.data.pairs import PairDataset
        from moca_fast.trainers.cl import ContrastiveFinetuning, pair_subsets

        pairs = PairDataset(pair_subsets(workdir), negative_ratio=2)
        stage = ContrastiveFinetuning(config, model, processor, device, rank, world, pairs=pairs)
        encoded = EncodedPairs(pairs, processor)
        picked = [encoded[(0, i)] for i in range(8)]  # 8 pairs: one rank of 8, or two of 4
        picked = picked if world == 1 else picked[4 * rank : 4 * rank + 4]
        step_input = ContrastiveCollator(processor)(picked)
        modules = {"model": stage.model}
    values = stage.train_step(step_input)
    grads = full_gradients(modules)
    if rank == 0:
        torch.save({"loss": values["loss"], "tokens": values["tokens"], "flops": values["flops"], "grads": grads}, out)
    finish_distributed()


def loop_config(output_dir, grad_accum: int) -> TrainConfig:
    """Stage 1 over 32 documents: 3 micro-batches an epoch, which do not divide over 2 ranks."""
    return TrainConfig(
        stage="cpt",
        model="tiny",
        tokenizer="tiny",
        data="unused",
        output_dir=str(output_dir),
        lr=2e-3,
        grad_accum=grad_accum,
        tokens_per_micro_batch=512,
        max_length=256,
        min_pixels=3136,
        max_pixels=3136,
        dtype="float32",
        activation_checkpointing=False,
        num_workers=0,
        max_steps=5,
        checkpoint_every=2,
    )


def loop(out: str, output_dir: str, mode: str) -> None:
    """The whole training loop on this process group (grad_accum 1 per rank): stopped after step 3, or resumed."""
    from moca_fast.trainers.run import run

    records = run(
        loop_config(output_dir, 1),
        documents=make_documents(32, seed=0),
        resume=mode == "resume",
        stop_after=3 if mode == "cut" else None,
    )
    if int(__import__("os").environ.get("RANK", 0)) == 0:
        torch.save([(r["step"], r["loss"]) for r in records], out)


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        write_pairs(make_pairs(4, seed=2), sys.argv[2], seed=2)
    elif sys.argv[1] == "loop":
        loop(*sys.argv[2:5])
    else:
        main(*sys.argv[1:4])
