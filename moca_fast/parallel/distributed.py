"""Distributed helpers: this process's device and process group from torchrun's environment, and collectives with
exact gradients."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def training_device(requested: str | None = None) -> torch.device:
    """`requested` when given, else this process's CUDA device (torchrun's LOCAL_RANK) when there is one, else CPU."""
    if requested is not None:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device_type: str) -> tuple[int, int]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); (rank, world size), (0, 1) alone."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def finish_distributed() -> None:
    """Leave the process group cleanly (every rank done first); exiting with it alive can abort a rank."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no gradient); the tensor itself when alone."""
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient of the gathered tensor and returns
    this rank's slice: exact, unlike keeping a gradient for the local slice only."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x (equal shapes) along dim 0, differentiably."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x (equal shapes) along dim 0, without gradient."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherVarlenWithGrad(torch.autograd.Function):
    """all_gather along dim 0 of tensors whose first dimension differs across ranks (padded to the longest for the
    collective, unpadded after); backward as _GatherWithGrad: every rank's gradient summed, this rank's rows."""

    @staticmethod
    def forward(ctx, x, sizes: list[int]):
        longest = max(sizes)
        padded = x.new_zeros(longest, *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.start, ctx.stop = sum(sizes[: rank()]), sum(sizes[: rank() + 1])
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.stop], None


def gather_varlen_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's x along dim 0, differentiably, where ranks hold different numbers of rows (the
    packed token vectors of their sequences); also returns each rank's row count (one host sync)."""
    if world_size() == 1:
        return x, [x.shape[0]]
    sizes = gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    return _GatherVarlenWithGrad.apply(x, sizes), sizes
