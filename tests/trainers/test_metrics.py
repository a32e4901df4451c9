"""Our FLOP counts (a forward: the MFU numerator; the MAE layer on masked queries) against torch's FlopCounterMode."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moca_fast.config import ModelSpec
from moca_fast.data.batch import pack_sequences
from moca_fast.data.masking import apply_mae
from moca_fast.data.tokens import IMAGE_PLACEHOLDER
from moca_fast.model.heads import MaeHead
from moca_fast.model.moca import MocaModel
from moca_fast.model.tiny import tiny_hf_config
from moca_fast.trainers.metrics import decoder_layer_flops, forward_flops


@pytest.mark.parametrize("with_image", [False, True])
def test_forward_flops_match_flop_counter(tokenizer, processor, make_image, with_image):
    model = MocaModel(ModelSpec.from_hf_config(tiny_hf_config(tokenizer))).init_weights().eval()
    # One sequence, and an image that is a single attention window: nothing padded, so the counts compare.
    seq = (
        processor.encode(f"{IMAGE_PLACEHOLDER}caption words", [make_image(112, 112)], "i")
        if with_image
        else processor.encode("some words to count " * 5, [], "t")
    )
    batch = pack_sequences([seq], processor.image_token_id)
    counter = FlopCounterMode(display=False)
    # The math backend spells attention as matmuls, which the counter sees (fused CPU kernels it does not).
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(batch)
    measured = counter.get_total_flops()
    ours = forward_flops(model.spec, batch)
    assert abs(ours - measured) / measured < 0.01, (ours, measured)


def test_mae_layer_flops_match_flop_counter(tokenizer, processor, make_image):
    """decoder_layer_flops with the MAE layer's shape: masked image rows as queries against their whole sequence."""
    model = MocaModel(ModelSpec.from_hf_config(tiny_hf_config(tokenizer))).init_weights().eval()
    seq = processor.encode(f"words {IMAGE_PLACEHOLDER} more words", [make_image(112, 84)], "s")
    seq = apply_mae(seq, image_token_id=processor.image_token_id, rate=0.5, generator=torch.Generator().manual_seed(0))
    batch = pack_sequences([seq], processor.image_token_id)
    head = MaeHead.from_middle_layer(model)
    hidden = torch.randn(batch.num_tokens, model.spec.text.hidden_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        head.features(hidden, batch, "sdpa")
    queries = batch.mae_index.numel()
    assert 0 < queries < batch.num_tokens
    ours = decoder_layer_flops(model.spec.text, queries, batch.num_tokens, queries * batch.num_tokens)
    measured = counter.get_total_flops()
    assert abs(ours - measured) / measured < 0.01, (ours, measured)
