"""The reference's computation, built from public libraries: the baseline of bench/ and the drop-in tests' oracle.

What the public MoCa code computes, done with transformers + liger-kernel + torch and nothing of
ours in the forward but the attention kernel: transformers' Qwen2.5-VL made bidirectional, right-padded batches
(a multiple of 32 in training) bucketed by cost, Liger's fused linear cross-entropy over every position (ignored
labels where no mask), the MAE decoder layer over the whole sequence with its projection in the reference's
`(d p)` layout, three separate forwards per contrastive step, torch InfoNCE on the gathered similarity matrix
(every rank scores every gathered query), transformers' activation checkpointing. Attention runs as the
reference's flash_attention_2 runs it (bench/reference_attention.py): varlen over the unpadded text tokens, the
vision windows through their cu_seqlens in one call; flash-attn itself where it serves, else the kernel our
engine would use on that device, so that the two paths differ by their computation, not by their attention
kernel. Where the reference is ambiguous this path takes the cheaper reading (e.g. the MAE projection on the
chosen rows only), so that a speed-up measured against it is not inflated.

Inputs are our EncodedSequences (token ids, patch rows, grids) so that both paths see the very same samples;
positions are left to transformers. For embeddings from raw text and images, `processor_batch` uses
transformers' own tokenizer call and image processor, as the reference's evaluation does.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from bench.reference_attention import use_varlen_attention
from moca_fast.data.processor import EncodedSequence
from moca_fast.embed import plan_batches
from moca_fast.model.attention import resolve_backend

IGNORE = -100
PAD_MULTIPLE = 32  # training batches are padded to a multiple of 32
MAX_COST = 1280  # the reference's max_len, which caps a sample's cost
BUCKET_COST = 12800  # cost units per micro-batch


@dataclass
class PaddedBatch:
    """A right-padded batch as transformers takes it, plus the stage-1 targets in padded coordinates."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L], 1 on real tokens
    pixel_values: torch.Tensor | None  # [P, 1176]
    image_grid_thw: torch.Tensor | None  # [I, 3]
    labels: torch.Tensor | None = None  # [B, L]: the original id at MLM-masked tokens, IGNORE elsewhere
    mae_rows: torch.Tensor | None = None  # [K] flat indices into B * L of the MAE-chosen image tokens
    mae_targets: torch.Tensor | None = None  # [4K, 1176]

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens."""
        return int(self.attention_mask.sum())

    def to(self, device) -> PaddedBatch:
        return replace(
            self,
            **{
                k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in self.__dict__.items()
            },
        )


def sample_cost(seq: EncodedSequence, image_token_id: int) -> int:
    """The reference's bucketing cost: text tokens + 4 x image tokens + 2 per image, capped at max_len."""
    image_tokens = int((seq.input_ids == image_token_id).sum())
    text_tokens = seq.input_ids.numel() - image_tokens
    return min(text_tokens + 4 * image_tokens + 2 * seq.image_grid_thw.shape[0], MAX_COST)


def cost_buckets(costs: list[int], budget: int = BUCKET_COST) -> list[list[int]]:
    """Indices grouped into micro-batches of about `budget` cost units, similar costs together (sorted by cost
    and cut greedily: the embedder's batch plan)."""
    return plan_batches(costs, budget)


def pad_sequences(sequences: list[EncodedSequence], pad_id: int, multiple: int = PAD_MULTIPLE) -> PaddedBatch:
    """Right-pad encoded sequences into one batch; stage-1 targets move to padded coordinates when present."""
    longest = max(len(s) for s in sequences)
    length = -(-longest // multiple) * multiple
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq.input_ids
        attention_mask[row, : len(seq)] = 1
    pixels = [s.pixel_values for s in sequences if s.pixel_values.shape[0]]
    grids = [s.image_grid_thw for s in sequences if s.image_grid_thw.shape[0]]
    batch = PaddedBatch(
        input_ids, attention_mask, torch.cat(pixels) if pixels else None, torch.cat(grids) if grids else None
    )
    if sequences[0].mlm_positions is None:
        return batch
    labels = torch.full_like(input_ids, IGNORE)
    for row, seq in enumerate(sequences):
        labels[row, seq.mlm_positions] = seq.mlm_labels
    mae_rows = torch.cat([row * length + s.mae_positions for row, s in enumerate(sequences)])
    return replace(batch, labels=labels, mae_rows=mae_rows, mae_targets=torch.cat([s.mae_targets for s in sequences]))


def processor_batch(
    tokenizer, image_processor, cases: list[tuple[str, list]], *, min_pixels: int, max_pixels: int
) -> PaddedBatch:
    """Raw (text with the placeholder triple at each image, PIL images) cases -> one right-padded batch, through
    transformers' tokenizer and image processor the way the reference's evaluation calls them."""
    images = [image for _, ims in cases for image in ims]
    pixels = (
        image_processor(
            images=images, return_tensors="pt", size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
        )
        if images
        else None
    )
    grids = iter(pixels["image_grid_thw"].tolist() if images else [])
    texts = []
    for text, ims in cases:  # expand each image's pad token to one per merged 2x2 patch block
        for _ in ims:
            t, h, w = next(grids)
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (t * h * w // 4), 1)
        texts.append(text.replace("<|placeholder|>", "<|image_pad|>"))
    tokenizer.padding_side = "right"
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return PaddedBatch(
        encoded.input_ids,
        encoded.attention_mask,
        pixels["pixel_values"] if images else None,
        pixels["image_grid_thw"] if images else None,
    )


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy over every row, mean over the non-ignored ones. On a CPU without Triton's
    interpreter (Liger's kernels are Triton only), the same sums in torch: the logits of every row, then
    cross-entropy (bench/cpu_time.py times this, not the interpreter)."""
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return F.cross_entropy(F.linear(hidden, weight.to(hidden.dtype)).float(), labels, ignore_index=IGNORE)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    # Under autocast the hidden states are bf16 and the master weight fp32: the head runs in the hidden dtype.
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)(weight.to(hidden.dtype), hidden, labels)


class ReferencePath(nn.Module):
    """transformers' bidirectional Qwen2.5-VL (a Qwen2_5_VLForConditionalGeneration) with the reference's heads.

    `attention_backend`: moca_fast's backend name ('auto', 'flash', 'varlen', 'sdpa'). 'auto' resolves as our
    engine does for bf16 (the reference's attention dtype on CUDA): flash-attn where installed on CUDA, which runs
    as transformers' own flash_attention_2, else torch's varlen_attn on CUDA and one SDPA over the padded segments
    on the CPU, both through bench/reference_attention.py. `attention` names the implementation that runs.
    `mae_layer` / `mae_proj`: the stage-1 MAE layer (a transformers decoder layer) and its projection; `with_mae`
    builds them from the reference's checkpoint tensors (ours give theirs with `MaeHead.reference_state_dict`)."""

    def __init__(self, hf_model, *, activation_checkpointing: bool = False, attention_backend: str = "auto"):
        super().__init__()
        self.hf = hf_model
        backend = resolve_backend(attention_backend, next(hf_model.parameters()).device, torch.bfloat16)
        if backend == "flash":  # what the reference runs on
            hf_model.set_attn_implementation("flash_attention_2")
            self.attention = "flash_attention_2"
        else:
            self.attention = use_varlen_attention(hf_model, backend)
        self.mae_layer: nn.Module | None = None
        self.mae_proj: nn.Linear | None = None
        if activation_checkpointing:  # transformers >= 5.2x renamed it; older 5.x has only the first name
            enable = getattr(hf_model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._layer_kwargs: dict = {}
        self.hf.model.language_model.layers[0].register_forward_pre_hook(self._keep_layer_kwargs, with_kwargs=True)

    def with_mae(self, tensors: dict[str, torch.Tensor]) -> ReferencePath:
        """The reference's stage-1 MAE head from its checkpoint tensors (`mae_decoder.*`: a transformers decoder
        layer; `mae_proj.*`: the Linear); `MaeHead.reference_state_dict()` gives them for one of ours."""
        layers = self.hf.model.language_model.layers
        self.mae_layer = copy.deepcopy(layers[len(layers) // 2])
        self.mae_layer.load_state_dict(_under(tensors, "mae_decoder."))
        proj = _under(tensors, "mae_proj.")
        self.mae_proj = nn.Linear(proj["weight"].shape[1], proj["weight"].shape[0]).to(proj["weight"])
        self.mae_proj.load_state_dict(proj)
        return self

    def _keep_layer_kwargs(self, module, args, kwargs):
        # The decoder's attention mask and rotary embeddings, reused by the MAE layer as the reference does.
        self._layer_kwargs = {k: kwargs[k] for k in ("attention_mask", "position_embeddings")}

    def hidden(self, batch: PaddedBatch) -> torch.Tensor:
        """The final-norm hidden states [B, L, H]."""
        image_token_id = self.hf.config.image_token_id
        kwargs = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            mm_token_type_ids=(batch.input_ids == image_token_id).long(),
        )
        if batch.pixel_values is not None:
            kwargs.update(pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
        return self.hf.model(**kwargs).last_hidden_state

    def embed(self, batch: PaddedBatch) -> torch.Tensor:
        """Mean over the attended tokens, then L2 normalisation: [B, H]."""
        hidden = self.hidden(batch)
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def cpt_loss(self, batch: PaddedBatch, mae_weight: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 1: (MLM + mae_weight * MAE, MLM, MAE) of one padded micro-batch."""
        hidden = self.hidden(batch)
        flat = hidden.reshape(-1, hidden.shape[-1])
        mlm = liger_linear_cross_entropy(flat, self.hf.lm_head.weight, batch.labels.reshape(-1))
        mae_hidden = self.mae_layer(
            hidden,
            attention_mask=self._layer_kwargs["attention_mask"],
            position_embeddings=self._layer_kwargs["position_embeddings"],
        )
        predicted = self.mae_proj(mae_hidden.reshape(-1, hidden.shape[-1])[batch.mae_rows])
        # The reference's "b (d p) -> (b p) d": output d * 4 + p of a token is value d of its patch p.
        k, patch_dim = predicted.shape[0], batch.mae_targets.shape[-1]
        if k == 0:  # a text-only micro-batch: no image token to reconstruct, no MAE term
            mae = predicted.float().sum()
            return mlm + mae_weight * mae, mlm, mae
        predicted = predicted.reshape(k, patch_dim, -1).transpose(1, 2).reshape(-1, patch_dim)
        mae = F.mse_loss(predicted.float(), batch.mae_targets.float())
        return mlm + mae_weight * mae, mlm, mae

    def cl_loss(
        self, queries: PaddedBatch, positives: PaddedBatch, negatives: PaddedBatch | None, temperature: float
    ) -> torch.Tensor:
        """Stage 2: three forwards; queries, positives and negatives gathered from every rank (gradient through the
        local slice only), every query scored against all positives plus its own hard negatives. Each rank holds
        the same loss, the mean over the global batch, and its gradient reaches only the local embeddings."""
        q, p = self.embed(queries), self.embed(positives)
        n = self.embed(negatives).reshape(q.shape[0], -1, q.shape[1]) if negatives is not None else None
        return info_nce(
            gather_local_grad(q), gather_local_grad(p), gather_local_grad(n) if n is not None else None, temperature
        )


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def gather_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather over ranks with the gradient flowing through the local slice only (the reference's gather)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    parts[torch.distributed.get_rank()] = x
    return torch.cat(parts)


def info_nce(
    queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """Cross-entropy over [q . all positives, q . own negatives] / temperature, the target of query i being
    positive i."""
    scores = queries.float() @ positives.float().T
    if negatives is not None:
        scores = torch.cat([scores, torch.einsum("bh,brh->br", queries.float(), negatives.float())], dim=1)
    return F.cross_entropy(scores / temperature, torch.arange(queries.shape[0], device=queries.device))
