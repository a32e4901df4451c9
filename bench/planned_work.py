"""Our FLOPs under a memory plan (moca_fast/parallel/memory_plan.py) for a cluster of GPUs: the recompute each block
kind is planned to (none / selective / full), GradCache's extra forward where the plan needs it, against the
reference's FLOPs as bench/work.py counts them (the reference keeps full recompute, as its recipe runs).

Counted as bench/work.py counts: matmul FLOPs only, so selective recompute (which recomputes the element-wise ops and
keeps every matmul and attention output) counts zero; splitting a micro-batch is FLOP-neutral. The plan is made for
the worst case a trainer plans for (pages at the pixel cap filling the budget), not for the pool's own batches.

    plans = planned_columns(stage_pool, work)   # work: bench/work.py's stage_work result of that pool
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moca_fast.data.batch import pack_sequences
from moca_fast.model.heads import MaeHead
from moca_fast.model.moca import MocaModel
from moca_fast.parallel import memory_plan as mp
from moca_fast.trainers.metrics import decoder_layer_flops, forward_flops

CLUSTERS = {"8xH100-80GB": (80, 8), "8xH200-141GB": (141, 8)}


def kind_forward_flops(spec, batch) -> dict:
    """One forward's FLOPs of the decoder layers and of the vision blocks (what full recompute repeats)."""
    total = forward_flops(spec, batch)
    no_decoder = replace(spec, text=replace(spec.text, num_layers=0))
    no_vision = replace(spec, vision=replace(spec.vision, depth=0, fullatt_block_indexes=()))
    return {"decoder": total - forward_flops(no_decoder, batch), "vision": total - forward_flops(no_vision, batch)}


def memory_plan(p, memory_gb: float, world: int) -> mp.MemoryPlan:
    """The plan a trainer with `activation_checkpointing: auto` makes for this pool's config on the cluster."""
    config = replace(p.config, device_memory_gb=memory_gb, dtype="bfloat16")
    with torch.device("meta"):  # only the parameter counts are read
        model = MocaModel(p.spec)
        mae = MaeHead(model) if p.stage == "cpt" else None
    target = mp.Target(memory_gb * 1e9, world)
    static = mp.static_bytes(model, mae, [b for bs in mp.block_kinds(model, mae).values() for b in bs], target)
    if p.stage == "cpt":

        def batch_for_split(splits):
            return mp.planning_pack(p.processor, config.tokens_per_micro_batch // splits, masked=True)

        return mp.plan_stage1(
            p.spec, static, batch_for_split, target, max_splits=config.tokens_per_micro_batch // config.max_length
        )
    step_tokens = (2 + config.negative_ratio) * config.pairs_per_rank * config.max_length
    return mp.plan_stage2(
        p.spec,
        static,
        lambda chunk: mp.planning_pack(p.processor, chunk or step_tokens, masked=False),
        target,
        step_tokens,
    )


def recompute_flops(p, plan: mp.MemoryPlan) -> float:
    """FLOPs the plan recomputes over the pool (ours): full blocks repeat their forward; GradCache adds one forward
    of the backbone (its no-grad pass)."""
    image_id, total = p.processor.image_token_id, 0.0
    groups = (
        p.micro_batches("ours", p.pool)
        if p.stage == "cpt"
        else [[s for q in g for s in (q.query, q.positive, *q.negatives)] for g in p.pool]
    )
    for group in groups:
        packed = pack_sequences(group, image_id)
        per_kind = kind_forward_flops(p.spec, packed)
        total += sum(f for kind, f in per_kind.items() if plan.modes.get(kind) == "full")
        if p.stage == "cpt" and plan.modes.get("mae") == "full":
            chosen = packed.mae_index.numel()
            per_sequence = packed.mae_cu_seqlens.diff().double() * packed.cu_seqlens.diff().double()
            total += decoder_layer_flops(p.spec.text, chosen, packed.num_tokens, float(per_sequence.sum()))
        if plan.grad_cache_tokens:
            total += forward_flops(p.spec, packed)
    return total


def planned_columns(p, work: dict) -> dict:
    """Per cluster: the plan and our FLOPs under it, over the reference's (bench/work.py's `work` of this pool)."""
    ours, reference = work["paths"]["ours"]["flops"], work["paths"]["reference"]["flops"]["total"]
    # what work.py counts for our recompute today: every block's forward again (the MAE layer's is in mae_layer)
    counted = ours["recompute"]
    if p.stage == "cpt":
        counted += ours["mae_layer"] / 4
    columns = {}
    for name, (memory_gb, world) in CLUSTERS.items():
        plan = memory_plan(p, memory_gb, world)
        total = ours["total"] - counted + recompute_flops(p, plan)
        columns[name] = {
            "plan": plan.describe(),
            "modes": plan.modes,
            "splits": plan.splits,
            "grad_cache_tokens": plan.grad_cache_tokens,
            "peak_gib": plan.peak / 2**30,
            "fits": plan.fits,
            "ours_flops": total,
            "ours_over_reference": total / reference,
        }
    return columns
