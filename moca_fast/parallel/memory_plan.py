"""Memory-planned recompute: per block kind (decoder layer, vision block, MAE layer) none / selective / full
activation checkpointing, and stage-1 micro-batch splits, chosen so that a training step fits a device's memory.

The peak is estimated on the CPU without allocating it. The training step (model forward, losses, backward) runs
on fake tensors (torch's FakeTensorMode) while a dispatch mode sums the bytes of every live storage; the blocks are
identical, so the step runs on thin copies of the model (one or two blocks of a kind) and the peak is extrapolated
linearly in depth. Parameters, gradients and AdamW's two moments are counted from the parameter count, divided by
the world size under FSDP2, plus the blocks FSDP holds gathered.

Selective recompute is torchtitan's op-level policy: a checkpointed block saves the outputs of its matmuls and of
attention and recomputes everything else (norms, rotary, SwiGLU's product) in the backward.
"""

from __future__ import annotations

import functools
import itertools
import logging
import weakref
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)

MODES = ("none", "selective", "full")  # ascending recompute, descending memory
KINDS = ("decoder", "vision", "mae")
HEADROOM = 0.10  # of the device memory, left to the allocator's fragmentation, NCCL buffers and the CUDA context
SPLITS = (1, 2, 4, 8)
# Ops whose outputs selective recompute keeps: the GEMMs and attention (forward ops of every backend).
SAVED_OPS = frozenset(
    {
        "aten.mm",
        "aten.addmm",
        "aten.bmm",
        "aten._scaled_mm",
        "aten.linear",
        "aten._scaled_dot_product_flash_attention",
        "aten._scaled_dot_product_efficient_attention",
        "aten._scaled_dot_product_cudnn_attention",
        "aten._scaled_dot_product_flash_attention_for_cpu",
        "aten._flash_attention_forward",
        "aten._efficient_attention_forward",
        "aten._cudnn_attention_forward",
        "torch_attn._varlen_attn",
        "flash_attn._flash_attn_varlen_forward",
    }
)


def selective_policy(ctx, func, *args, **kwargs):
    """Save matmul and attention outputs; recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    saved = str(getattr(func, "overloadpacket", func)) in SAVED_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(block: nn.Module, mode: str) -> None:
    """Composable activation checkpointing of `block` in `mode` (state-dict keys unchanged)."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}; choose one of {MODES} or 'auto'")
    if mode == "none":
        return
    from torch.distributed._composable import checkpoint

    if mode == "full":
        checkpoint(block)
    else:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        checkpoint(block, context_fn=functools.partial(create_selective_checkpoint_contexts, selective_policy))


class LiveBytes(TorchDispatchMode):
    """The bytes of every storage an op creates while it is alive, and their peak (fake tensors included)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = weakref.WeakSet()

    def exclude(self, tensors) -> None:
        """Storages that exist before the step (parameters, the batch): views of them are not new bytes."""
        for t in tensors:
            self._seen.add(t.untyped_storage())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        if storage in self._seen:
            return
        self._seen.add(storage)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size


@dataclass(frozen=True)
class MemoryPlan:
    """What a step runs with: a recompute mode per block kind, micro-batch splits (stage 1), the GradCache chunk
    budget (stage 2, None: off), the estimated peak and the budget, in bytes."""

    modes: dict
    splits: int
    grad_cache_tokens: int | None
    peak: float
    budget: float

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def describe(self) -> str:
        modes = ", ".join(f"{kind} {mode}" for kind, mode in self.modes.items())
        split = f"; micro-batches split in {self.splits}" if self.splits > 1 else ""
        cache = f"; GradCache on ({self.grad_cache_tokens} tokens per chunk)" if self.grad_cache_tokens else ""
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (
            f"memory plan: {modes}{split}{cache}; estimated peak {self.peak / 2**30:.1f} GiB of a "
            f"{self.budget / 2**30:.1f} GiB budget ({verdict})"
        )


@dataclass(frozen=True)
class Target:
    """The device a plan is for: its memory in bytes, the world size (FSDP2 shards), the compute dtype and the
    attention backend its forward runs (its saved tensors differ: 'sdpa' on CPU, 'varlen' stands for flash-attn's
    memory on CUDA)."""

    memory: float
    world_size: int = 1
    dtype: torch.dtype = torch.bfloat16
    backend: str = "varlen"
    device_type: str = "cuda"

    @property
    def budget(self) -> float:
        return self.memory * (1 - HEADROOM)


def device_target(device: torch.device, world_size: int, dtype: str, memory_gb: float | None) -> Target:
    """The target of a run: `memory_gb` when given, else the CUDA device's total memory."""
    if memory_gb is None:
        if device.type != "cuda":
            raise ValueError("activation_checkpointing: auto needs device_memory_gb on a device other than CUDA")
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = memory_gb * 1e9
    on_cuda = device.type == "cuda"
    return Target(
        memory,
        world_size,
        getattr(torch, dtype) if on_cuda else torch.float32,
        "varlen" if on_cuda else "sdpa",
        device.type,
    )


def static_bytes(model: nn.Module, extra: nn.Module | None, blocks: list[nn.Module], target: Target) -> float:
    """Parameters, gradients and AdamW's moments (fp32, sharded over the world under FSDP2), plus what is held
    unsharded: under FSDP2 the root's parameters and two blocks (the one running and the one prefetched) in the
    compute dtype, with their gradients; on one CUDA device autocast's cached low-precision weight copies."""
    params = {id(p): p for m in (model, extra) if m is not None for p in m.parameters()}.values()
    count = sum(p.numel() for p in params)
    # fp32 master weights and AdamW's two moments; the gradients too under FSDP2 (on one device the fake step
    # holds them as they accumulate, so the estimate sees how many exist at the peak)
    states = 3 + (target.world_size > 1)
    total = states * 4 * count / target.world_size
    low = torch.finfo(target.dtype).bits // 8
    if target.world_size > 1:
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        root = sum(p.numel() for p in params if id(p) not in in_blocks)
        largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        total += low * root + 2 * 2 * low * largest
    elif target.device_type == "cuda" and low < 4:
        total += low * count
    return total


def fake_step_peak(step, batch, spec, depth: dict, modes: dict, target: Target) -> float:
    """Peak live bytes of `step` on `batch` on fake tensors, for a model of `spec` thinned to `depth` blocks per
    kind ({'decoder': L, 'vision': V}), parameters and the batch excluded (static_bytes counts the parameters);
    under FSDP2 gradients are released as they accumulate, as its reduce-scatter does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..data.batch import map_tensors
    from ..model.heads import MaeHead
    from ..model.moca import MocaModel

    vision = replace(spec.vision, depth=depth["vision"], fullatt_block_indexes=(0,))
    thin = replace(spec, text=replace(spec.text, num_layers=depth["decoder"]), vision=vision)
    default_dtype = torch.get_default_dtype()
    with FakeTensorMode() as fake:
        torch.set_default_dtype(target.dtype)  # built in the compute dtype (FSDP2 or autocast run it in that)
        try:
            model = MocaModel(thin, target.backend)
            mae = MaeHead(model)
        finally:
            torch.set_default_dtype(default_dtype)
        inputs = []
        batch = map_tensors(batch, lambda t: inputs.append(fake.from_tensor(t)) or inputs[-1])
        if target.world_size > 1:  # FSDP2 reduce-scatters each gradient away; static_bytes counts the shards
            for param in itertools.chain(model.parameters(), mae.parameters()):
                param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        for kind, blocks in block_kinds(model, mae).items():
            for block in blocks:
                apply_recompute(block, modes[kind])
        with LiveBytes() as tracker:
            tracker.exclude([*model.parameters(), *mae.parameters(), *model.buffers(), *inputs])
            step(model, mae, batch, target.backend)
    return tracker.peak


def block_kinds(model: nn.Module, mae: nn.Module | None) -> dict[str, list[nn.Module]]:
    kinds = {"decoder": list(model.language_model.layers), "vision": list(model.visual.blocks)}
    if mae is not None:
        kinds["mae"] = [mae.layer]
    return kinds


def activation_peak(step, batch, spec, modes: dict, target: Target) -> float:
    """The step's peak activation bytes at full depth, extrapolated from thin fake runs: one block of each kind,
    and one more decoder layer / vision block to measure what each adds."""

    def peak(layers: int, blocks: int) -> float:
        return fake_step_peak(step, batch, spec, {"decoder": layers, "vision": blocks}, modes, target)

    base = peak(1, 1)
    per_layer, per_block = peak(2, 1) - base, peak(1, 2) - base
    return base + (spec.text.num_layers - 1) * per_layer + (spec.vision.depth - 1) * per_block


def stage1_step(model, mae, batch, backend: str, mae_weight: float = 0.1) -> None:
    """The stage-1 step as trainers/cpt.py runs it: forward, MLM + MAE losses, backward."""
    from ..model.heads import mlm_loss

    hidden = model(batch)
    (mlm_loss(model, hidden, batch) + mae_weight * mae(hidden, batch, backend)).backward()


def stage2_step(model, mae, batch, backend: str) -> None:
    """The stage-2 step on one packed forward of queries, positives and negatives: forward, mean-pooled
    embeddings, a loss over them, backward (InfoNCE itself is ~1e-6 of the step and holds no activation)."""
    from ..model.pooling import embed_pool

    embed_pool(model(batch), batch.cu_seqlens).square().sum().backward()


def recompute_order(kinds: tuple[str, ...]) -> list[dict]:
    """Every assignment of modes to `kinds`, cheapest recompute first: fewer fully recomputed blocks, then fewer
    selective ones (FLOP-wise selective recomputes only element-wise work)."""
    combos = [dict(zip(kinds, modes)) for modes in itertools.product(MODES, repeat=len(kinds))]
    return sorted(
        combos, key=lambda m: (sum(v == "full" for v in m.values()), sum(v == "selective" for v in m.values()))
    )


def cheapest_fit(
    step, spec, static: float, target: Target, kinds: tuple[str, ...], shapes: dict, fixed: dict | None = None
) -> MemoryPlan | None:
    """The plan of least recompute (then fewest splits) whose exact estimate fits, over `shapes` ({splits:
    batch}). Candidates are screened by an additive model (all blocks full, plus what each kind adds in another
    mode, measured once per shape), so only likely fits pay for an exact estimate."""
    fixed, known = fixed or {}, {}

    def exact(modes: dict, batch) -> float:
        key = (id(batch), tuple(sorted(modes.items())))  # the batches live in `shapes` for the whole call
        if key not in known:
            known[key] = static + activation_peak(step, batch, spec, {**modes, **fixed}, target)
        return known[key]

    first_splits, first = next(iter(shapes.items()))
    cheapest = dict.fromkeys(kinds, "none")
    peak = exact(cheapest, first)
    if peak <= target.budget:  # nothing to recompute, nothing to split
        return MemoryPlan(cheapest, first_splits, None, peak, target.budget)
    last_splits, last = list(shapes.items())[-1]
    if exact(dict.fromkeys(kinds, "full"), last) > target.budget:  # the least memory there is: nothing fits
        return None
    tables = {}

    def screened(modes: dict, splits: int) -> float:
        if splits not in tables:
            full = dict.fromkeys(kinds, "full")
            base = exact(full, shapes[splits])
            tables[splits] = (
                base,
                {(k, m): exact({**full, k: m}, shapes[splits]) - base for k in kinds for m in MODES if m != "full"},
            )
        base, delta = tables[splits]
        return base + sum(delta.get((k, m), 0.0) for k, m in modes.items())

    for modes in recompute_order(kinds):
        for splits, batch in shapes.items():
            if screened(modes, splits) <= target.budget:
                peak = exact(modes, batch)
                if peak <= target.budget:
                    return MemoryPlan(modes, splits, None, peak, target.budget)
    return None


def plan_stage1(spec, static: float, batch_for_split, target: Target, max_splits: int) -> MemoryPlan:
    """The cheapest plan whose stage-1 micro-batch fits: least recomputed work first, each at the fewest splits
    (FLOP-neutral) that fit; `batch_for_split(s)` is the planning pack at 1/s of the budget. When nothing fits,
    full recompute at the most splits (the smallest peak), marked as not fitting."""
    shapes = {s: batch_for_split(s) for s in SPLITS if s <= max_splits}
    plan = cheapest_fit(stage1_step, spec, static, target, KINDS, shapes)
    if plan is None:
        splits, batch = list(shapes.items())[-1]
        full = dict.fromkeys(KINDS, "full")
        plan = MemoryPlan(
            full, splits, None, static + activation_peak(stage1_step, batch, spec, full, target), target.budget
        )
    return plan


def plan_stage2(spec, static: float, batch_for_chunk, target: Target, step_tokens: int) -> MemoryPlan:
    """The cheapest plan whose stage-2 step fits in one packed forward; GradCache only when even full recompute
    does not fit, with the largest chunk (halving the step's tokens) that fits under full recompute."""
    kinds, mae = ("decoder", "vision"), {"mae": "none"}
    plan = cheapest_fit(stage2_step, spec, static, target, kinds, {1: batch_for_chunk(None)}, fixed=mae)
    if plan is not None:
        return plan
    full, chunk = dict.fromkeys(kinds, "full"), step_tokens
    while True:
        chunk //= 2
        peak = static + activation_peak(stage2_step, batch_for_chunk(chunk), spec, {**full, **mae}, target)
        if peak <= target.budget or chunk <= 1:
            return MemoryPlan(full, 1, chunk, peak, target.budget)


def planning_pack(processor, tokens: int, *, masked: bool, mlm_rate: float = 0.4, mae_rate: float = 0.5):
    """The worst case a budget of `tokens` packs: pages at the processor's pixel cap (each image token also costs
    four vision patches), cut to its max_length, repeated to fill the budget; masked as stage 1 masks."""
    from PIL import Image

    from ..data.batch import pack_sequences
    from ..data.masking import apply_mae, apply_mlm
    from ..data.tokens import IMAGE_PLACEHOLDER

    side = int(processor.max_pixels**0.5)
    page = processor.encode(f"{IMAGE_PLACEHOLDER} a page", [Image.new("RGB", (side, side), "white")], "planning")
    sequences = []
    for i in range(max(1, tokens // page.input_ids.numel())):
        seq = page
        if masked:
            generator = torch.Generator().manual_seed(i)
            seq = apply_mlm(
                seq,
                mask_token_id=processor.mask_token_id,
                special_ids=processor.special_ids,
                rate=mlm_rate,
                generator=generator,
            )
            seq = apply_mae(
                seq,
                image_token_id=processor.image_token_id,
                rate=mae_rate,
                generator=generator,
                merge_unit=processor.spatial_merge_size**2,
            )
        sequences.append(seq)
    return pack_sequences(sequences, processor.image_token_id)


def plan_run(
    config, model: nn.Module, mae: nn.Module | None, processor, device: torch.device, world_size: int
) -> MemoryPlan:
    """The memory plan of a run with `activation_checkpointing: auto`, logged once."""
    target = device_target(device, world_size, config.dtype, config.device_memory_gb)
    blocks = [b for bs in block_kinds(model, mae).values() for b in bs]
    static = static_bytes(model, mae, blocks, target)
    if config.stage == "cpt":

        def batch_for_split(splits: int):
            return planning_pack(
                processor,
                config.tokens_per_micro_batch // splits,
                masked=True,
                mlm_rate=config.mlm_rate,
                mae_rate=config.mae_rate,
            )

        plan = plan_stage1(
            model.spec, static, batch_for_split, target, max_splits=config.tokens_per_micro_batch // config.max_length
        )
    else:
        step_tokens = (2 + config.negative_ratio) * config.pairs_per_rank * config.max_length

        def batch_for_chunk(chunk: int | None):
            return planning_pack(processor, config.grad_cache_tokens or chunk or step_tokens, masked=False)

        plan = plan_stage2(model.spec, static, batch_for_chunk, target, step_tokens)
    log.info("%s", plan.describe())
    if not plan.fits:
        log.warning("memory plan: no plan fits the budget; running the one with the smallest peak")
    return plan


def block_modes(plan: MemoryPlan, model: nn.Module, mae: nn.Module | None) -> list[str]:
    """One mode per block in the order the trainers pass blocks to parallelize: decoder, vision, MAE layer."""
    return [plan.modes[kind] for kind, blocks in block_kinds(model, mae).items() for _ in blocks]
