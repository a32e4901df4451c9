"""Transforms applied to a model from outside, in torchtitan's order: float8 -> activation checkpointing ->
torch.compile per block -> FSDP2 per block. The model code knows nothing of any of them; state-dict keys are
left unchanged (composable checkpointing, in-place Module.compile), so checkpoints stay in the HF layout.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import recompute_mode
from .memory_plan import apply_recompute

log = logging.getLogger(__name__)


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """Whether torchao float8 training can run here, and why not when it cannot."""
    if device.type != "cuda":
        return False, f"float8 needs CUDA, the device is {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return False, f"float8 needs compute capability >= 8.9, the GPU has {capability[0]}.{capability[1]}"
    try:
        import torchao.float8  # noqa: F401  (only whether it imports: convert_to_float8_training lives there)
    except ImportError as err:
        return False, f"torchao is not importable: {err}"
    return True, "supported"


def fp8_pays(module: nn.Module) -> bool:
    """Whether a linear layer gains from float8 GEMMs: both dimensions multiples of 16 (the hardware's rule), and
    not both small (N out <= 1024 with K in <= 4096 runs no faster than bf16 with tensorwise scaling on H100,
    after torchao's measured tables), so Qwen's narrow k_proj / v_proj stay in bf16."""
    if not isinstance(module, nn.Linear):
        return False
    n, k = module.out_features, module.in_features
    return n % 16 == 0 and k % 16 == 0 and not (k <= 4096 and n <= 1024)


def fp8_config():
    """torchao's tensorwise float8 with the contracted dimension of every GEMM zero-padded to a multiple of 16:
    on CUDA `torch._scaled_mm` takes only dimensions that are, and the weight-gradient GEMM contracts over the
    packed token count, which packing leaves arbitrary. Zero rows add nothing to a sum, so this is exact."""
    from torchao.float8 import Float8LinearConfig

    return Float8LinearConfig(pad_inner_dim=True)


def convert_decoder_to_fp8(decoder_layers: nn.ModuleList, device: torch.device) -> bool:
    """torchao float8 for the decoder layers' linear layers where it pays (never the vision tower, the embeddings
    or the heads); skipped with a logged reason where unsupported. True when converted."""
    ok, reason = fp8_supported(device)
    if not ok:
        log.warning("fp8: off (%s)", reason)
        return False
    from torchao.float8 import convert_to_float8_training

    config = fp8_config()
    for layer in decoder_layers:
        convert_to_float8_training(layer, config=config, module_filter_fn=lambda module, fqn: fp8_pays(module))
    log.info(
        "fp8: on for %d decoder layers (torchao float8, dynamic tensorwise scaling, token dimension padded to 16)",
        len(decoder_layers),
    )
    return True


def parallelize(
    model: nn.Module,
    blocks: list[nn.Module],
    *,
    extra: nn.Module | None = None,
    device: torch.device,
    fp8_layers: nn.ModuleList | None,
    activation_checkpointing: bool | str | list[str],
    compile: bool,
    world_size: int,
    param_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, bool]:
    """Apply the training transforms to `model` (and `extra`, trained modules outside it such as the MAE
    head), whose repeated `blocks` (decoder layers, vision blocks, the MAE layer) each become an
    activation-checkpointing, compile and FSDP unit. `activation_checkpointing`: one recompute mode for every
    block (True: full, False: none, or 'none' / 'selective' / 'full'), or one per block (a memory plan's).
    Returns what is on."""
    modes = (
        activation_checkpointing
        if isinstance(activation_checkpointing, list)
        else [recompute_mode(activation_checkpointing)] * len(blocks)
    )
    state = {
        "fp8": False,
        "activation_checkpointing": any(m != "none" for m in modes),
        "compile": compile,
        "fsdp": world_size > 1,
    }
    if fp8_layers is not None:
        state["fp8"] = convert_decoder_to_fp8(fp8_layers, device)
    for block, mode in zip(blocks, modes, strict=True):
        apply_recompute(block, mode)
    if compile:
        # Token counts change with every pack: every size symbolic from the first call, so a new pack length
        # reuses the compiled code instead of recompiling (past torch._dynamo's recompile limit dynamo would
        # quietly run the block eagerly). Blocks of one class share their compiled code.
        for block in blocks:
            block.compile(dynamic=True)
    if world_size > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mixed = (
            MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
            if device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        for block in blocks:
            fully_shard(block, mp_policy=mixed)
        for root in (model, extra):
            if root is not None:
                fully_shard(root, mp_policy=mixed)
    for name, on in state.items():
        log.info("%s: %s", name, "on" if on else "off")
    return state
