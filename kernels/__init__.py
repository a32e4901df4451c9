"""Fused Triton kernels (masked-LM CE, patch reconstruction, InfoNCE, MaxSim InfoNCE) with torch references; installed
as moca_fast.kernels.

Each loss is one function taking plain tensors (Triton on CUDA, a memory-bounded chunked torch path otherwise)
and is registered as a torch.library custom op, so torch.compile keeps it as one opaque node.
"""

# Run from a checkout (`python -m pytest`, `python -m moca_fast.cli`), the repository root is on sys.path and this
# folder is also importable as a top-level `kernels` — the name of a PyPI package that transformers probes for by
# importing it. Executed a second time under that name, the modules below would define the moca_fast:: custom ops
# again, and torch.library destroys an op's first registration when it is redefined: every call through the first
# definition then reads freed memory (segmentation faults, std::bad_alloc). So under any other name this package is
# empty: transformers finds no version there and treats `kernels` as absent.
if __name__ == "moca_fast.kernels":
    from .info_nce import info_nce_loss
    from .late_interaction import maxsim_info_nce
    from .masked_lm_ce import masked_lm_cross_entropy
    from .patch_reconstruction import patch_reconstruction_loss
    from .reference import (
        info_nce_reference,
        masked_lm_ce_reference,
        maxsim_info_nce_reference,
        patch_reconstruction_reference,
    )

__all__ = [
    "info_nce_loss",
    "info_nce_reference",
    "masked_lm_ce_reference",
    "masked_lm_cross_entropy",
    "maxsim_info_nce",
    "maxsim_info_nce_reference",
    "patch_reconstruction_loss",
    "patch_reconstruction_reference",
]
