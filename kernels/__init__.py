"""Fused Triton kernels (masked-LM CE, patch reconstruction, InfoNCE) with torch references; installed as moca_fast.kernels.

Each loss is one function taking plain tensors (Triton on CUDA, a memory-bounded chunked torch path otherwise)
and is registered as a torch.library custom op, so torch.compile keeps it as one opaque node.
"""

from .info_nce import info_nce_loss
from .masked_lm_ce import masked_lm_cross_entropy
from .patch_reconstruction import patch_reconstruction_loss
from .reference import info_nce_reference, masked_lm_ce_reference, patch_reconstruction_reference

__all__ = [
    "info_nce_loss",
    "info_nce_reference",
    "masked_lm_ce_reference",
    "masked_lm_cross_entropy",
    "patch_reconstruction_loss",
    "patch_reconstruction_reference",
]
