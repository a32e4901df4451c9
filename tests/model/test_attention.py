"""Attention dispatch on packed segments: every backend equals a per-segment softmax loop, forward and backward,
for documents, vision windows and MAE queries with their own bounds, bidirectional and causal; the CUDA choice
without a GPU."""

import pytest
import torch

from moca_fast.model import attention
from moca_fast.model.attention import Bounds, Segments, resolve_backend, varlen_attention

from .varlen_oracle import cpu_varlen_attention


def _bounds(lengths: list[int]) -> Bounds:
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return Bounds(cu, max(lengths), sum(lengths))


def _per_segment(q, k, v, q_bounds: Bounds, k_bounds: Bounds, scale: float, causal: bool = False) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    out = []
    cq, ck = q_bounds.cu_seqlens.tolist(), k_bounds.cu_seqlens.tolist()
    for s in range(len(cq) - 1):
        qs = q[cq[s] : cq[s + 1]].double()
        ks, vs = (x[ck[s] : ck[s + 1]].double().repeat_interleave(group, 1) for x in (k, v))
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:  # query i sees keys 0..i of its segment
            scores = scores.masked_fill(torch.ones(scores.shape[1:], dtype=torch.bool).triu(1), float("-inf"))
        weights = scores.softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", weights, vs))
    return torch.cat(out)


LAYOUTS = {  # name -> (query segment lengths or None for self-attention, key segment lengths)
    "documents": (None, [7, 1, 12, 5]),
    "vision-windows": (None, [16, 16, 4, 8, 16, 2]),
    "mae-queries": ([3, 0, 5, 1], [7, 1, 12, 5]),
    "no-queries": ([0, 0], [7, 12]),  # a stage-1 pack without images: the MAE layer has nothing to reconstruct
}


CAUSAL_LAYOUTS = ("documents", "vision-windows")  # causal attention is self-attention


@pytest.mark.parametrize(
    "layout,causal",
    [(name, False) for name in LAYOUTS] + [(name, True) for name in CAUSAL_LAYOUTS],
    ids=list(LAYOUTS) + [f"{name}-causal" for name in CAUSAL_LAYOUTS],
)
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize(
    "backend,takes_gqa",
    [("sdpa", True), ("varlen", True), ("varlen", False)],
    ids=["sdpa", "varlen", "varlen-expanding-kv"],
)
def test_backends_equal_a_per_segment_loop(monkeypatch, layout, causal, kv_heads, backend, takes_gqa):
    if not takes_gqa:  # a torch whose varlen_attn has no enable_gqa: K/V heads are repeated for their groups
        options, _ = attention._varlen_options(causal)
        monkeypatch.setattr(attention, "_varlen_options", lambda causal: (options, False))
    q_lengths, k_lengths = LAYOUTS[layout]
    k_bounds = _bounds(k_lengths)
    q_bounds = _bounds(q_lengths) if q_lengths else None
    tq = q_bounds.total if q_bounds else k_bounds.total
    q = torch.randn(tq, 4, 8, requires_grad=True)
    k, v = (torch.randn(k_bounds.total, kv_heads, 8, requires_grad=True) for _ in range(2))
    segments = Segments.build(
        k_bounds.cu_seqlens, k_bounds.max_seqlen, k_bounds.total, backend, q_bounds=q_bounds, causal=causal
    )
    with cpu_varlen_attention():
        out = varlen_attention(q, k, v, segments, scale=0.3)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = _per_segment(q64, k64, v64, q_bounds or k_bounds, k_bounds, 0.3, causal)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    if not tq:
        assert out.shape == (0, 4, 8) and all(g is not None and not g.any() for g in grads)
        return
    for actual, wanted, name in zip(grads, expected_grads, "qkv"):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")


def test_auto_backend_on_cuda_is_a_flash_kernel_in_half_precision_only(monkeypatch):
    cuda = torch.device("cuda")  # a device object needs no GPU: this checks the choice, not the kernel
    monkeypatch.setattr(attention, "_flash_attn_available", lambda: False)
    assert resolve_backend("auto", cuda, torch.bfloat16) == "varlen"
    assert resolve_backend("auto", cuda, torch.float16) == "varlen"
    assert resolve_backend("auto", cuda, torch.float32) == "sdpa"  # flash kernels take half precision only
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    monkeypatch.setattr(attention, "_flash_attn_available", lambda: True)
    assert resolve_backend("auto", cuda, torch.bfloat16) == "flash"
    with pytest.raises(ValueError, match="unknown attention backend 'flex'"):
        resolve_backend("flex", cuda)


def test_the_installed_varlen_attn_takes_our_arguments():
    """Bidirectional options that the installed torch's signature accepts (2.10: is_causal, 2.11+: window_size)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    options, takes_gqa = attention._varlen_options(False)
    assert options and options.get("window_size", (-1, -1)) == (-1, -1) and not options.get("is_causal", False)
    extra = {"enable_gqa": True} if takes_gqa else {}
    inspect.signature(varlen_attn).bind(*[None] * 5, 1, 1, scale=0.1, **options, **extra)
    causal, _ = attention._varlen_options(True)  # causal: window (-1, 0) on 2.11+, is_causal on 2.10
    assert causal.get("window_size") == (-1, 0) or causal.get("is_causal") is True
    inspect.signature(varlen_attn).bind(*[None] * 5, 1, 1, scale=0.1, **causal, **extra)
