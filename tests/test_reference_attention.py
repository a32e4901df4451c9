"""bench/reference_attention.py: the reference path's varlen attention equals transformers' own bidirectional
attention on padded input (forward and backward, fp32), padding never attends nor is attended, causal attention
is refused, and a forward calls attention once per layer (the vision windows in one call, not a loop)."""

import copy
import math
import types

import pytest
import torch

from bench import reference_attention
from bench.reference_attention import use_varlen_attention, varlen_attention_forward
from bench.reference_path import pad_sequences
from moca_fast.data.tokens import IMAGE_PLACEHOLDER as P
from moca_fast.integrations.transformers import make_bidirectional
from moca_fast.model.tiny import tiny_hf_config


def _per_row(q, k, v, lengths, scale):
    """fp64 softmax attention of each row's first `length` tokens among themselves: [B, L, Hq, D], zeros beyond."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=torch.float64)
    for b, n in enumerate(lengths):
        qs, ks, vs = q[b, :, :n].double(), *(x[b, :, :n].double().repeat_interleave(group, 0) for x in (k, v))
        weights = (torch.einsum("hqd,hkd->hqk", qs, ks) * scale).softmax(-1)
        out[b, :n] = torch.einsum("hqk,hkd->qhd", weights, vs)
    return out


def test_padding_never_attends_nor_is_attended_and_rows_equal_an_fp64_softmax(attention_backend):
    g = torch.Generator().manual_seed(0)
    lengths, width = [8, 5, 1], 8
    q = torch.randn(3, 4, width, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(3, 2, width, 8, generator=g, requires_grad=True) for _ in range(2))  # grouped K/V
    mask = torch.arange(width) < torch.tensor(lengths)[:, None]
    module = types.SimpleNamespace(is_causal=False)
    out, weights = varlen_attention_forward(module, q, k, v, mask, scaling=0.3, backend=attention_backend)
    assert weights is None and out.shape == (3, width, 4, 8)
    assert not out[~mask].any()  # padded queries attend to nothing
    grad = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = _per_row(q64, k64, v64, lengths, 0.3)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    for actual, wanted, name in zip(grads, torch.autograd.grad(expected, (q64, k64, v64), grad.double()), "qkv"):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")
    padded = ~mask[:, None, :, None]  # padded keys and values are never attended: huge values there change nothing
    noisy = varlen_attention_forward(
        module,
        q.masked_fill(padded, 1e4),
        k.masked_fill(padded, 1e4),
        v.masked_fill(padded, 1e4),
        mask,
        scaling=0.3,
        backend=attention_backend,
    )[0]
    assert torch.equal(noisy[mask], out[mask])


def test_causal_attention_is_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="asks for causal attention"):
        varlen_attention_forward(types.SimpleNamespace(is_causal=True), q, q, q, None, backend="sdpa")
    with pytest.raises(ValueError, match="asks for causal attention"):
        varlen_attention_forward(types.SimpleNamespace(is_causal=False), q, q, q, None, is_causal=True, backend="sdpa")


def _padded_batch(processor, make_image):
    sequences = [
        processor.encode(f"{P}a picture wider than tall, then words", [make_image(84, 168)], "wide"),
        processor.encode("text only, a few words", [], "text"),
        processor.encode(f"two {P} images {P} here", [make_image(140, 112), make_image(56, 56)], "two"),
    ]
    batch = pad_sequences(sequences, processor.tokenizer.pad_token_id)
    assert (batch.attention_mask == 0).any()
    return batch


def _forward(model, batch, image_token_id):
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        mm_token_type_ids=(batch.input_ids == image_token_id).long(),
    ).last_hidden_state


def _bidirectional_model(tokenizer):
    from transformers import Qwen2_5_VLModel

    torch.manual_seed(0)
    return make_bidirectional(Qwen2_5_VLModel(tiny_hf_config(tokenizer)).train())


@pytest.mark.parametrize("oracle", ["sdpa", "eager"])
def test_model_equals_transformers_bidirectional_attention_on_padded_input(
    tokenizer, processor, make_image, attention_backend, oracle
):
    reference = _bidirectional_model(tokenizer)
    reference.set_attn_implementation(oracle)
    model = copy.deepcopy(reference)
    assert use_varlen_attention(model, attention_backend) == f"flash_varlen_{attention_backend}"
    batch = _padded_batch(processor, make_image)
    real = batch.attention_mask.bool()
    image_token_id = model.config.image_token_id
    hidden, expected = (_forward(m, batch, image_token_id)[real] for m in (model, reference))
    torch.testing.assert_close(hidden, expected, rtol=5e-6, atol=5e-6)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    (hidden * weights).sum().backward()
    (expected * weights).sum().backward()
    grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    mine = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert mine.keys() == grads.keys() and any("visual.blocks.0.attn" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(
            mine[name], grad, rtol=0, atol=5e-6 * max(grad.abs().max().item(), 1e-3), msg=lambda m, n=name: f"{n}: {m}"
        )


def _windows(grid: torch.Tensor, config) -> int:
    """Vision windows of images with patch grids [I, 3]: windows of window_size pixels over the merged grid."""
    side = config.window_size // config.spatial_merge_size // config.patch_size
    return sum(
        t * math.ceil(h // config.spatial_merge_size / side) * math.ceil(w // config.spatial_merge_size / side)
        for t, h, w in grid.tolist()
    )


def test_one_attention_call_per_layer_with_every_vision_window_in_it(tokenizer, processor, make_image, monkeypatch):
    model = _bidirectional_model(tokenizer)
    use_varlen_attention(model, "sdpa")
    calls = []

    def counted(q, k, v, segments, scale):
        calls.append(segments.q.cu_seqlens.numel() - 1)
        return original(q, k, v, segments, scale)

    original = reference_attention.varlen_attention
    monkeypatch.setattr(reference_attention, "varlen_attention", counted)
    batch = _padded_batch(processor, make_image)
    _forward(model, batch, model.config.image_token_id)
    vision = model.config.vision_config
    images = batch.image_grid_thw.shape[0]
    windows = _windows(batch.image_grid_thw, vision)
    assert windows > images  # the windowed block has more windows than images: one call holds them all
    per_block = [images if i in vision.fullatt_block_indexes else windows for i in range(vision.depth)]
    text_layers = model.config.text_config.num_hidden_layers
    assert calls == per_block + [batch.input_ids.shape[0]] * text_layers


@pytest.mark.cuda
def test_bf16_on_torch_varlen_attn_matches_transformers_fp32_sdpa(tokenizer, processor, make_image):
    """On a GPU: the varlen attention on torch's own varlen_attn kernel (bf16) against transformers' fp32 SDPA,
    each row's mean over its real tokens at cosine >= 0.999."""
    reference = _bidirectional_model(tokenizer).eval()
    model = copy.deepcopy(reference).to("cuda", torch.bfloat16)
    use_varlen_attention(model, "varlen")
    batch = _padded_batch(processor, make_image)
    mask = batch.attention_mask.unsqueeze(-1).float()
    with torch.no_grad():
        pooled = [
            (_forward(m, b, model.config.image_token_id).float().cpu() * mask).sum(1) / mask.sum(1)
            for m, b in ((model, batch.to("cuda")), (reference, batch))
        ]
    assert torch.nn.functional.cosine_similarity(*pooled, dim=-1).min() >= 0.999
