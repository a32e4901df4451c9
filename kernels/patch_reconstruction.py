"""MAE loss: the Linear(H -> N) reconstruction head fused with the mean squared error against the patches.

`patch_reconstruction_loss(hidden [K, H], weight [N, H], bias [N], targets [K, N])` = mean over the K·N
elements of (hidden @ weightᵀ + bias - targets)², in fp32 (N = 4·1176 = 4704 for the MoCa head). The forward
kernel forms each prediction tile in registers and, in its epilogue, turns it straight into the loss's gradient
with respect to the predictions, 2·(prediction - target)/(K·N), stored in the input dtype: the predictions
never reach memory, and the backward is two GEMMs and a column sum on that gradient (scaled by the incoming
gradient). The gradient is [K, N] like the targets, so memory stays at the size of the inputs. Targets get no
gradient. K = 0 gives 0.0 and zero gradients. Under autocast, hidden, weight and bias enter in autocast's dtype
(bf16 tensor-core dots, fp32 accumulation), as a Linear's would.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as common
from ._common import autocast_off, autocast_operands, dot_tile, resolve_backend


def patch_reconstruction_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    targets: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean squared reconstruction error (fp32 scalar). backend: 'auto' (Triton on CUDA), 'triton' or 'torch'."""
    hidden, weight, bias = autocast_operands(hidden, weight, bias)
    K, N = hidden.shape[0], weight.shape[0]
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        shapes = f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"hidden [K, H] and weight [N, H] expected, got {shapes}")
    if bias.shape != (N,) or targets.shape != (K, N):
        shapes = f"{tuple(bias.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"bias [{N}] and targets [{K}, {N}] expected, got {shapes}")
    if not hidden.dtype == weight.dtype == bias.dtype:
        dtypes = f"{hidden.dtype}, {weight.dtype}, {bias.dtype}"
        raise ValueError(f"hidden, weight and bias must share a dtype, got {dtypes}")
    loss, _ = _patch_reconstruction(hidden, weight, bias, targets, resolve_backend(backend, hidden))
    return loss


@torch.library.custom_op("moca_fast::patch_reconstruction", mutates_args=())
def _patch_reconstruction(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, d loss / d predictions [K, N] in hidden's dtype)."""
    hidden, weight, bias, targets = (t.contiguous() for t in (hidden, weight, bias, targets))
    if hidden.shape[0] == 0:
        return hidden.new_zeros((), dtype=torch.float32), hidden.new_empty(targets.shape)
    forward = _triton_forward if backend == "triton" else _torch_forward
    with autocast_off(hidden):
        return forward(hidden, weight, bias, targets, grad_factor=2.0 / targets.numel())


@_patch_reconstruction.register_fake
def _(hidden, weight, bias, targets, backend):
    return hidden.new_empty((), dtype=torch.float32), hidden.new_empty(targets.shape)


def _setup_context(ctx, inputs, output):
    hidden, weight, _bias, _targets, _backend = inputs
    ctx.save_for_backward(hidden, weight, output[1])


def _backward(ctx, grad_loss, _grad_residual):
    hidden, weight, d_predictions = ctx.saved_tensors
    with autocast_off(hidden):
        d_predictions = d_predictions * grad_loss
        d_hidden = d_predictions @ weight
        d_weight = d_predictions.T @ hidden
        d_bias = d_predictions.sum(0, dtype=torch.float32).to(weight.dtype)
    return d_hidden, d_weight, d_bias, None, None


_patch_reconstruction.register_autograd(_backward, setup_context=_setup_context)


def _torch_forward(hidden, weight, bias, targets, grad_factor: float):
    """Row bands of predictions in fp32, at most common.CHUNK_ELEMENTS of them at a time."""
    weight32, bias32 = weight.float(), bias.float()
    sum_squares = hidden.new_zeros((), dtype=torch.float32)
    d_predictions = hidden.new_empty(targets.shape)
    for start, end in common.chunk_bounds(hidden.shape[0], weight.shape[0]):
        error = torch.addmm(bias32, hidden[start:end].float(), weight32.T) - targets[start:end].float()
        sum_squares += error.square().sum()
        d_predictions[start:end] = error * grad_factor
    return sum_squares / targets.numel(), d_predictions


@triton.jit
def _mse_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    d_predictions_ptr,
    part_ptr,
    K,
    N,
    H,
    grad_factor,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile: prediction -> error -> (partial sum of squares, gradient tile)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    prediction = dot_tile(hidden_ptr, weight_ptr, offs_m, offs_n, K, N, H, H, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
    col_ok = offs_n < N
    inside = (offs_m < K)[:, None] & col_ok[None, :]
    prediction += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    offsets = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    target = tl.load(targets_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    error = tl.where(inside, prediction - target, 0.0)
    tl.store(part_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(error * error))
    tl.store(d_predictions_ptr + offsets, (error * grad_factor).to(d_predictions_ptr.dtype.element_ty), mask=inside)


def _triton_forward(hidden, weight, bias, targets, grad_factor: float):
    (K, H), N = hidden.shape, weight.shape[0]
    tiles = common.tiles_for(hidden.dtype)
    grid = (triton.cdiv(K, tiles.block_m), triton.cdiv(N, tiles.block_n))
    partial_sums = hidden.new_empty(grid[0] * grid[1], dtype=torch.float32)
    d_predictions = hidden.new_empty((K, N))
    _mse_kernel[grid](
        hidden, weight, bias, targets, d_predictions, partial_sums, K, N, H, grad_factor,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, UPCAST=tiles.upcast,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return partial_sums.sum() / targets.numel(), d_predictions
