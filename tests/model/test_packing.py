"""Packing invariance and bidirectionality of the packed backbone."""

import torch

from moca_fast.data.tokens import IMAGE_PLACEHOLDER
from moca_fast.integrations.transformers import from_transformers

from .conftest import pack


def test_pooled_embedding_alone_equals_packed(hf_model, processor, mixed_sequences):
    ours = from_transformers(hf_model).eval()
    with torch.no_grad():
        packed = ours.embed(pack(mixed_sequences, processor))
        # The same sequences in another order, mixed with a long one, still agree with each alone.
        longer = processor.encode("a long text " * 40, [], "long")
        reordered = ours.embed(pack([longer] + mixed_sequences[::-1], processor))[1:].flip(0)
        for i, seq in enumerate(mixed_sequences):
            alone = ours.embed(pack([seq], processor))[0]
            assert (alone - packed[i]).abs().max().item() <= 1e-5, seq.sample_id
            assert (alone - reordered[i]).abs().max().item() <= 1e-5, seq.sample_id


def test_decoder_is_bidirectional(hf_model, processor, make_image):
    ours = from_transformers(hf_model).eval()
    seq = processor.encode(f"{IMAGE_PLACEHOLDER}the first and the last word", [make_image(56, 84)], "s")
    changed = processor.encode(f"{IMAGE_PLACEHOLDER}the first and the last word", [make_image(56, 84)], "s")
    changed.pixel_values = seq.pixel_values.clone()
    changed.input_ids = seq.input_ids.clone()
    changed.input_ids[-1] = (seq.input_ids[-1] + 1) % 500
    with torch.no_grad():
        before, after = ours(pack([seq], processor)), ours(pack([changed], processor))
    assert (before[0] - after[0]).abs().max().item() > 1e-4  # the first token sees the last
    # ...and packing keeps documents apart: a neighbour's change does not leak across the boundary.
    other = processor.encode("a neighbour", [], "n")
    with torch.no_grad():
        a = ours(pack([seq, other], processor))[: len(seq)]
        b = ours(pack([seq, processor.encode("another neighbour text", [], "n2")], processor))[: len(seq)]
    assert (a - b).abs().max().item() <= 1e-5


def test_text_only_training_batch_runs_every_module(hf_model, processor):
    """Under FSDP every rank must run every module: a text-only batch still gives vision grads (zeros)."""
    ours = from_transformers(hf_model).train()
    batch = pack([processor.encode("only text in this batch", [], "t")], processor)
    ours(batch).float().pow(2).mean().backward()
    for name, param in ours.visual.named_parameters():
        assert param.grad is not None, name
        assert torch.count_nonzero(param.grad) == 0, name
    assert ours.language_model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(batch), hf_hidden_text(hf_model, batch), rtol=0, atol=1e-4)


def hf_hidden_text(hf_model, batch):
    with torch.no_grad():
        return hf_model(input_ids=batch.input_ids[None]).last_hidden_state[0]
