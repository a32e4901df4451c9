"""MocaModel: vision tower + bidirectional text decoder + LM head over one PackedBatch -> hidden states [T, H]."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ModelSpec
from ..data.batch import PackedBatch, map_tensors
from ..data.positions import vision_layout
from .attention import Segments, backend_for
from .pooling import embed_pool, token_vectors
from .text import TextDecoder
from .vision import VisionTower


class MocaModel(nn.Module):
    """Qwen2.5-VL with a bidirectional decoder on packed tokens. Plain modules only: parallelism, compile and
    FP8 are applied from outside (moca_fast/parallel/parallelize.py). `causal` runs the decoder causally, as a causally
    trained checkpoint needs it (colpali-engine's ColQwen2.5; model/colqwen.py)."""

    def __init__(self, spec: ModelSpec, attention_backend: str = "auto", causal: bool = False):
        super().__init__()
        self.spec = spec
        self.attention_backend = attention_backend
        self.causal = causal
        self.visual = VisionTower(spec.vision)
        self.language_model = TextDecoder(spec.text)
        self.lm_head = nn.Linear(spec.text.hidden_size, spec.text.vocab_size, bias=False)
        # The multi-vector head (colpali-engine's name and shape): hidden -> multi_vector_dim, on every token.
        self.custom_text_proj = (
            nn.Linear(spec.text.hidden_size, spec.multi_vector_dim) if spec.multi_vector_dim is not None else None
        )
        self.tie_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> MocaModel:
        """Random initialisation as Qwen2.5-VL's: normal(0, std) matrices, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv3d, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "eps") and hasattr(module, "weight"):  # RMSNorm
                nn.init.ones_(module.weight)
        return self

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Final-norm hidden states [T, H] of every token of every packed sequence."""
        embeds = self.language_model.embed_tokens(batch.input_ids)
        backend = backend_for(self.attention_backend, embeds)
        if batch.pixel_values.shape[0]:
            image_embeds = self.visual(batch.pixel_values, batch.vision, backend)
            embeds = embeds.index_copy(0, batch.image_token_index, image_embeds.to(embeds.dtype))
        elif self.training:
            # A text-only batch still runs the vision tower (FSDP's collectives need every module on every
            # rank): one all-zero 4x4-patch image whose output enters with weight zero.
            embeds = embeds + 0.0 * self._idle_vision(embeds, backend)
        segments = Segments.build(batch.cu_seqlens, batch.max_seqlen, batch.num_tokens, backend, causal=self.causal)
        return self.language_model(embeds, batch.position_ids, segments)

    def _idle_vision(self, like: torch.Tensor, backend: str) -> torch.Tensor:
        spec = self.spec.vision
        grid = torch.tensor([[1, 2 * spec.spatial_merge_size, 2 * spec.spatial_merge_size]])
        layout = vision_layout(grid, spec.spatial_merge_size, spec.window_size, spec.patch_size)
        layout = map_tensors(layout, lambda t: t.to(like.device))
        pixels = torch.zeros(int(grid.prod()), spec.patch_dim, device=like.device)
        return self.visual(pixels, layout, backend).sum().to(like.dtype)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """L2-normalised mean-pooled embeddings [S, H] (fp32), one per packed sequence."""
        return embed_pool(self(batch), batch.cu_seqlens)

    def multi_vectors(self, hidden: torch.Tensor) -> torch.Tensor:
        """The multi-vector head on final hidden states [T, H]: L2-normalised token vectors [T, multi_vector_dim]."""
        if self.custom_text_proj is None:
            raise ValueError("this model has no multi-vector head (its config declares no multi_vector_dim)")
        return token_vectors(hidden, self.custom_text_proj)

    @torch.no_grad()
    def set_heads(self, multi_vector_dim: int | None, matryoshka_dims: tuple[int, ...] = ()) -> MocaModel:
        """Declare the embedding heads this model is trained for (`spec` says them, so checkpoints declare them):
        a fresh multi-vector head (normal(0, 0.02) weights, zero bias) when it has none yet; an existing one must
        have `multi_vector_dim` outputs. None keeps the head a checkpoint brought (it is then not trained)."""
        hidden = self.spec.text.hidden_size
        bad = [d for d in matryoshka_dims if not 0 < d <= hidden]
        if bad:
            raise ValueError(f"matryoshka_dims {bad} outside 1..{hidden} (the pooled vector's size)")
        if multi_vector_dim is not None:
            if self.custom_text_proj is None:
                param = next(self.parameters())
                self.custom_text_proj = nn.Linear(hidden, multi_vector_dim, device=param.device, dtype=param.dtype)
                nn.init.normal_(self.custom_text_proj.weight, std=0.02)
                nn.init.zeros_(self.custom_text_proj.bias)
            elif self.custom_text_proj.out_features != multi_vector_dim:
                raise ValueError(
                    f"multi_vector_dim {multi_vector_dim}: the checkpoint's multi-vector head has "
                    f"{self.custom_text_proj.out_features} outputs"
                )
        self.spec = dataclasses.replace(
            self.spec,
            multi_vector_dim=self.spec.multi_vector_dim or multi_vector_dim,
            matryoshka_dims=tuple(matryoshka_dims),
        )
        return self
