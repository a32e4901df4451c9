"""Our FLOP count of a forward (the MFU numerator) against torch's FlopCounterMode on the real model."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moca_fast.config import ModelSpec
from moca_fast.data.batch import pack_sequences
from moca_fast.data.tokens import IMAGE_PLACEHOLDER
from moca_fast.model.moca import MocaModel
from moca_fast.model.tiny import tiny_hf_config
from moca_fast.trainers.metrics import forward_flops


@pytest.mark.parametrize("with_image", [False, True])
def test_forward_flops_match_flop_counter(tokenizer, processor, make_image, with_image):
    model = MocaModel(ModelSpec.from_hf_config(tiny_hf_config(tokenizer))).init_weights().eval()
    # One sequence, and an image that is a single attention window: nothing padded, so the counts compare.
    seq = (processor.encode(f"{IMAGE_PLACEHOLDER}caption words", [make_image(112, 112)], "i") if with_image
           else processor.encode("some words to count " * 5, [], "t"))
    batch = pack_sequences([seq], processor.image_token_id)
    counter = FlopCounterMode(display=False)
    # The math backend spells attention as matmuls, which the counter sees (fused CPU kernels it does not).
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(batch)
    measured = counter.get_total_flops()
    ours = forward_flops(model.spec, batch)
    assert abs(ours - measured) / measured < 0.01, (ours, measured)
