"""Stage-1 heads: masked-LM loss through the LM head on masked rows only, and the MAE reconstruction layer.

Both losses run through the fused kernels (moca_fast.kernels), so neither the [M, vocab] logits nor the
[K, 4 * 1176] patch predictions are ever materialised. The MAE projection's outputs are laid out as the
reference's (`(d p)`: output d * 4 + p is value d of patch p), so its stage-1 heads carry over as they are;
`mae_state_from_patch_major` converts heads saved by moca_fast before that (p * 1176 + d).
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.batch import PackedBatch
from ..kernels import masked_lm_cross_entropy, patch_reconstruction_loss
from .attention import Bounds, Segments, backend_for
from .moca import MocaModel
from .text import DecoderLayer, text_rotary


def mlm_loss(model: MocaModel, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Mean cross-entropy over the masked text rows (the LM head sees only those rows)."""
    return masked_lm_cross_entropy(hidden[batch.mlm_index], model.lm_head.weight, batch.mlm_labels)


# The reference's stage-1 model holds the head as `mae_decoder` (a decoder layer) and `mae_proj` (the Linear).
REFERENCE_PREFIXES = {"mae_decoder.": "layer.", "mae_proj.": "proj."}


def reference_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An MaeHead state dict under the reference's names (`mae_decoder.*`, `mae_proj.*`): what its checkpoints
    store."""
    ours_to_reference = {ours: theirs for theirs, ours in REFERENCE_PREFIXES.items()}
    return {
        ours_to_reference[prefix] + key[len(prefix) :]: tensor
        for key, tensor in state.items()
        for prefix in ours_to_reference
        if key.startswith(prefix)
    }


def mae_state_from_patch_major(state: dict[str, torch.Tensor], merge_unit: int = 4) -> dict[str, torch.Tensor]:
    """An MaeHead state dict saved by moca_fast before its projection took the reference's layout (rows
    p * 1176 + d) with the projection rows in that layout (d * 4 + p); everything else unchanged."""

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(merge_unit, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)

    return {name: rows(tensor) if name in ("proj.weight", "proj.bias") else tensor for name, tensor in state.items()}


class MaeHead(nn.Module):
    """One extra bidirectional decoder layer whose queries are the masked image rows only (keys and values
    from their whole sequence), then Linear(hidden -> 4 * 1176) reconstructing the 4 patches of each row."""

    def __init__(self, model: MocaModel):
        super().__init__()
        spec = model.spec
        self.text_spec = spec.text
        self.layer = DecoderLayer(spec.text)
        self.proj = nn.Linear(spec.text.hidden_size, spec.vision.merge_unit * spec.vision.patch_dim)

    @classmethod
    def from_reference(cls, model: MocaModel, tensors: dict[str, torch.Tensor]) -> MaeHead:
        """The head stored in a reference stage-1 checkpoint (`mae_decoder.*`, `mae_proj.*`; same layout)."""
        head = cls(model)
        renamed = {}
        for key, tensor in tensors.items():
            prefix = next((p for p in REFERENCE_PREFIXES if key.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"{key!r} is not a key of the reference's MAE head ({', '.join(REFERENCE_PREFIXES)})")
            renamed[REFERENCE_PREFIXES[prefix] + key[len(prefix) :]] = tensor
        head.load_state_dict(renamed)  # strict: a missing, unexpected or misshapen tensor raises, naming it
        return head.to(next(model.parameters()).dtype)

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """This head under the reference's names (`mae_decoder.*`, `mae_proj.*`): what its checkpoints store."""
        return reference_names(self.state_dict())

    @classmethod
    def from_middle_layer(cls, model: MocaModel) -> MaeHead:
        """The reference's initialisation: the layer copies decoder layer L/2; the projection is fresh."""
        head = cls(model)
        middle = model.language_model.layers[model.spec.text.num_layers // 2]
        head.layer.load_state_dict(middle.state_dict())
        nn.init.normal_(head.proj.weight, std=0.02)
        nn.init.zeros_(head.proj.bias)
        return head.to(next(model.parameters()).dtype)

    def features(self, hidden: torch.Tensor, batch: PackedBatch, backend: str = "auto") -> torch.Tensor:
        """The layer's output [K, H] at the masked rows; `backend` as MocaModel's attention_backend."""
        backend = backend_for(backend, hidden)
        cos, sin = text_rotary(self.text_spec, batch.position_ids)
        queries = Bounds(batch.mae_cu_seqlens, batch.mae_max_seqlen, batch.mae_index.numel())
        segments = Segments.build(batch.cu_seqlens, batch.max_seqlen, batch.num_tokens, backend, q_bounds=queries)
        return self.layer(hidden, cos, sin, segments, query_index=batch.mae_index)

    def forward(self, hidden: torch.Tensor, batch: PackedBatch, backend: str = "auto") -> torch.Tensor:
        """Mean squared error of the reconstructed patches against the originals."""
        features = self.features(hidden, batch, backend)
        k, patch_dim = features.shape[0], batch.mae_targets.shape[-1]
        merge = self.proj.out_features // patch_dim
        # [4K, 1176] (4 patch rows per token) -> [K, 1176 * 4] in the projection's (d p) layout; K may be 0
        targets = batch.mae_targets.reshape(k, merge, patch_dim).transpose(1, 2).reshape(k, merge * patch_dim)
        return patch_reconstruction_loss(features, self.proj.weight, self.proj.bias, targets)
