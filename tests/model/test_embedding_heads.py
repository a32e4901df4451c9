"""Embedding heads: the multi-vector head against an independent torch computation on transformers' hidden states,
Matryoshka prefixes, and checkpoints that declare and restore both in every key layout."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moca_fast.integrations.transformers import from_transformers, to_transformers
from moca_fast.model.loading import load_pretrained, save_pretrained
from moca_fast.model.pooling import matryoshka_prefix

from .conftest import hf_hidden, pack
from .test_loading import _rewrite


@pytest.fixture
def headed(hf_model):
    torch.manual_seed(3)
    return from_transformers(hf_model).set_heads(16, (32, 8)).eval()


def test_multi_vector_head_equals_an_independent_computation_forward_and_backward(
    headed, hf_model, processor, mixed_sequences
):
    """Every token of every packed sequence, projected and L2-normalised, equals transformers' hidden states of the
    sequence alone through the same Linear in fp64; the head's gradients match too."""
    proj = headed.custom_text_proj
    with torch.no_grad():
        hidden = headed(pack(mixed_sequences, processor))
    tokens = headed.multi_vectors(hidden)
    assert tokens.shape == (hidden.shape[0], 16) and tokens.dtype == torch.float32
    weight, bias = (p.detach().double().requires_grad_() for p in (proj.weight, proj.bias))
    expected = []
    for seq in mixed_sequences:
        oracle_hidden = hf_hidden(hf_model, seq, processor.image_token_id).double()
        projected = oracle_hidden @ weight.T + bias
        expected.append(projected / projected.norm(dim=-1, keepdim=True))
    expected = torch.cat(expected)
    assert (tokens.double() - expected).abs().max().item() <= 1e-5
    probe = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (tokens.double() * probe).sum().backward()
    (expected * probe).sum().backward()
    for ours, oracle in ((proj.weight.grad, weight.grad), (proj.bias.grad, bias.grad)):
        assert (ours.double() - oracle).abs().max().item() <= 1e-5 * max(1.0, oracle.abs().max().item())


def test_matryoshka_prefix_is_the_renormalised_leading_dimensions():
    x = torch.randn(5, 64, dtype=torch.float64)
    prefix = matryoshka_prefix(F.normalize(x, dim=-1), 8)
    torch.testing.assert_close(prefix, x[:, :8] / x[:, :8].norm(dim=-1, keepdim=True), rtol=0, atol=1e-12)


def test_set_heads_refuses_a_mismatched_head_and_out_of_range_dims(headed):
    with pytest.raises(ValueError, match="has 16 outputs"):
        headed.set_heads(32)
    with pytest.raises(ValueError, match="outside 1..64"):
        headed.set_heads(None, (128,))


def test_a_saved_checkpoint_declares_its_heads_and_restores_them_in_both_key_layouts(
    tmp_path, headed, processor, mixed_sequences
):
    save_pretrained(headed, tmp_path / "saved")
    declared = json.loads((tmp_path / "saved" / "config.json").read_text())["moca_fast_heads"]
    assert declared == {"multi_vector_dim": 16, "matryoshka_dims": [32, 8]}
    assert {"custom_text_proj.weight", "custom_text_proj.bias"} <= load_file(
        tmp_path / "saved" / "model.safetensors"
    ).keys()
    batch = pack(mixed_sequences[:2], processor)
    with torch.no_grad():
        expected = headed.multi_vectors(headed(batch))
    for layout in ("flat", "nested"):
        folder = _rewrite(tmp_path / "saved", tmp_path / layout, layout)
        loaded = load_pretrained(folder).eval()
        assert (loaded.spec.multi_vector_dim, loaded.spec.matryoshka_dims) == (16, (32, 8))
        assert torch.equal(loaded.custom_text_proj.weight, headed.custom_text_proj.weight)
        with torch.no_grad():
            torch.testing.assert_close(loaded.multi_vectors(loaded(batch)), expected, rtol=0, atol=1e-6)


def test_a_model_without_heads_declares_none_and_has_no_projection(tmp_path, hf_model):
    plain = from_transformers(hf_model)
    save_pretrained(plain, tmp_path / "plain")
    assert "moca_fast_heads" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    loaded = load_pretrained(tmp_path / "plain")
    assert loaded.custom_text_proj is None and loaded.spec.matryoshka_dims == ()
    with pytest.raises(ValueError, match="no multi-vector head"):
        loaded.multi_vectors(torch.zeros(3, 64))


def test_to_transformers_leaves_the_head_out(headed):
    hf = to_transformers(headed)
    assert not any(name.startswith("custom_text_proj") for name in hf.state_dict())
