"""Our packed bidirectional backbone against transformers' Qwen2.5-VL run non-causally (fp32 oracle)."""

import pytest
import torch
import torch.nn.functional as F

from moca_fast.integrations.transformers import from_transformers
from moca_fast.model.pooling import embed_pool

from .conftest import hf_hidden, pack


def test_hidden_states_match_transformers(hf_model, processor, mixed_sequences, attention_backend):
    ours = from_transformers(hf_model, attention_backend=attention_backend).eval()
    batch = pack(mixed_sequences, processor)
    with torch.no_grad():
        hidden = ours(batch)
    pooled = embed_pool(hidden, batch.cu_seqlens)
    for i, seq in enumerate(mixed_sequences):
        start, end = batch.cu_seqlens[i].item(), batch.cu_seqlens[i + 1].item()
        reference = hf_hidden(hf_model, seq, processor.image_token_id)
        assert (hidden[start:end] - reference).abs().max().item() <= 1e-4, seq.sample_id
        ref_pooled = F.normalize(reference.mean(0), dim=-1)
        assert F.cosine_similarity(pooled[i], ref_pooled, dim=0).item() >= 0.99999, seq.sample_id


def test_image_tokens_carry_vision_features(hf_model, processor, make_image):
    """A guard on the guard: the parity above must depend on the pixels (vision tower really runs)."""
    from moca_fast.data.tokens import IMAGE_PLACEHOLDER

    ours = from_transformers(hf_model).eval()
    a = processor.encode(f"{IMAGE_PLACEHOLDER}x", [make_image(60, 60)], "a")
    b = processor.encode(f"{IMAGE_PLACEHOLDER}x", [make_image(60, 60)], "b")
    with torch.no_grad():
        ha, hb = ours(pack([a], processor)), ours(pack([b], processor))
    assert (ha - hb).abs().max() > 1e-3


@pytest.mark.cuda
def test_bf16_cuda_parity(hf_model, processor, mixed_sequences):
    """On a GPU: the bf16 path (varlen FlashAttention) against the fp32 oracle, pooled cosine >= 0.999."""
    ours = from_transformers(hf_model).to("cuda", torch.bfloat16).eval()
    batch = pack(mixed_sequences, processor).to("cuda")
    with torch.no_grad():
        pooled = embed_pool(ours(batch), batch.cu_seqlens).cpu()
    for i, seq in enumerate(mixed_sequences):
        ref = F.normalize(hf_hidden(hf_model, seq, processor.image_token_id).mean(0), dim=-1)
        assert F.cosine_similarity(pooled[i], ref, dim=0).item() >= 0.999, seq.sample_id
