"""Fixtures for model tests: tiny random transformers Qwen2.5-VL models run non-causally (the oracle)."""

import pytest
import torch

from moca_fast.data.batch import pack_sequences
from moca_fast.data.tokens import IMAGE_PLACEHOLDER
from moca_fast.integrations.transformers import make_bidirectional
from moca_fast.model.tiny import tiny_hf_config


def bidirectional_hf_model(config, cls=None):
    """A transformers Qwen2.5-VL with its decoder made non-causal, as transformers 5.x needs it: text_config.is_causal
    False and each decoder layer's self_attn.is_causal False (the layer flag alone turns causal with a padding mask)."""
    from transformers import Qwen2_5_VLModel

    return make_bidirectional((cls or Qwen2_5_VLModel)(config).eval())


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    torch.manual_seed(7)
    return bidirectional_hf_model(tiny_hf_config(tokenizer))


def hf_hidden(hf_model, seq, image_token_id):
    """transformers' last hidden state [L, H] for one unpadded sequence (batch of one)."""
    kwargs = dict(input_ids=seq.input_ids[None], mm_token_type_ids=(seq.input_ids == image_token_id).long()[None])
    if seq.pixel_values.shape[0]:
        kwargs.update(pixel_values=seq.pixel_values, image_grid_thw=seq.image_grid_thw)
    with torch.no_grad():
        return hf_model(**kwargs).last_hidden_state[0]


@pytest.fixture
def mixed_sequences(processor, make_image):
    """Text-only, one image, images of different sizes, and interleaved text-image-text-image sequences."""
    P = IMAGE_PLACEHOLDER
    return [
        processor.encode("two blue squares at the top right of a white page", [], "text"),
        processor.encode(f"{P}Represent the given image.\n", [make_image(100, 150)], "one-image"),
        processor.encode(f"{P}{P}compare", [make_image(56, 56), make_image(300, 170)], "two-sizes"),
        processor.encode(
            f"first {P} then some words {P} and the end", [make_image(80, 60), make_image(140, 230)], "interleaved"
        ),
    ]


def pack(sequences, processor):
    return pack_sequences(sequences, processor.image_token_id)
